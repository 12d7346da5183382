"""The BatchNorm fast path: record the statistics a training-mode BatchNorm computes itself.

A probe on the input of a ``torch.nn`` BatchNorm (``BatchNorm1d/2d/3d`` and their lazy forms, or a
subclass that keeps ``_BatchNorm.forward``) in training mode records what BatchNorm already
computed: the per-channel batch mean and inverse standard deviation ``1/√(var + eps)`` that
``torch._batch_norm_impl_index`` returns beside the output (on CUDA from cuDNN or torch's own
kernels, the tensors backward uses). The probe then costs no pass over the activation and no
kernel: it keeps the two (C,) tensors, stacked per block when the block is handed over (on the
CPU by the training thread: :func:`statscope.probes.reduce.stack_entries`). On the CPU, once
:mod:`statscope.native` is built, the training forward and the probe are one C++ call
(``statscope/csrc/bn_probe.cpp``: the twin of :func:`_train_forward`, checked against torch as
it is, by :func:`native_forward_is_exact`), which copies the statistics into the block's buffer
(:class:`statscope.probes.segments.BnRows`), stacked already, and leaves every case but the
common one to the Python mirror and probe.

The module's ``forward`` is replaced by :func:`batchnorm_forward`, a mirror of
``_BatchNorm.forward`` and ``F.batch_norm`` that calls ``torch._batch_norm_impl_index`` where
``torch.batch_norm`` would (``torch.batch_norm`` is that call's first output) and makes six
Python calls, its probe and ``torch.compile`` check included, where torch's makes eleven (it
reads parameters and buffers from the module's dicts and calls torch's input checks only where
they can fail), so outputs, gradients, running statistics (momentum ``None`` included) and
``num_batches_tracked`` are bit-identical to an unprobed layer's. :func:`mirror_is_exact` checks
this once per process against torch's own forward for every combination of ``momentum``,
``affine`` and ``track_running_stats``; where it fails, no probe takes the fast path.

Everything else takes the generic path (:mod:`statscope.probes.reduce`): eval-mode forwards
(``record_eval=True``), forwards under ``torch.compile`` (moments computed in the graph:
:mod:`statscope.probes.compiled`), tensor subclasses, ``SyncBatchNorm`` and other subclasses
with a ``forward`` of their own (timm's ``BatchNormAct2d``), ``mechanism="hooks"``, a probe whose
``channel_dim`` is not 1, and every probe when a recorded statistic needs the third or fourth
moment (``bn_kurt``).

The variance is recovered on the writer thread in float64 as ``1/invstd² − eps``, which adds
about 1e-7 of ``√(var + eps)`` to BatchNorm's own error: the stored ``bn_std`` is good to ~1e-6 of
itself while ``var ≥ 100·eps`` and to ~6e-5 of itself down to ``1e-3·eps``; below, the probe
reduces its input itself once the writer has seen such a channel (``Capture.reduce_bn``,
:func:`statscope.rows.near_eps`), as it does on the CPU for a channel whose |mean| is more than
300 × √(var + eps) (:func:`statscope.rows.far_mean`: a float32 sum loses the mean's digits).
On the CPU, before the writer's first advice, the probe makes both tests itself at its first
step from BatchNorm's (C,) statistics (:func:`statscope.probes.reduce.reduce_before_advice`), so
that a layer near eps or far from zero from the start is right from the first step. Where
torch's CPU kernel sums in float32 (channels_last, ``(N, C)`` and low-precision inputs), the mean
comes from one extra sum of the input and large inputs are reduced generically
(:func:`statscope.probes.reduce.batchnorm_entry`). Where BatchNorm's own float32 variance
overflowed (deviations beyond ~1e19; its output is meaningless too), ``invstd`` is 0 and
``bn_std`` reads inf until the writer's advice, after which the probe reduces its input itself,
as for any variance above :data:`statscope.rows.OVERFLOW_VAR`.
"""

from __future__ import annotations

import threading
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import has_torch_function_variadic

from statscope.probes.selection import Target

__all__ = ["BatchStats", "batchnorm_forward", "eligible", "probe_path", "mirror_is_exact",
           "PATHS"]

PATHS = ("batchnorm", "generic")
"""Values of a probe's ``path`` in the store: how its statistics were computed."""

_BATCH_NORM_FORWARD = nn.modules.batchnorm._BatchNorm.forward
_impl = torch._batch_norm_impl_index
_verify_batch_size = F._verify_batch_size
# what the fast path reads from the module's dicts: a class attribute of these names (a
# property, say) would take precedence over them
_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_cudnn_enabled = torch._C._get_cudnn_enabled  # what ``torch.backends.cudnn.enabled`` returns
# the input dims torch's own ``_check_input_dim`` of each class accepts (it raises for others);
# :func:`mirror_is_exact` checks this table against those functions
_DIMS = {nn.BatchNorm1d._check_input_dim: (2, 3), nn.LazyBatchNorm1d._check_input_dim: (2, 3),
         nn.BatchNorm2d._check_input_dim: (4,), nn.LazyBatchNorm2d._check_input_dim: (4,),
         nn.BatchNorm3d._check_input_dim: (5,), nn.LazyBatchNorm3d._check_input_dim: (5,)}
# what the C++ training forward reads from the module's own __dict__
_INSTANCE = ("_parameters", "_buffers", "track_running_stats", "momentum", "eps")
_check: dict[str, bool] = {}
_check_lock = threading.Lock()


class BatchStats(NamedTuple):
    """What a training-mode BatchNorm computed for one forward, handed to the probe.

    Attributes:
        input: the layer's input (for the element count and shape checks; not read).
        mean: (C,) batch mean, float32 (float64 for float64 inputs).
        invstd: (C,) ``1/√(var + eps)``, var the biased (population) batch variance.
        eps: the layer's eps.
    """

    input: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor
    eps: float

    @property
    def device(self) -> torch.device:
        return self.input.device


def eligible(module: nn.Module) -> bool:
    """True when ``module``'s forward is torch's ``_BatchNorm.forward`` and the mirror is exact."""
    return (isinstance(module, nn.modules.batchnorm._BatchNorm)
            and not isinstance(module, nn.SyncBatchNorm)
            and type(module).forward is _BATCH_NORM_FORWARD
            and "forward" not in module.__dict__
            and not any(name in vars(k) for k in type(module).__mro__ for name in _STATE)
            and mirror_is_exact())


def probe_path(target: Target, order: int, mechanism: str) -> str:
    """``"batchnorm"`` when ``target`` takes the fast path, else ``"generic"``.

    Args:
        target: the probed tensor.
        order: the highest moment the recorded statistics need (2 or 4).
        mechanism: how probes attach (``"forward"`` or ``"hooks"``).
    """
    if (target.where == "input" and mechanism == "forward" and order <= 2
            and target.channel_dim == 1 and eligible(target.module)):
        return "batchnorm"
    return "generic"


def native_dims(module: nn.Module) -> tuple[int, ...] | None:
    """The input dims the C++ training forward (``native.make_bn_forward``) accepts for
    ``module``'s class (torch's own ``_check_input_dim``: :data:`_DIMS`), or None where it reads
    nothing of this module: a class that defines one of the attributes it reads from the
    instance's dict (a property would take precedence over it)."""
    cls = type(module)
    dims = _DIMS.get(cls._check_input_dim)
    if dims is None or any(name in vars(k) for k in cls.__mro__ for name in _INSTANCE):
        return None
    return dims


def native_forward_is_exact(native) -> bool:
    """Whether the C++ twin of :func:`_train_forward` (``native.batchnorm_train``) reproduces
    this torch's ``_BatchNorm.forward`` bit for bit, checked once per process as
    :func:`mirror_is_exact` checks the Python one."""
    if "native" not in _check:
        python_exact = mirror_is_exact()  # takes _check_lock itself
        with _check_lock:
            if "native" not in _check:
                _check["native"] = python_exact and _compare_with_torch(
                    lambda m, t: native.batchnorm_train(m, t, native_dims(m)))
    return _check["native"]


def batchnorm_forward(probe: list, generic: Callable, inner: Callable,
                      owner: int) -> Callable:
    """A ``forward(self, *args, **kwargs)`` for an :func:`eligible` BatchNorm ``self`` (bind it
    with ``types.MethodType``) that hands BatchNorm's own statistics to ``probe[0]``.

    Args:
        probe: ``[function, forward]``, read at each call: the function is called as
            ``probe[0](self, input, mean, invstd)`` after a training-mode forward (the fields of
            :class:`BatchStats` but eps, which is ``self.eps``); ``forward``, None or
            ``forward(self, input)``, does both in one C++ call (``native.make_bn_forward``:
            the layer's output, or None, having done nothing, where this function's own
            mirror must run). The recorder puts its C++ probe and forward there once built.
        generic: called as ``generic(self, args)`` before any other forward (the generic
            path's probe, safe under ``torch.compile``).
        inner: the module's forward as ``inner(self, *args, **kwargs)``, for the calls the fast
            path does not take.
        owner: ``id`` of the probed module; any other ``self`` (a deep copy of it) runs
            ``inner`` alone, as does a forward that ``torch.jit.trace`` records.
    """
    is_compiling, tracing = torch.compiler.is_compiling, torch._C._get_tracing_state
    Tensor = torch.Tensor

    def forward(self, *args, **kwargs):
        if id(self) != owner or tracing():
            return inner(self, *args, **kwargs)
        if (len(args) != 1 or kwargs or not self.training or is_compiling()
                or type(args[0]) is not Tensor):
            generic(self, args or tuple(kwargs.values()))
            return inner(self, *args, **kwargs)
        native = probe[1]
        if native is not None:
            out = native(self, args[0])
            if out is not None:
                return out
        out, mean, invstd = _train_forward(self, args[0])
        if mean is None:  # a tensor subclass among the parameters: torch's own path
            generic(self, args)
            return inner(self, *args)
        probe[0](self, args[0], mean, invstd)
        return out

    return forward


def _train_forward(m, input):
    """``_BatchNorm.forward`` in training mode, with BatchNorm's saved statistics.

    Keep this a mirror of torch's code (torch/nn/modules/batchnorm.py, ``F.batch_norm``):
    :func:`mirror_is_exact` compares the two bit for bit. It reads the parameters and buffers
    from the module's own dicts, not through ``nn.Module.__getattr__`` (a Python call each: torch
    makes six per forward), checks the input's dims against :data:`_DIMS` where the class's
    check is torch's own, and calls ``_verify_batch_size`` only where it can raise: each Python
    call costs a launch-bound step several times its ``timeit`` figure (docs/performance.md).
    A name missing from the dicts (a parametrized weight, say) is read as torch reads it.
    """
    params, buffers = m._parameters, m._buffers
    weight = params["weight"] if "weight" in params else m.weight
    bias = params["bias"] if "bias" in params else m.bias
    track = m.track_running_stats
    if track:
        running_mean = buffers["running_mean"] if "running_mean" in buffers else m.running_mean
        running_var = buffers["running_var"] if "running_var" in buffers else m.running_var
    else:
        running_mean = running_var = None
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return None, None, None
    ndim = input.dim()
    dims = _DIMS.get(type(m)._check_input_dim)
    if dims is None or ndim not in dims:
        m._check_input_dim(input)
    momentum = m.momentum
    exponential_average_factor = 0.0 if momentum is None else momentum
    if track:
        tracked = buffers["num_batches_tracked"] if "num_batches_tracked" in buffers \
            else m.num_batches_tracked
        if tracked is not None:
            tracked.add_(1)
            if momentum is None:  # cumulative moving average
                exponential_average_factor = 1.0 / float(tracked)
    if ndim < 2 or input.numel() == input.shape[1]:  # else more than 1 value per channel
        _verify_batch_size(input.size())
    eps = m.eps
    if eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    out, mean, invstd, _, _ = _impl(input, weight, bias, running_mean, running_var, True,
                                    exponential_average_factor, eps, _cudnn_enabled())
    return out, mean, invstd


def mirror_is_exact() -> bool:
    """Whether :func:`_train_forward` reproduces this torch's ``_BatchNorm.forward`` bit for bit
    (outputs, input and weight gradients, running buffers, ``num_batches_tracked``), for every
    combination of ``momentum`` (0.1, None), ``affine`` and ``track_running_stats``. Checked
    once per process, on the CPU."""
    if "ok" not in _check:
        with _check_lock:
            if "ok" not in _check:
                _check["ok"] = _compare_with_torch()
    return _check["ok"]


def _compare_with_torch(train: Callable | None = None) -> bool:
    # whatever the caller's context: grad mode, inference mode, autocast, torch function modes
    # such as ``with torch.device(...)`` (under which each forward takes torch's own path), and
    # default dtype and device (explicit below)
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False), \
            torch._C.DisableTorchFunction():
        try:
            return _compare(train or _train_forward)
        except Exception:  # noqa: BLE001 - anything unexpected means "not provably identical"
            return False


def _compare(train: Callable) -> bool:
    if _cudnn_enabled() != torch.backends.cudnn.enabled:
        return False
    for check, dims in _DIMS.items():
        for ndim in range(7):
            try:
                check(None, torch.zeros((1,) * ndim))
            except ValueError:
                if ndim in dims:
                    return False
            else:
                if ndim not in dims:
                    return False
    gen = torch.Generator().manual_seed(0)
    kw = {"dtype": torch.float32, "device": "cpu"}
    xs = [torch.randn(5, 3, 2, generator=gen, **kw) * 2 + 1 for _ in range(3)]
    for momentum in (0.1, None):
        for affine in (True, False):
            for track in (True, False):
                ref = nn.BatchNorm1d(3, momentum=momentum, affine=affine,
                                     track_running_stats=track, **kw)
                if affine:
                    with torch.no_grad():
                        ref.weight.uniform_(0.5, 1.5, generator=gen)
                        ref.bias.uniform_(-0.5, 0.5, generator=gen)
                ours = nn.BatchNorm1d(3, momentum=momentum, affine=affine,
                                      track_running_stats=track, **kw)
                ours.load_state_dict(ref.state_dict())
                for x in xs:
                    got = _run(ours, x, lambda m, t: (train(m, t) or (None,))[0])
                    want = _run(ref, x, lambda m, t: m(t))
                    if got is None or not all(_same(a, b) for a, b in zip(got, want)):
                        return False
    return True


def _run(module, x, call):
    x = x.clone().requires_grad_(True)
    out = call(module, x)
    if out is None:
        return None
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
    grads = [x.grad] + [p.grad for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return [out.detach(), *grads, *(b.clone() for b in module.buffers())]


def _same(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(
        torch.equal(a, b) if not a.is_floating_point()
        else torch.equal(torch.nan_to_num(a, 0.0), torch.nan_to_num(b, 0.0))
        and torch.equal(a.isnan(), b.isnan()))
