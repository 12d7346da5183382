"""The statistics the probes record, as a small registry over per-channel central moments.

Every statistic is finished on the host, in float64, from the per-channel moments of one step's
probed tensor: mean, variance (population, ddof=0) and, when a statistic asks for them, the third
and fourth central moments. EN statistics come from the per-channel moments of their group by the
law of total variance (channels of a group share one count), which is exact, so a probe makes one
pass over the data for BN and EN alike. How the per-channel moments are computed depends on the
path a probe takes: :func:`block_moments` for blocks buffered raw, and
:mod:`statscope.probes.reduce` for tensors reduced at once or taken from BatchNorm itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from statscope import schema as S
from statscope.errors import StatscopeError
from statscope.rows import BUILTIN, Moments

__all__ = ["Moments", "Statistic", "register_statistic", "get_statistic", "STATISTICS",
           "block_moments", "computes"]


@dataclass(frozen=True)
class Statistic:
    """A recorded statistic.

    Attributes:
        name: the variable name in the store.
        order: the highest central moment it needs (2 or 4).
        per_group: True for EN statistics (one value per EN group), False for one per channel.
        compute: ``Moments -> (k, C)`` (or ``(k, groups)`` when per_group) float64; None for the
            per-set statistics, which a probe computes from the tensor's sets, not from the
            per-channel moments (:mod:`statscope.probes.sets`).
    """

    name: str
    order: int
    per_group: bool
    compute: Callable[[Moments], np.ndarray] | None

    @property
    def sets(self) -> bool:
        """True for the per-set statistics (:data:`statscope.schema.SET_STATS`)."""
        return self.compute is None


STATISTICS: dict[str, Statistic] = {
    S.BN_MEAN: Statistic(S.BN_MEAN, 2, False, BUILTIN[S.BN_MEAN]),
    S.BN_STD: Statistic(S.BN_STD, 2, False, BUILTIN[S.BN_STD]),
    S.EN_MEAN: Statistic(S.EN_MEAN, 2, True, BUILTIN[S.EN_MEAN]),
    S.EN_STD: Statistic(S.EN_STD, 2, True, BUILTIN[S.EN_STD]),
    S.BN_KURT: Statistic(S.BN_KURT, 4, False, BUILTIN[S.BN_KURT]),
    **{name: Statistic(name, 2, True, None) for name in S.SET_STATS},
}
"""The registry, by store variable name."""


def register_statistic(name: str, compute: Callable[[Moments], np.ndarray], *,
                       order: int = 2) -> Statistic:
    """Add a per-channel statistic computed from the moments, e.g. skewness.

    Args:
        name: its variable name in the store; must be a new identifier.
        compute: ``Moments -> (k, C)`` float64 array.
        order: 2 (mean and variance suffice) or 4 (third and fourth moments too).

    Returns:
        The registered statistic; pass its name in ``record(..., stats=[...])``.

    Example:
        >>> import numpy as np
        >>> from statscope.probes import register_statistic
        >>> skew = register_statistic("bn_skew_demo", lambda m: m.m3 / m.var ** 1.5, order=4)
        >>> skew.per_group
        False
    """
    if not name.isidentifier() or name in STATISTICS or name in S.RESERVED_NAMES:
        raise StatscopeError(f"name={name!r}: taken or not an identifier; taken: "
                             f"{sorted(set(STATISTICS) | S.RESERVED_NAMES)}")
    if order not in (2, 4):
        raise StatscopeError(f"order={order!r}: expected 2 or 4")
    stat = Statistic(name, order, False, compute)
    STATISTICS[name] = stat
    return stat


def get_statistic(name: str) -> Statistic:
    """Look a statistic up by name, with a clear error listing the known ones."""
    try:
        return STATISTICS[name]
    except KeyError:
        raise StatscopeError(f"stats: {name!r} is not a known statistic; known: "
                             f"{', '.join(STATISTICS)}") from None


@torch.no_grad()
def block_moments(raw: torch.Tensor, order: int) -> tuple[torch.Tensor, ...]:
    """Moments of a block of steps held raw: (k, M, C) -> tuple of (k, C) tensors.

    The block is transposed once so that every reduction runs along the contiguous dimension,
    where torch sums pairwise (error ~ eps·log M, not eps·M); values are shifted by the first
    sample of each step and channel, and the variance takes the two-pass correction for the
    rounding of the mean (Chan, Golub & LeVeque), so float32 inputs with a large offset lose
    nothing to cancellation. The mean is returned in float64 (shift + mean of the shifted data).
    Where squares overflow float32 (deviations beyond ~1e19, whose variance itself may still fit
    float32), the block is computed again in float64.
    """
    moments = _block_moments(raw, order)
    if raw.dtype != torch.float64 and not all(bool(torch.isfinite(m).all()) for m in moments[1:]):
        return _block_moments(raw.double(), order)  # the same for inputs that are not finite
    return moments


def _block_moments(raw: torch.Tensor, order: int) -> tuple[torch.Tensor, ...]:
    m = raw.shape[1]
    x = raw.transpose(1, 2).contiguous()  # (k, C, M), a copy this function may overwrite
    shift = x[..., :1].clone()
    d = x.sub_(shift)
    mean_d = d.sum(-1, keepdim=True) / m
    e = d.sub_(mean_d)
    e_mean = e.sum(-1) / m
    e2 = e * e
    var = (e2.sum(-1) / m - e_mean * e_mean).clamp_min_(0)
    mean = shift.squeeze(-1).double() + mean_d.squeeze(-1).double() + e_mean.double()
    if order < 4:
        return mean, var
    return mean, var, (e2 * e).sum(-1) / m, e2.square_().sum(-1) / m


def computes(names) -> dict:
    """``{name: compute}`` of the named per-channel statistics (the per-set ones have none)."""
    return {n: STATISTICS[n].compute for n in names if STATISTICS[n].compute is not None}
