"""Pixel sets of the normalization family (paper §3, Table 1) and their moments in plain torch ops.

A feature map ``x`` of shape ``(N, C, *S)`` is cut into *cells*: one cell per channel (when every set
in use pools over the batch) or one cell per example and channel. Each pixel set is a union of
equally sized cells, so its mean is the average of the cell means and its variance follows from the
law of total variance::

    var_set = mean_cells(var_cell) + mean_cells((mean_cell - mean_set) ** 2)

The cell moments are computed in two passes (mean, then mean squared deviation; never
``E[x²] - E[x]²``), so an offset of 1e4 costs no precision, and the set moments are cheap operations
on ``(N, C)`` tensors. Everything here is ordinary differentiable torch: it is the general path of
the layers (any pair of sets, mixtures, ``torch.compile``, double backward); the norms that are
exactly torch's or whose statistics are all per channel take faster routes (``layers.py``,
``channel.py``).
"""

import math
import numbers

import torch

from statscope.errors import StatscopeError

__all__ = ["PIXEL_SETS", "BATCH_SETS", "GROUPED_SETS", "STD_CENTERS", "check_set", "check_groups",
           "plain_number", "set_size", "describe", "cell_moments", "set_average",
           "deviation_fraction"]

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
        int: ``groups`` as a Python int.

    Raises:
        StatscopeError: ``groups`` is not a positive int (NumPy's integers count) dividing
            ``num_features``.
    """
    value = plain_number(groups, integral=True)
    if value is None or value < 1:
        raise StatscopeError(f"{argument}={groups!r}: expected a positive int")
    if num_features % value:
        raise StatscopeError(f"{argument}={value}: num_features={num_features} is not divisible "
                             f"by it")
    return value


def plain_number(value, integral=False):
    """``value`` as a Python ``int`` (``integral``) or ``float``, or None if it is not one.

    Any real number qualifies, NumPy's scalars too (sizes and eps read from a config or an
    array), as torch's BatchNorm takes them; a bool does not, nor a float where ``integral``
    asks for an int.

    Example:
        >>> plain_number(8.0, integral=True), plain_number(True), plain_number(3)
        (None, None, 3.0)
    """
    kind = numbers.Integral if integral else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        return None
    return int(value) if integral else float(value)


def _extent(shape, pixel_set, groups):
    """Pixels of one set along (examples, channels, spatial positions)."""
    n, c, spatial = shape[0], shape[1], math.prod(shape[2:])
    channels = {"batch": 1, "instance": 1, "layer": c}.get(pixel_set, c // groups)
    return (n if pixel_set in BATCH_SETS else 1), channels, spatial


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
    return math.prod(_extent(shape, pixel_set, groups))


def describe(pixel_set):
    """One line saying which pixels ``pixel_set`` pools, for error messages and docs."""
    return _DESCRIPTIONS[pixel_set]


def deviation_fraction(shape, mean_sets, groups, weights=None):
    """Expected mean square of ``x - μ`` over the variance of ``x``, for independent pixels.

    ``μ`` is the mean of the set(s) ``mean_sets`` through the pixel (a ``weights``-mix of several):
    with ``X_k`` those sets, ``E[(x - μ)²] / σ² = 1 - 2 Σ_k p_k/|X_k| + Σ_kl p_k p_l |X_k ∩ X_l| /
    (|X_k| |X_l|)``. Dividing a variance measured around ``μ`` by it gives Bessel's correction:
    ``1 - 1/n`` for a set's deviations around its own mean (n pixels), ``1 - 1/M`` for HN's
    ``std_center="subtracted"``, whose deviations are around per-channel means of ``M = N·|S|``
    pixels each.

    Args:
        shape: input shape ``(N, C, *S)``.
        mean_sets: the mean's pixel sets; all grouped ones share ``groups``.
        groups: channel groups of the grouped mean sets.
        weights: the mixture's shares ``(K,)`` (a softmax), or None for a single set.

    Returns:
        float, or a 0-d Tensor when ``weights`` is a Tensor.

    Example:
        >>> deviation_fraction((4, 64), ("batch",), 1)
        0.75
    """
    sizes = [set_size(shape, s, groups) for s in mean_sets]
    if weights is None:
        return 1.0 - 1.0 / sizes[0]
    total = 1.0
    for k, size in enumerate(sizes):
        total = total - 2.0 / size * weights[k]
        for j, other in enumerate(sizes):
            overlap = set_size(shape, _intersection(mean_sets[k], mean_sets[j]), groups)
            total = total + overlap / (size * other) * weights[k] * weights[j]
    return total


def _intersection(first, second):
    """The pixel set that two sets through one pixel share (with the same groups).

    Named rather than measured (the smaller extent along each dim), so that no size is
    compared: sizes are symbolic under ``torch.compile`` and tensors under ``torch.jit.trace``.
    """
    if first == second:
        return first
    over_batch = first in BATCH_SETS and second in BATCH_SETS
    # extent over channels, narrowest first: one channel, a group of them, all of them
    channels = min(_CHANNEL_EXTENT[first], _CHANNEL_EXTENT[second])
    return _SET_OF[over_batch, channels]


# the extent of a set over channels: 0 one channel, 1 a group, 2 all channels
_CHANNEL_EXTENT = {"batch": 0, "instance": 0, "group": 1, "extended": 1, "layer": 2}
# (pools over the batch, extent over channels) -> the set
_SET_OF = {(True, 0): "batch", (True, 1): "extended", (False, 0): "instance",
           (False, 1): "group", (False, 2): "layer"}


def cell_moments(x, per_example):
    """Biased mean and variance of every cell of ``x``, in differentiable two-pass ops.

    Args:
        x: input ``(N, C, *S)``.
        per_example: cells per example and channel (True) or per channel (False).

    Returns:
        tuple[Tensor, Tensor]: ``(mean, var)``, each ``(N, C)`` if ``per_example`` else ``(1, C)``.
        An ``(N, C)`` input has one pixel per example and channel: its cells have variance 0.
    """
    if per_example and x.dim() == 2:
        return x, torch.zeros_like(x)
    dims = tuple(range(2, x.dim())) if per_example else (0, *range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
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
    if pixel_set in GROUPED_SETS:  # groups == C (one channel each) too: its mean is the cell
        rows, channels = cells.shape
        grouped = cells.reshape(rows, groups, channels // groups).mean(2, keepdim=True)
        return grouped.expand(rows, groups, channels // groups).reshape(rows, channels)
    return cells
