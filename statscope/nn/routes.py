"""How a normalization layer of :mod:`statscope.nn.layers` computes its output: the routes.

:class:`Routes` is a part of ``_PixelSetNorm`` (a mixin; the state it reads is set up in that
class's ``__init__``). ``forward`` picks one route per input shape, dtype and mode
(:meth:`Routes._choose_route`, remembered in ``_routes``; under ``torch.compile``,
``torch.jit.trace`` and torch.func's transforms :meth:`Routes._traceable_route`, each call); every
route gives the same values, gradients and running statistics, and they differ only in speed
(docs/nn.md, *Performance*).
"""

import math
from typing import Callable

import torch
from torch import nn

from statscope.errors import StatscopeError
from statscope.nn.algebra import UNIT_EPS, fractions, plain_forward
from statscope.nn.cells import cell_norm
from statscope.nn.channel import ChannelPlan, channel_norm
from statscope.nn.composed import extended_std_composed
from statscope.native import kernels

__all__ = ["Routes"]

# HN (and EN) inputs up to this many elements take the composed route (fewer calls), larger ones
# the Function (fewer passes over the data): the crossovers measured on CPU, one thread
_SMALL = 49152
_SMALL_EN = 98304
# per-channel norms' CPU inputs up to this many elements take the C++ kernel (.native): one
# thread, one fused pass each way, ahead of torch's kernels until their threads and vector units
# pay (measured at one thread: 1.9-2.6x faster than the Python routes at 512-32768 elements, even
# with them at 524288)
_KERNEL_LIMIT = 65536
# dtypes whose plain-route arithmetic runs in float32 (overflow in float16, offsets in both)
_HALF = (torch.float16, torch.bfloat16)


def _memory_format(x):
    """The channels-last format ``x`` is laid out in, or None."""
    for fmt in (torch.channels_last, torch.channels_last_3d):
        try:
            if x.is_contiguous(memory_format=fmt):
                return fmt
        except RuntimeError:  # the format does not apply to this many dims
            continue
    return None


def _static_shape(x):
    """``x.shape`` as ints under ``torch.jit.trace``, where the sizes are tensors the trace
    records (so that it serves other batch sizes) and any comparison of one warns that the
    trace takes its result for a constant: the layer's checks of a shape are such constants."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        return torch.Size(x.shape)
    finally:
        torch._C._set_tracing_state(state)


class Routes:
    """The routes of ``_PixelSetNorm.forward`` (a mixin)."""

    # Set up in _PixelSetNorm.__init__; declared for type checkers.
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    mean_weight: nn.Parameter | None
    var_weight: nn.Parameter | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None
    num_features: int
    eps: float
    momentum: float | None
    mean_sets: tuple[str, ...]
    std_sets: tuple[str, ...]
    mean_groups: int
    std_groups: int
    std_center: str
    _per_example: bool
    _plan: ChannelPlan | None
    _torch_norm: str | None
    _routes: dict
    _shapes: dict
    _mean_buffers: list
    _var_buffers: list
    _buffers: dict
    _check_input: Callable
    _check_sizes: Callable
    _empty: Callable
    _label: Callable

    def _dtype(self):
        """The dtype of the layer's parameters and buffers, or None when it has none."""
        reference = self.weight if self.weight is not None else self.running_mean
        return None if reference is None else reference.dtype

    def _native(self, x):
        """Whether ``x`` has the dtype of the layer's parameters and buffers (or there are none)."""
        dtype = self._dtype()
        return dtype is None or dtype == x.dtype

    def _choose_route(self, x, use_batch):
        """Check ``x`` and pick the route for its shape, dtype and mode; remember the choice."""
        self._check_input(x)
        self._check_sizes(x.shape, use_batch)
        native = self._native(x)
        if not native and torch.promote_types(x.dtype, self._dtype()) == self._dtype():
            route = self._widened_route
        elif native and self._torch_norm is not None:
            route = self._torch_op
        elif (native and x.dtype == torch.float16
              and not (self._plan is not None and not use_batch and self.mean_weight is None
                       and self.var_weight is None)):
            # float16 overflows the statistics of the routes below (and c² of the composed
            # one): the plain ops in float32. The eval-mode BatchNorm op computes in float32
            route = self._plain_route
        elif (native and self._plan is not None and use_batch and self.mean_weight is None
              and x.device.type == "cpu" and x.numel() <= _KERNEL_LIMIT
              and kernels() is not None):
            route = self._kernel_route
        elif native and self._plan is not None and use_batch:
            limit = _SMALL_EN if self._plan.mean_extended[0] else _SMALL
            rows = x.shape[0] * self._plan.groups
            # BatchNorm's kernel on the (N, G, K·|S|) view slows down with many short rows
            short = rows > 512 and x.numel() // rows < 16
            # on CUDA a step of small layers waits for kernel launches, not for passes over
            # the data: the composed route's two calls win at any size
            small = (self._plan.extended_std and (x.numel() <= limit or x.is_cuda)
                     and not short)
            route = self._composed_route if small else self._function_route
        elif (native and self._plan is not None and self.mean_weight is None
              and self.var_weight is None):
            route = self._running_route
        elif native and self._per_example and x.dim() > 2:
            kernel = (use_batch and x.device.type == "cpu" and x.numel() <= _KERNEL_LIMIT
                      and kernels() is not None)
            route = self._cell_kernel_route if kernel else self._cell_route
        else:
            route = self._plain_route
        if len(self._routes) > 64:
            self._routes.clear()
        self._routes[(x.shape, x.dtype, use_batch)] = route
        return route

    def _transformed_route(self, x, use_batch, update):
        """:meth:`_traceable_route` under a torch.func transform or ``torch.jit.trace``."""
        if torch.jit.is_tracing():
            return self._traceable_route(x, _static_shape(x), use_batch, update)
        if update and self.num_batches_tracked is not None:
            raise StatscopeError(
                f"{self._label()} in training mode under a torch.func transform: its running "
                f"statistics cannot be updated in place there (nor can BatchNorm's); build it "
                f"with track_running_stats=False, as torch.func.replace_all_batch_norm_modules_ "
                f"sets BatchNorm, or call .eval()")
        return self._traceable_route(x, x.shape, use_batch, update)

    def _traceable_route(self, x, shape, use_batch, update):
        """The route under ``torch.compile``, ``torch.jit.trace`` and torch.func's transforms:
        torch's own op (BN, IN, LN, GN) or the plain ops, never a Function or a C++ kernel.

        Each of them sees only torch's ops: dynamo breaks its graph at a custom Function, the
        tracer records a C++ kernel's output as an ``empty_like`` (uninitialised memory) and
        cannot trace a Python Function at all, and functorch refuses C++ Functions and Python
        ones without a vmap rule. No route is remembered per shape (nor, under compile and
        trace, any per-shape constant), so that a compiled graph keeps the batch size dynamic
        and a trace records the sizes it uses. ``shape`` is ``x.shape``, as ints under
        ``torch.jit.trace``.
        """
        self._check_input(x, shape)
        if math.prod(shape) == 0:
            return self._empty(x)
        self._check_sizes(shape, use_batch)
        dtype = self._dtype()
        if (dtype is not None and x.dtype != dtype
                and torch.promote_types(x.dtype, dtype) == dtype):
            x = x.to(dtype)  # as eager's _widened_route: the statistics in the layer's dtype
        # a cumulative average's weight 1/count goes to BatchNorm's op as a float, which the
        # trace would freeze and dynamo cannot take from a tensor in one graph: the plain ops
        # keep it a tensor
        frozen_weight = update and self.momentum is None and self._torch_norm == "batch_norm"
        if self._torch_norm is not None and self._native(x) and not frozen_weight:
            return self._torch_op(x, use_batch, update)
        return self._plain_route(x, use_batch, update)

    def _composed_route(self, x, use_batch, update):
        """HN/EN on a small input: a few of BatchNorm's own calls (:mod:`statscope.nn.composed`)."""
        if not x.is_contiguous():
            return self._function_route(x, use_batch, update)
        if update:
            self.num_batches_tracked.add_(1)
        return extended_std_composed(self, x, update)

    def _kernel_route(self, x, use_batch, update):
        """A per-channel norm on a small CPU input: the fused C++ kernel (:mod:`.native`)."""
        if not x.is_contiguous():
            return self._function_route(x, use_batch, update)
        plan = self._plan
        factor, mean_buffers, var_buffers, inverse = self._kernel_update(x, update)
        return kernels().channel_norm(
            x, self.weight, self.bias, self.var_weight, plan.groups, plan.mean_extended[0],
            list(plan.std_extended), plan.subtracted, self.eps if self.eps > 0 else UNIT_EPS,
            mean_buffers[0], var_buffers, factor, inverse)

    def _cell_kernel_route(self, x, use_batch, update):
        """Per-example statistics on a small CPU input: the fused C++ kernel (:mod:`.native`)."""
        if not x.is_contiguous():
            return self._cell_route(x, use_batch, update)
        factor, mean_buffers, var_buffers, inverse = self._kernel_update(x, update)
        return kernels().cell_norm(
            x, self.weight, self.bias, self.mean_weight, self.var_weight, list(self.mean_sets),
            list(self.std_sets), self.mean_groups, self.std_groups,
            self.std_center == "subtracted", self.eps, mean_buffers, var_buffers, factor,
            inverse)

    def _kernel_update(self, x, update):
        """The C++ kernels' running-statistics arguments: weight, buffers per set, Bessel's."""
        if not update:
            return (0.0, [None] * len(self.mean_sets), [None] * len(self.std_sets),
                    [1.0] * len(self.std_sets))
        tracked = self.num_batches_tracked
        if tracked is not None:
            tracked.add_(1)
        # a layer of per-example sets only keeps no running statistics: no count, no factor
        factor = (self.momentum if self.momentum is not None
                  else 0.0 if tracked is None else 1.0 / max(int(tracked), 1))
        means = [None if name is None else self._buffers[name] for name in self._mean_buffers]
        variances = [None if name is None else self._buffers[name] for name in self._var_buffers]
        if self.std_center == "subtracted" and self.mean_weight is not None:
            # the deviations' Bessel factor depends on the mixture of means being learned
            shares = torch.softmax(self.mean_weight.detach(), 0)
            return factor, means, variances, [1.0 / float(f)
                                              for f in fractions(self, x.shape, shares)]
        key = ("kernel", x.shape)
        inverse = self._shapes.get(key)
        if inverse is None:
            inverse = self._shapes[key] = [1.0 / f for f in fractions(self, x.shape, None)]
        return factor, means, variances, inverse

    def _function_route(self, x, use_batch, update):
        """Per-channel statistics: one autograd Function (:mod:`statscope.nn.channel`)."""
        if update:
            self.num_batches_tracked.add_(1)
        return channel_norm(self, x, update)

    def _cell_route(self, x, use_batch, update):
        """Per-example statistics: one autograd Function (:mod:`statscope.nn.cells`); a bfloat16
        ``x`` takes the plain ops in float32 instead: the Function's bfloat16 arithmetic lost
        channels far from 0 (SN of an input with mean 100 and std 0.5: outputs off by 1.5, a
        constant channel's by 4, where torch's BatchNorm in bfloat16 is off by 0.02)."""
        if x.dtype == torch.bfloat16:
            return self._plain_route(x, use_batch, update)
        if update and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return cell_norm(self, x, use_batch, update)

    def _running_route(self, x, use_batch, update):
        """Eval with one running buffer per side: BatchNorm's inference op."""
        return torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                                False, 0.0, self.eps, torch.backends.cudnn.enabled)

    def _widened_route(self, x, use_batch, update):
        """An input narrower than the layer (bfloat16 activations into a float32 layer under
        autocast): widened to the layer's dtype first, so that its statistics are computed in
        that dtype, not in the input's before type promotion (running variances off by 5e-3)."""
        wide = x.to(self._dtype())
        route = self._routes.get((wide.shape, wide.dtype, use_batch))
        if route is None:
            route = self._choose_route(wide, use_batch)
        return route(wide, use_batch, update)

    def _plain_route(self, x, use_batch, update):
        """The plain ops (:func:`~statscope.nn.algebra.plain_forward`); a float16 or bfloat16
        ``x`` in float32, the output cast back to the dtype their arithmetic would give. Variances
        and the per-channel sums of the backward overflow float16's 65504 where torch's norms,
        which accumulate in float32, do not: a std of 300 (variance 9e4) normalized every
        value to β and gave (BN, BN+EN) NaN, a std of 30 over 25600 pixels a channel an inf
        gradient. Running statistics go to the buffers in their own dtype."""
        if x.dtype not in _HALF:
            return plain_forward(self, x, self.weight, self.bias, self.mean_weight,
                                 self.var_weight, use_batch, update)
        dtype = self._dtype()
        out = x.dtype if dtype is None else torch.promote_types(x.dtype, dtype)

        def wide(t):
            return None if t is None else t.float()

        y = plain_forward(self, x.float(), wide(self.weight), wide(self.bias),
                          wide(self.mean_weight), wide(self.var_weight), use_batch, update)
        return y.to(out)

    def _torch_op(self, x, use_batch, update):
        """The norm as the torch op it is (BN, IN, LN or GN), BatchNorm's running statistics too."""
        kind = self._torch_norm
        cudnn = torch.backends.cudnn.enabled
        if kind == "batch_norm":
            factor = 0.0
            if update:
                self.num_batches_tracked.add_(1)
                factor = (self.momentum if self.momentum is not None
                          else 1.0 / float(self.num_batches_tracked))
            return torch.batch_norm(x, self.weight, self.bias, self.running_mean,
                                    self.running_var, use_batch, factor, self.eps, cudnn)
        if kind == "layer_norm" and x.dim() == 2:
            return torch.layer_norm(x, (self.num_features,), self.weight, self.bias, self.eps,
                                    cudnn)
        # LN on (N, C, *S) is GroupNorm(1, C); IN is GroupNorm(C, C), which keeps channels_last
        # and runs 2-3x faster on CPU than torch.instance_norm (a BatchNorm of N·C channels)
        groups = {"group_norm": self.std_groups, "layer_norm": 1}.get(kind, self.num_features)
        if not x.is_contiguous():
            # CUDA's GroupNorm kernel takes contiguous inputs only (torch 2.11: "Expected
            # X.is_contiguous(memory_format)"); the CPU's takes channels_last but sums x and x²
            # there in one pass, which loses the variance of channels far from 0 (offset 1e4,
            # std 1, float32: outputs off by 1e3; torch.nn.GroupNorm shares that, its
            # InstanceNorm2d does not). The output keeps the input's format
            fmt = _memory_format(x)
            y = torch.group_norm(x.contiguous(), groups, self.weight, self.bias, self.eps, cudnn)
            return y if fmt is None else y.contiguous(memory_format=fmt)
        return torch.group_norm(x, groups, self.weight, self.bias, self.eps, cudnn)
