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

import torch
from torch import nn

from statscope.errors import StatscopeError
from statscope.nn.affine import centred_affine, compiling
from statscope.nn.moments import (BATCH_SETS, GROUPED_SETS, STD_CENTERS, cell_moments,
                                  check_groups, check_set, describe, set_average, set_size)

__all__ = ["HeteroNorm", "SwitchableNorm", "is_norm_layer"]


class _PixelSetNorm(nn.Module):
    """Shared machinery: parameters, buffers, moments, running statistics, inference affine."""

    def __init__(self, num_features, mean_sets, std_sets, mean_groups, std_groups, eps, momentum,
                 affine, track_running_stats, std_center, device, dtype):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise StatscopeError(f"num_features={num_features!r}: expected a positive int")
        if not mean_sets or not std_sets:
            raise StatscopeError(f"mean_sets={mean_sets!r}, std_sets={std_sets!r}: expected at "
                                 f"least one pixel set on each side")
        self.mean_sets = tuple(check_set(s, "mean_set") for s in mean_sets)
        self.std_sets = tuple(check_set(s, "std_set") for s in std_sets)
        for argument, sets in (("mean_sets", self.mean_sets), ("std_sets", self.std_sets)):
            if len(set(sets)) != len(sets):
                raise StatscopeError(f"{argument}={sets!r}: a pixel set is listed twice")
        # groups only matter (and are only checked) where a grouped set uses them
        self.mean_groups = (check_groups(mean_groups, num_features, "groups")
                            if GROUPED_SETS.intersection(self.mean_sets) else mean_groups)
        self.std_groups = (check_groups(std_groups, num_features, "groups")
                           if GROUPED_SETS.intersection(self.std_sets) else std_groups)
        if not isinstance(eps, (int, float)) or eps < 0:
            raise StatscopeError(f"eps={eps!r}: expected a non-negative float")
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0 <= momentum <= 1):
            raise StatscopeError(f"momentum={momentum!r}: expected a float in [0, 1] or None "
                                 f"(cumulative average)")
        if std_center not in STD_CENTERS:
            raise StatscopeError(f"std_center={std_center!r}: expected one of "
                                 f"{', '.join(STD_CENTERS)}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = momentum
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

    def _check_input(self, x):
        if not 2 <= x.dim() <= 5 or x.shape[1] != self.num_features:
            raise StatscopeError(
                f"input shape {tuple(x.shape)}: {self._label()} expected (N, C), (N, C, L), "
                f"(N, C, H, W) or (N, C, D, H, W) with C = num_features = {self.num_features}")

    def _check_size(self, shape, pixel_set, groups):
        if set_size(shape, pixel_set, groups) < 2:
            raise StatscopeError(
                f"input shape {tuple(shape)}: norm {self._label()} needs pixel set {pixel_set!r} "
                f"({describe(pixel_set)}), which has 1 pixel per set for this shape; expected at "
                f"least 2")

    @staticmethod
    def _mix(stats, weight):
        if weight is None:
            return stats[0]
        mix = torch.softmax(weight, 0)
        total = mix[0] * stats[0]
        for k in range(1, len(stats)):
            total = total + mix[k] * stats[k]
        return total

    def _update(self, name, value, n_pixels=None):
        value = value.detach().expand(1, self.num_features).reshape(self.num_features)
        if n_pixels is not None:
            value = value * (n_pixels / (n_pixels - 1))
        buffer = getattr(self, name)
        if self.momentum is None:
            buffer.lerp_(value.to(buffer.dtype), 1.0 / self.num_batches_tracked.to(buffer.dtype))
        else:
            buffer.lerp_(value.to(buffer.dtype), self.momentum)

    def _statistics(self, x):
        """Mean and variance to normalize with, each broadcastable to ``(N, C)``, and the cell means.

        The cell means are ``(1, C)`` when the cells are per channel (every set pools over the
        batch, training statistics), else None.
        """
        use_batch = self.training or not self.track_running_stats
        update = self.training and self.track_running_stats
        shape = x.shape
        cells = None
        if use_batch or self._per_example:
            cells = cell_moments(x, self._per_example)
        if update and self.num_batches_tracked is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
        means = []
        for pixel_set, name in zip(self.mean_sets, self._mean_buffers):
            if name is not None and not use_batch:
                means.append(getattr(self, name).unsqueeze(0))
                continue
            self._check_size(shape, pixel_set, self.mean_groups)
            mean = set_average(cells[0], pixel_set, self.mean_groups)
            if update and name is not None:
                with torch.no_grad():
                    self._update(name, mean)
            means.append(mean)
        mean = self._mix(means, self.mean_weight)
        variances = []
        for pixel_set, name in zip(self.std_sets, self._var_buffers):
            if name is not None and not use_batch:
                variances.append(getattr(self, name).unsqueeze(0))
                continue
            self._check_size(shape, pixel_set, self.std_groups)
            cell_mean, cell_var = cells
            center = (set_average(cell_mean, pixel_set, self.std_groups)
                      if self.std_center == "own" else mean)
            var = set_average(cell_var + (cell_mean - center).square(), pixel_set, self.std_groups)
            if update and name is not None:
                with torch.no_grad():
                    self._update(name, var, set_size(shape, pixel_set, self.std_groups))
            variances.append(var)
        centre = cells[0] if cells is not None and not self._per_example else None
        return mean, self._mix(variances, self.var_weight), centre

    def forward(self, x):
        """Normalize ``x``.

        Args:
            x: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` (any memory format) or
                ``(N, C, D, H, W)``, floating point.

        Returns:
            Tensor: same shape, dtype and memory format as ``x``.
        """
        self._check_input(x)
        mean, var, centre = self._statistics(x)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        if mean.shape[0] == 1 and scale.shape[0] == 1 and not compiling():
            # per-channel statistics: one Function on BatchNorm's kernels, centred on the exact
            # channel means when the batch gives them (its backward then sums g·(x - mean));
            # under torch.compile the addcmul below can fuse with the layers around it instead
            if centre is None:
                centre = mean
                shift = torch.zeros_like(scale) if self.bias is None else self.bias
            else:
                shift = (centre - mean) * scale
                if self.bias is not None:
                    shift = shift + self.bias
            flat = [t.expand(1, self.num_features).reshape(self.num_features)
                    for t in (centre, scale, shift)]
            # BatchNorm's kernels take one dtype; mixed ones keep addcmul's type promotion
            if all(t.dtype == x.dtype for t in flat):
                return centred_affine(x, *flat)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        trailing = (1,) * (x.dim() - 2)
        scale = scale.expand(-1, self.num_features).reshape(scale.shape[0], self.num_features,
                                                            *trailing)
        shift = shift.expand(-1, self.num_features).reshape(shift.shape[0], self.num_features,
                                                            *trailing)
        return torch.addcmul(shift, x, scale)

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
        mean = self._mix([getattr(self, n) for n in self._mean_buffers], self.mean_weight)
        var = self._mix([getattr(self, n) for n in self._var_buffers], self.var_weight)
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
                         eps, momentum, affine, track_running_stats, std_center, device, dtype)

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
        super().__init__(num_features, tuple(mean_sets), tuple(std_sets),
                         groups if mean_groups is None else mean_groups,
                         groups if std_groups is None else std_groups,
                         eps, momentum, affine, track_running_stats, std_center, device, dtype)


def is_norm_layer(module):
    """Whether ``module`` is one of the normalization layers of :mod:`statscope.nn`.

    Every such layer exposes ``num_features``, ``eps``, ``momentum``, ``running_mean`` and
    ``running_var`` (None when not tracked), ``mean_sets`` and ``std_sets``.

    Example:
        >>> is_norm_layer(HeteroNorm(4)), is_norm_layer(torch.nn.BatchNorm2d(4))
        (True, False)
    """
    return isinstance(module, _PixelSetNorm)
