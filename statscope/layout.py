"""What a run records: its probes (one per probed tensor) and how their channels map to columns.

A probe has ``channels`` channels; all of them enter its EN statistics and its window summaries,
while its per-step per-neuron columns may hold a subset (``units``) to keep long runs of wide
models small. These records are the ``probes`` attribute of a run store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from statscope import schema as S
from statscope.errors import StoreDamagedError

__all__ = ["ProbeInfo", "Layout"]


@dataclass(frozen=True)
class ProbeInfo:
    """One probed tensor: a module's input or output.

    Attributes:
        name: the value of the ``layer`` coordinate (the module's qualified name, with
            ``schema.INPUT_SUFFIX``/``OUTPUT_SUFFIX`` when the module is probed at both ends).
        module: qualified name from ``named_modules()``.
        type: the module's class name, e.g. ``"BatchNorm1d"``.
        where: ``"input"`` or ``"output"``.
        channel_dim: dimension of the probed tensor that holds the channels (negative = from end).
        channels: number of channels of this probe.
        groups: number of EN groups; channels must be divisible by it.
        norm: for a probed norm layer, what rebuilding its running statistics needs
            (``momentum``, ``eps``, ``track_running_stats``, ``num_batches_tracked``), else None.
        units: the channels whose per-step statistics are kept, increasing; None for all of them.
        path: how the probe computed its statistics: ``"generic"`` (its own reduction of the
            tensor) or ``"batchnorm"`` (the moments the BatchNorm layer computed itself).
    """

    name: str
    module: str
    type: str
    where: str
    channel_dim: int
    channels: int
    groups: int = 1
    norm: Mapping[str, Any] | None = None
    units: tuple[int, ...] | None = None
    path: str = "generic"

    def __post_init__(self):
        if self.units is not None and not isinstance(self.units, tuple):
            object.__setattr__(self, "units", tuple(int(u) for u in self.units))

    @property
    def kept(self) -> np.ndarray:
        """Indices of the channels with per-step columns, (k,) int64."""
        return np.arange(self.channels) if self.units is None else np.asarray(self.units, np.int64)

    def to_json(self) -> dict:
        out = asdict(self)
        out["units"] = None if self.units is None else list(self.units)
        return out


@dataclass(frozen=True)
class Layout:
    """The neuron layout of a run: its probes in store order and the statistics recorded."""

    probes: tuple[ProbeInfo, ...]
    stats: tuple[str, ...] = S.DEFAULT_STATS

    @property
    def n_neurons(self) -> int:
        """Per-step per-neuron columns (the kept units of every probe)."""
        return sum(len(p.kept) for p in self.probes)

    @property
    def n_channels(self) -> int:
        """All channels of every probe (the columns of window summaries)."""
        return sum(p.channels for p in self.probes)

    @property
    def n_groups(self) -> int:
        return sum(p.groups for p in self.probes)

    @property
    def neuron_stats(self) -> tuple[str, ...]:
        return tuple(s for s in self.stats if s not in S.PER_GROUP_STATS)

    @property
    def group_stats(self) -> tuple[str, ...]:
        return tuple(s for s in self.stats if s in S.PER_GROUP_STATS)

    def neuron_index(self, all_channels: bool = False) -> dict[str, np.ndarray]:
        """Per column: probe index, unit in probe, global EN-group column, group in probe.

        Args:
            all_channels: index every channel (window summaries) instead of the kept units.
        """
        probe, unit, gcol, glocal = [], [], [], []
        g0 = 0
        for i, p in enumerate(self.probes):
            units = np.arange(p.channels) if all_channels else p.kept
            local = units // (p.channels // p.groups)
            probe.append(np.full(len(units), i, np.int32))
            unit.append(units.astype(np.int32))
            glocal.append(local.astype(np.int32))
            gcol.append((g0 + local).astype(np.int32))
            g0 += p.groups
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int32))
        return {"probe": cat(probe), "unit": cat(unit), "group_column": cat(gcol),
                "group": cat(glocal)}

    def same_neurons(self, other: "Layout") -> bool:
        """True when both record the same statistics of the same channels in the same order."""
        key = (lambda lay: ([(p.name, p.module, p.where, p.channels, p.groups, p.units)
                             for p in lay.probes], lay.stats))
        return key(self) == key(other)

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "Layout":
        try:
            probes = tuple(ProbeInfo(**p) for p in attrs[S.ATTR_PROBES])
            return cls(probes=probes, stats=tuple(attrs[S.ATTR_STATS]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreDamagedError(f"attrs: the run's probe records are damaged ({exc!r})") \
                from None
