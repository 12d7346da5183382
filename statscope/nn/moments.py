"""Pixel sets of the normalization family (paper §3, Table 1) and their moments.

A feature map ``x`` of shape ``(N, C, *S)`` is cut into *cells*: one cell per channel (when every set
in use pools over the batch) or one cell per example and channel. Each pixel set is a union of
equally sized cells, so its mean is the average of the cell means and its variance follows from the
law of total variance::

    var_set = mean_cells(var_cell) + mean_cells((mean_cell - mean_set) ** 2)

The cell moments are computed in two passes (mean, then mean squared deviation; never
``E[x²] - E[x]²``), so an offset of 1e4 costs no precision, and the set moments are cheap operations
on ``(N, C)`` tensors.
"""

import math

import torch

from statscope.errors import StatscopeError
from statscope.nn.affine import UNIT_EPS, compiling

__all__ = ["PIXEL_SETS", "BATCH_SETS", "GROUPED_SETS", "STD_CENTERS", "check_set", "check_groups",
           "set_size", "describe", "cell_moments", "set_average"]

PIXEL_SETS = ("batch", "instance", "layer", "group", "extended")
"""Known pixel sets: BN's, IN's, LN's, GN's and EN's (paper Table 1)."""

BATCH_SETS = frozenset({"batch", "extended"})
"""Sets that pool over the examples of a batch: they keep running statistics for inference."""

GROUPED_SETS = frozenset({"group", "extended"})
"""Sets whose extent over channels is set by a number of groups."""

STD_CENTERS = ("own", "subtracted")
"""Where a std set's deviations are measured from: its own mean, or the mean actually subtracted."""

_DESCRIPTIONS = {
    "batch": "per channel, over N and the spatial dims",
    "instance": "per example and channel, over the spatial dims",
    "layer": "per example, over C and the spatial dims",
    "group": "per example, over a group of channels and the spatial dims",
    "extended": "over N, a group of channels and the spatial dims",
}


def check_set(value, argument):
    """Validate a pixel-set name.

    Args:
        value: the name received, case-insensitive.
        argument: the argument's name, for the error message.

    Returns:
        str: the lower-case set name.

    Raises:
        StatscopeError: ``value`` is not one of :data:`PIXEL_SETS`.
    """
    name = value.lower() if isinstance(value, str) else value
    if name not in PIXEL_SETS:
        raise StatscopeError(f"{argument}={value!r}: unknown pixel set; expected one of "
                             f"{', '.join(PIXEL_SETS)}")
    return name


def check_groups(groups, num_features, argument="groups"):
    """Validate a number of channel groups.

    Args:
        groups: the number of groups received.
        num_features: C, the number of channels.
        argument: the argument's name, for the error message.

    Returns:
        int: ``groups``.

    Raises:
        StatscopeError: ``groups`` is not a positive int dividing ``num_features``.
    """
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise StatscopeError(f"{argument}={groups!r}: expected a positive int")
    if num_features % groups:
        raise StatscopeError(f"{argument}={groups}: num_features={num_features} is not divisible "
                             f"by it")
    return groups


def set_size(shape, pixel_set, groups):
    """Number of pixels in one set of ``pixel_set`` for an input of ``shape``.

    Args:
        shape: input shape ``(N, C, *S)``.
        pixel_set: one of :data:`PIXEL_SETS`.
        groups: channel groups of a grouped set (ignored by the others).

    Returns:
        int: the size of each set (all sets of one kind have the same size).

    Example:
        >>> set_size((8, 64, 4, 4), "extended", 8)
        1024
    """
    n, c, spatial = shape[0], shape[1], math.prod(shape[2:])
    return {"batch": n * spatial, "instance": spatial, "layer": c * spatial,
            "group": c // groups * spatial, "extended": n * c // groups * spatial}[pixel_set]


def describe(pixel_set):
    """One line saying which pixels ``pixel_set`` pools, for error messages and docs."""
    return _DESCRIPTIONS[pixel_set]


def _channel_view(t, x):
    """``t`` of shape ``(C,)`` viewed to broadcast against ``x`` of shape ``(N, C, *S)``."""
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


class _Moments(torch.autograd.Function):
    """Biased mean and variance over ``dims`` (per-example cells) in two passes, one-pass backward.

    ``torch.var_mean`` runs Welford's update, which on CPU is several times slower than a sum;
    two passes are as exact.
    """

    @staticmethod
    def forward(x, dims):
        mean = x.mean(dims, keepdim=True)
        var = torch.sub(x, mean).square_().mean(dims, keepdim=True)
        return mean, var

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, dims = inputs
        ctx.save_for_backward(x, output[0])
        ctx.count = x.numel() // output[0].numel()

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        x, mean = ctx.saved_tensors
        if grad_mean is None:
            grad_mean = torch.zeros_like(mean)
        if grad_var is None:
            grad_var = torch.zeros_like(mean)
        slope = grad_var * (2.0 / ctx.count)
        offset = grad_mean / ctx.count - slope * mean
        return torch.addcmul(offset, x, slope), None


class _ChannelMoments(torch.autograd.Function):
    """Per-channel biased mean and variance ``(C,)`` of ``(N, C, *S)``, two passes each way.

    The backward, ``dx = (x - mean)·(2 dvar / M) + dmean / M`` with M pixels per channel, runs
    as one call of BatchNorm's inference kernel (statistics 0 and 1, weight and bias the two
    per-channel coefficients). Under ``create_graph`` it is written in differentiable ops
    instead, so double backward works.
    """

    @staticmethod
    def forward(x):
        dims = (0, *range(2, x.dim()))
        mean = x.mean(dims)
        var = torch.sub(x, _channel_view(mean, x)).square_().mean(dims)
        return mean, var

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output[0])

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        x, mean = ctx.saved_tensors
        count = x.numel() // mean.numel()
        if grad_mean is None:
            grad_mean = torch.zeros_like(mean)
        if grad_var is None:
            grad_var = torch.zeros_like(mean)
        slope, offset = grad_var * (2.0 / count), grad_mean / count
        if torch.is_grad_enabled():
            return torch.addcmul(_channel_view(offset, x), x - _channel_view(mean, x),
                                 _channel_view(slope, x))
        return torch.nn.functional.batch_norm(x, mean, torch.ones_like(mean), slope, offset,
                                              training=False, eps=UNIT_EPS)


def cell_moments(x, per_example):
    """Biased mean and variance of every cell of ``x``.

    Args:
        x: input ``(N, C, *S)``.
        per_example: cells per example and channel (True) or per channel (False).

    Returns:
        tuple[Tensor, Tensor]: ``(mean, var)``, each ``(N, C)`` if ``per_example`` else ``(1, C)``.
        An ``(N, C)`` input has one pixel per example and channel: its cells have variance 0.
    """
    if not per_example and not compiling():
        mean, var = _ChannelMoments.apply(x)
        return mean.unsqueeze(0), var.unsqueeze(0)
    if per_example and x.dim() == 2:
        return x, torch.zeros_like(x)
    # under torch.compile, plain ops that Inductor can fuse rather than our Function
    dims = tuple(range(2, x.dim())) if per_example else (0, *range(2, x.dim()))
    mean, var = _Moments.apply(x, dims)
    rows = x.shape[0] if per_example else 1
    return mean.reshape(rows, x.shape[1]), var.reshape(rows, x.shape[1])


def set_average(cells, pixel_set, groups):
    """Average a per-cell statistic over the cells of each set.

    Args:
        cells: ``(R, C)`` with R = N (cells per example and channel) or R = 1 (cells per channel).
        pixel_set: one of :data:`PIXEL_SETS`.
        groups: channel groups of a grouped set (ignored by the others).

    Returns:
        Tensor: broadcastable to ``(N, C)``: ``(1, C)`` for batch, ``(R, C)`` for instance,
        ``(R, 1)`` for layer, ``(R, C)`` or ``(R, 1)`` (one group) for group and extended.

    Example:
        >>> set_average(torch.tensor([[1.0, 3.0, 5.0, 7.0]]), "extended", 2)
        tensor([[2., 2., 6., 6.]])
    """
    if pixel_set in BATCH_SETS:
        cells = cells.mean(0, keepdim=True)
    if pixel_set == "layer" or (pixel_set in GROUPED_SETS and groups == 1):
        return cells.mean(1, keepdim=True)
    if pixel_set in GROUPED_SETS and groups < cells.shape[1]:
        rows, channels = cells.shape
        grouped = cells.reshape(rows, groups, channels // groups).mean(2, keepdim=True)
        return grouped.expand(rows, groups, channels // groups).reshape(rows, channels)
    return cells
