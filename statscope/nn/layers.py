"""The normalization layers: heterologous (one mean set, one std set) and switchable mixtures.

Both normalize ``x`` of shape ``(N, C, *S)`` as ``y = γ (x - μ) / sqrt(σ² + eps) + β`` (paper
eq. 1-2) where μ is a (softmax-weighted mix of) set mean(s) and σ² a (mix of) set variance(s).

Running statistics are kept for every set that pools over the batch ("batch", "extended"), in
buffers of shape ``(C,)``: a per-group statistic of an extended set is stored repeated for each
channel of its group, so eval-mode normalization and :func:`statscope.nn.fuse` treat every set
alike. The first such set on the mean side is ``running_mean``, on the std side ``running_var``;
any further one is ``running_mean_<set>`` / ``running_var_<set>``. Sets that are per example
("instance", "layer", "group") are computed at inference, as in the paper.
"""

import math

import torch
from torch import nn
from torch.compiler import is_compiling as compiling

from statscope.errors import StatscopeError
from statscope.nn.algebra import mix
from statscope.nn.channel import ChannelPlan
from statscope.nn.moments import (BATCH_SETS, GROUPED_SETS, STD_CENTERS, check_groups, check_set,
                                  describe, plain_number, set_average, set_size)
from statscope.nn.routes import Routes

__all__ = ["HeteroNorm", "SwitchableNorm", "is_norm_layer"]

# a lone pair of equal sets that is exactly one of torch's norms: (mean set, std set) -> op
_TORCH_NORMS = {"batch": "batch_norm", "instance": "instance_norm", "layer": "layer_norm",
                "group": "group_norm"}


class _PixelSetNorm(Routes, nn.Module):
    """Shared machinery: parameters, buffers, routes, running statistics, inference affine.

    ``forward`` takes one route (:class:`~statscope.nn.routes.Routes`) per input shape, dtype
    and mode (chosen once, then cached), all giving the same values, gradients and running
    statistics (docs/nn.md, *Performance*):

    - a norm that is exactly one of torch's (BN, IN, LN, GN: one set, equal on both sides) calls
      torch's own op;
    - a norm whose statistics are all per channel (EN, HN, their _G forms, (BN, BN+EN)) runs in
      training as two BatchNorm calls on small inputs (:mod:`statscope.nn.composed`) or as one
      autograd Function (:mod:`statscope.nn.channel`), and in eval, where one buffer per side
      holds its statistics, as BatchNorm's inference op;
    - a norm with per-example statistics on feature maps runs as one autograd Function
      (:mod:`statscope.nn.cells`);
    - anything else (``(N, C)`` inputs to per-example sets, inputs wider than the layer's
      dtype) is written in plain differentiable ops (:func:`statscope.nn.algebra.plain_forward`).

    Under ``torch.compile``, ``torch.jit.trace`` and torch.func's transforms (``grad``,
    ``vmap``, ``jacrev``, ...) every norm but torch's takes the plain ops, uncached
    (:meth:`~statscope.nn.routes.Routes._traceable_route`).
    """

    def __init__(self, num_features, mean_sets, std_sets, mean_groups, std_groups, eps, momentum,
                 affine, track_running_stats, std_center, device, dtype,
                 group_names=("mean_groups", "std_groups")):
        super().__init__()
        mean_name, std_name = group_names
        # NumPy's scalars are numbers too (torch's BatchNorm takes them, and convert passes
        # its sizes and eps on); they are kept as Python's
        size = plain_number(num_features, integral=True)
        if size is None or size < 1:
            raise StatscopeError(f"num_features={num_features!r}: expected a positive int")
        num_features = size
        if not mean_sets or not std_sets:
            raise StatscopeError(f"mean_sets={mean_sets!r}, std_sets={std_sets!r}: expected at "
                                 f"least one pixel set on each side")
        for argument, sets in (("mean_sets", mean_sets), ("std_sets", std_sets)):
            if isinstance(sets, str):  # a name's letters are no sets
                raise StatscopeError(f"{argument}={sets!r}: expected a sequence of pixel sets, "
                                     f"e.g. ({sets!r},)")
        self.mean_sets = tuple(check_set(s, "mean_set") for s in mean_sets)
        self.std_sets = tuple(check_set(s, "std_set") for s in std_sets)
        for argument, sets in (("mean_sets", self.mean_sets), ("std_sets", self.std_sets)):
            if len(set(sets)) != len(sets):
                raise StatscopeError(f"{argument}={sets!r}: a pixel set is listed twice")
        # groups only matter (and are only checked) where a grouped set uses them
        self.mean_groups = (check_groups(mean_groups, num_features, mean_name)
                            if GROUPED_SETS.intersection(self.mean_sets) else mean_groups)
        self.std_groups = (check_groups(std_groups, num_features, std_name)
                           if GROUPED_SETS.intersection(self.std_sets) else std_groups)
        eps_value = plain_number(eps)
        if eps_value is None or not 0 < eps_value < math.inf:
            # with eps = 0 a pixel set whose values are all equal divides 0 by 0: torch's own
            # norms answer NaN (LayerNorm, GroupNorm) or 0 (BatchNorm) there, so the routes
            # would disagree; torch's BatchNorm refuses eps <= 0 in training as well
            raise StatscopeError(f"eps={eps!r}: expected a positive finite float (with eps = 0 "
                                 f"a pixel set whose values are all equal divides 0 by 0)")
        momentum_value = None if momentum is None else plain_number(momentum)
        if momentum is not None and (momentum_value is None or not 0 <= momentum_value <= 1):
            raise StatscopeError(f"momentum={momentum!r}: expected a float in [0, 1] or None "
                                 f"(cumulative average)")
        if std_center not in STD_CENTERS:
            raise StatscopeError(f"std_center={std_center!r}: expected one of "
                                 f"{', '.join(STD_CENTERS)}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            # torch's own message ("Only Tensors of floating point and complex dtype can
            # require gradients") names neither the argument nor the norm
            raise StatscopeError(f"dtype={dtype!r}: expected a floating-point torch.dtype "
                                 f"(torch.float32, torch.float64, torch.bfloat16, "
                                 f"torch.float16) for the parameters and running statistics")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps_value
        self.momentum = momentum_value
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.std_center = std_center
        self.norm_name = None
        self._per_example = any(s not in BATCH_SETS for s in self.mean_sets + self.std_sets)
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.mean_weight = (nn.Parameter(torch.ones(len(self.mean_sets), **factory))
                            if len(self.mean_sets) > 1 else None)
        self.var_weight = (nn.Parameter(torch.ones(len(self.std_sets), **factory))
                           if len(self.std_sets) > 1 else None)
        self._mean_buffers = self._buffer_names(self.mean_sets, "running_mean")
        self._var_buffers = self._buffer_names(self.std_sets, "running_var")
        for name in filter(None, self._mean_buffers):
            self.register_buffer(name, torch.zeros(num_features, **factory))
        for name in filter(None, self._var_buffers):
            self.register_buffer(name, torch.ones(num_features, **factory))
        for name in ("running_mean", "running_var"):
            if not hasattr(self, name):
                self.register_buffer(name, None)
        if any(self._mean_buffers + self._var_buffers):
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("num_batches_tracked", None)
        self._torch_norm = self._torch_equivalent()
        self._plan = self._channel_plan()
        self._shapes = {}
        self._routes = {}

    def _buffer_names(self, sets, stem):
        if not self.track_running_stats:
            return (None,) * len(sets)
        names, first = [], True
        for pixel_set in sets:
            if pixel_set not in BATCH_SETS:
                names.append(None)
            else:
                names.append(stem if first else f"{stem}_{pixel_set}")
                first = False
        return tuple(names)

    def _torch_equivalent(self):
        """The name of torch's op that this norm is exactly, or None."""
        if len(self.mean_sets) != 1 or self.mean_sets != self.std_sets:
            return None
        if self.mean_sets[0] in GROUPED_SETS and self.mean_groups != self.std_groups:
            return None
        return _TORCH_NORMS.get(self.mean_sets[0])

    def _channel_plan(self):
        """The :class:`ChannelPlan` of a norm whose statistics are all per channel, or None."""
        if self._per_example:
            return None
        groups = {g for sets, g in ((self.mean_sets, self.mean_groups),
                                    (self.std_sets, self.std_groups)) if "extended" in sets}
        if len(groups) > 1:  # extended sets of different sizes on the two sides: plain ops
            return None
        return ChannelPlan(self.num_features, groups.pop() if groups else 1,
                           tuple(s == "extended" for s in self.mean_sets),
                           tuple(s == "extended" for s in self.std_sets),
                           self.std_center == "subtracted")

    def reset_running_stats(self):
        """Zero the running means, set the running variances to one, restart the count."""
        for name in filter(None, self._mean_buffers):
            getattr(self, name).zero_()
        for name in filter(None, self._var_buffers):
            getattr(self, name).fill_(1)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.zero_()

    def reset_parameters(self):
        """Reset running statistics, γ = 1, β = 0 and the mixture weights to ones."""
        self.reset_running_stats()
        for param, value in ((self.weight, 1), (self.bias, 0), (self.mean_weight, 1),
                             (self.var_weight, 1)):
            if param is not None:
                nn.init.constant_(param, value)

    def _label(self):
        return self.norm_name or f"{type(self).__name__}{self.mean_sets}/{self.std_sets}"

    def _check_input(self, x, shape=None):
        """Refuse what is not a floating-point ``(N, C, *S)`` tensor; ``shape`` is ``x.shape``
        (static ints under ``torch.jit.trace``)."""
        if not isinstance(x, torch.Tensor):
            kind = type(x).__qualname__
            if type(x).__module__ != "builtins":
                kind = f"{type(x).__module__}.{kind}"
            raise StatscopeError(f"input x of type {kind}: {self._label()} expected a "
                                 f"floating-point torch.Tensor (N, C, *S); convert it with "
                                 f"torch.as_tensor")
        if not x.is_floating_point():
            raise StatscopeError(f"input dtype {x.dtype}: {self._label()} expected a "
                                 f"floating-point tensor")
        shape = x.shape if shape is None else shape
        if not 2 <= len(shape) <= 5 or shape[1] != self.num_features:
            raise StatscopeError(
                f"input shape {tuple(shape)}: {self._label()} expected (N, C), (N, C, L), "
                f"(N, C, H, W) or (N, C, D, H, W) with C = num_features = {self.num_features}")

    def _check_sizes(self, shape, use_batch):
        """Every set whose statistics this call computes must hold at least 2 pixels."""
        for sets, groups, buffers in ((self.mean_sets, self.mean_groups, self._mean_buffers),
                                      (self.std_sets, self.std_groups, self._var_buffers)):
            for pixel_set, name in zip(sets, buffers):
                if (use_batch or name is None) and set_size(shape, pixel_set, groups) < 2:
                    raise StatscopeError(
                        f"input shape {tuple(shape)}: norm {self._label()} needs pixel set "
                        f"{pixel_set!r} ({describe(pixel_set)}), which has 1 pixel per set for "
                        f"this shape; expected at least 2")

    def forward(self, x):
        """Normalize ``x``.

        Args:
            x: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` (any memory format) or
                ``(N, C, D, H, W)``, floating point. An empty ``x`` (N = 0) gives an empty
                output and changes no running statistic.

        Returns:
            Tensor: same shape, dtype and memory format as ``x`` (a dtype other than the
            layer's is promoted with it, as ``addcmul`` promotes).

        Raises:
            StatscopeError: ``x`` is not a floating-point tensor of one of these shapes, a
                pixel set has one pixel for its shape, or running statistics would be updated
                under a torch.func transform.
        """
        if not isinstance(x, torch.Tensor):
            self._check_input(x)  # raises, naming the type received
        use_batch = self.training or not self.track_running_stats
        update = self.training and self.track_running_stats
        if compiling():
            return self._traceable_route(x, x.shape, use_batch, update)
        # torch.func's grad, vmap, jacrev, ...; torch.jit.trace
        if torch._C._are_functorch_transforms_active() or torch.jit.is_tracing():
            return self._transformed_route(x, use_batch, update)
        if x.numel() == 0:
            self._check_input(x)
            return self._empty(x)
        route = self._routes.get((x.shape, x.dtype, use_batch))
        if route is None:
            route = self._choose_route(x, use_batch)
        return route(x, use_batch, update)

    def _empty(self, x):
        """An empty batch (N = 0 or a spatial size 0: a detection head without boxes, a short
        shard): an empty output that keeps the graph, running statistics and
        ``num_batches_tracked`` left as they are (torch's BatchNorm counts such a batch)."""
        out = x * 0
        if self.weight is not None:  # the dtype an affine layer's output promotes to
            out = out.to(torch.result_type(out, self.weight))
        return out

    def _apply(self, fn, *args, **kwargs):
        # routes and constants depend on the parameters' dtype and device
        self._routes.clear()
        self._shapes.clear()
        return super()._apply(fn, *args, **kwargs)

    @property
    def fusable(self):
        """bool: whether eval-mode output is a fixed per-channel affine map of the input."""
        return all(name is not None for name in self._mean_buffers + self._var_buffers)

    @torch.no_grad()
    def inference_affine(self):
        """Per-channel ``(scale, shift)`` with ``y = x * scale + shift`` in eval mode.

        Returns:
            tuple[Tensor, Tensor] | None: two ``(C,)`` tensors, or None when some statistic is
            computed per example at inference (IN, LN, GN sets) or not tracked.
        """
        if not self.fusable:
            return None
        mean = mix([getattr(self, n) for n in self._mean_buffers],
                         None if self.mean_weight is None else torch.softmax(self.mean_weight, 0))
        var = mix([getattr(self, n) for n in self._var_buffers],
                        None if self.var_weight is None else torch.softmax(self.var_weight, 0))
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return scale.detach().clone(), shift.detach().clone()

    @torch.no_grad()
    def load_batchnorm_stats(self, running_mean, running_var, num_batches_tracked=None):
        """Set the running statistics from a BatchNorm's per-channel ones.

        A batch set takes them as they are. An extended set takes the group average of the
        running means, and for its variance the law of total variance on the population
        statistics: the group average of the running variances plus, with ``std_center="own"``,
        the spread of the running means around their group mean (with ``"subtracted"`` the
        per-channel means are the centre, so that term is zero). Per-example sets have no
        running statistics and are left alone.

        Args:
            running_mean: ``(C,)``.
            running_var: ``(C,)``, unbiased, as BatchNorm keeps it.
            num_batches_tracked: scalar long tensor, or None to leave the count alone.
        """
        rm = running_mean.detach().reshape(1, self.num_features)
        rv = running_var.detach().reshape(1, self.num_features)
        for pixel_set, name in zip(self.mean_sets, self._mean_buffers):
            if name is not None:
                value = set_average(rm, pixel_set, self.mean_groups)
                getattr(self, name).copy_(value.expand(1, self.num_features).reshape(-1))
        for pixel_set, name in zip(self.std_sets, self._var_buffers):
            if name is not None:
                spread = (rm - set_average(rm, pixel_set, self.std_groups)).square()
                cells = rv + spread if self.std_center == "own" else rv
                value = set_average(cells, pixel_set, self.std_groups)
                getattr(self, name).copy_(value.expand(1, self.num_features).reshape(-1))
        if num_batches_tracked is not None and self.num_batches_tracked is not None:
            self.num_batches_tracked.copy_(num_batches_tracked)

    def extra_repr(self):
        groups = ""
        if any(s in GROUPED_SETS for s in self.mean_sets):
            groups += f", mean_groups={self.mean_groups}"
        if any(s in GROUPED_SETS for s in self.std_sets):
            groups += f", std_groups={self.std_groups}"
        return (f"{self.num_features}, mean={'+'.join(self.mean_sets)}, "
                f"std={'+'.join(self.std_sets)}{groups}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, std_center={self.std_center!r}")


class HeteroNorm(_PixelSetNorm):
    """Heterologous normalization: the mean from one pixel set, the std from another (paper §3).

    Homologous norms are the case ``mean_set == std_set``: ("batch", "batch") is BatchNorm,
    ("instance", "instance") InstanceNorm, ("layer", "layer") LayerNorm over (C, *S) with
    per-channel affine, ("group", "group") GroupNorm and ("extended", "extended") EN. The paper's
    HN is ("batch", "extended"), HN_Gn the same with ``groups=n``.

    Args:
        num_features: C, the channel dim (dim 1) of the input.
        mean_set: pixel set of the mean: "batch", "instance", "layer", "group" or "extended".
        std_set: pixel set of the std, same choices.
        groups: channel groups of the "group" and "extended" sets (1: all channels).
        mean_groups: groups of the mean set if different from ``groups``.
        std_groups: groups of the std set if different from ``groups``.
        eps: added to the variance, as in BatchNorm.
        momentum: running-statistics update ``r ← (1 - momentum) r + momentum x``; None for a
            cumulative average.
        affine: learn per-channel γ (``weight``) and β (``bias``), each ``(C,)``.
        track_running_stats: keep running statistics of the batch and extended sets and use them
            in eval mode; otherwise batch statistics are used in both modes.
        std_center: "own" (default, the paper's literal reading): the std set's deviations are
            taken around that set's own mean. "subtracted": around the mean actually subtracted,
            i.e. ``σ² = mean over the std set of (x - μ)²``. See docs/nn.md for the difference.
        device: device of parameters and buffers.
        dtype: dtype of parameters and buffers.

    Shape:
        Input ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``; output the same.

    Example:
        >>> torch.manual_seed(0) and None
        >>> hn = HeteroNorm(8, mean_set="batch", std_set="extended")
        >>> y = hn(torch.randn(4, 8, 5, 5) * 3 + 1)
        >>> bool(y.mean(dim=(0, 2, 3)).abs().max() < 1e-5)
        True
        >>> y.shape
        torch.Size([4, 8, 5, 5])
    """

    def __init__(self, num_features, mean_set="batch", std_set="extended", groups=1, *,
                 mean_groups=None, std_groups=None, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, std_center="own", device=None, dtype=None):
        super().__init__(num_features, (mean_set,), (std_set,),
                         groups if mean_groups is None else mean_groups,
                         groups if std_groups is None else std_groups,
                         eps, momentum, affine, track_running_stats, std_center, device, dtype,
                         _group_names(mean_groups, std_groups))

    @property
    def mean_set(self):
        """str: the pixel set of the mean."""
        return self.mean_sets[0]

    @property
    def std_set(self):
        """str: the pixel set of the std."""
        return self.std_sets[0]


class SwitchableNorm(_PixelSetNorm):
    """Switchable mixture: mean and variance each a softmax-weighted mix of several pixel sets.

    The defaults are Switchable Normalization (Luo et al., 2018): mean and variance each mix the
    batch, instance and layer sets, with separate learned weights ``mean_weight`` and
    ``var_weight`` initialised to ones (equal shares), each set's variance taken around its own
    mean; in eval mode the batch part uses running statistics. The paper's HN+SN combinations
    (§4.5) are ``mean_sets=("batch",)`` with ``std_sets=("batch", "extended")`` — (BN, BN+EN),
    fusable — or ``("batch", "instance", "layer")`` — (BN, BN+IN+LN).

    Args:
        num_features: C, the channel dim (dim 1) of the input.
        mean_sets: pixel sets mixed for the mean (a single set gets no weight).
        std_sets: pixel sets mixed for the variance.
        groups: channel groups of "group" and "extended" sets.
        mean_groups: groups on the mean side if different from ``groups``.
        std_groups: groups on the std side if different from ``groups``.
        eps: added to the mixed variance.
        momentum: running-statistics momentum; None for a cumulative average.
        affine: learn per-channel γ and β, each ``(C,)``.
        track_running_stats: keep running statistics of every batch and extended set.
        std_center: "own" or "subtracted", as in :class:`HeteroNorm`; "subtracted" measures
            every std set around the mixed mean.
        device: device of parameters and buffers.
        dtype: dtype of parameters and buffers.

    Shape:
        Input ``(N, C, *S)`` with 0 to 3 spatial dims; output the same. The instance set needs
        at least 2 spatial pixels.

    Example:
        >>> sn = SwitchableNorm(4)
        >>> sn(torch.randn(2, 4, 3, 3)).shape
        torch.Size([2, 4, 3, 3])
        >>> torch.softmax(sn.mean_weight, 0)
        tensor([0.3333, 0.3333, 0.3333], grad_fn=<SoftmaxBackward0>)
    """

    def __init__(self, num_features, mean_sets=("batch", "instance", "layer"),
                 std_sets=("batch", "instance", "layer"), groups=1, *, mean_groups=None,
                 std_groups=None, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 std_center="own", device=None, dtype=None):
        super().__init__(num_features, mean_sets, std_sets,
                         groups if mean_groups is None else mean_groups,
                         groups if std_groups is None else std_groups,
                         eps, momentum, affine, track_running_stats, std_center, device, dtype,
                         _group_names(mean_groups, std_groups))


def _group_names(mean_groups, std_groups) -> tuple[str, str]:
    """The arguments that gave each side its groups, for an error message about them."""
    return ("groups" if mean_groups is None else "mean_groups",
            "groups" if std_groups is None else "std_groups")


def is_norm_layer(module):
    """Whether ``module`` is one of the normalization layers of :mod:`statscope.nn`.

    Every such layer exposes ``num_features``, ``eps``, ``momentum``, ``running_mean`` and
    ``running_var`` (None when not tracked), ``mean_sets`` and ``std_sets``.

    Example:
        >>> is_norm_layer(HeteroNorm(4)), is_norm_layer(torch.nn.BatchNorm2d(4))
        (True, False)
    """
    return isinstance(module, _PixelSetNorm)

