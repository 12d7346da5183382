"""The run panel's content: settings, status, progress and probe overhead, as plain rows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import xarray as xr

from statscope import schema as S

__all__ = ["RunSummary", "run_summary"]


@dataclass(frozen=True)
class RunSummary:
    """What the run panel shows about one run.

    Attributes:
        name: the run's name.
        status: ``running``, ``completed``, ``failed`` or ``unknown``.
        n_steps: rows recorded.
        last_step: the last training step recorded, or ``None``.
        rows: ``(label, text)`` pairs: settings, model, layers, probe overhead, times, command.
        error: the error a failed run recorded, or ``None``.
    """

    name: str
    status: str
    n_steps: int
    last_step: int | None
    rows: tuple[tuple[str, str], ...]
    error: str | None = None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def run_summary(name: str, ds: xr.Dataset, status: str | None = None) -> RunSummary:
    """Collect a run's settings and status from its attributes (no statistics are read).

    Args:
        name: the run's name.
        ds: the run, from ``statscope.open_run``.
        status: the status to show instead of the recorded one (the catalog's, e.g.
            ``stopped (no writer)`` for a running run whose writer is gone).

    Returns:
        The :class:`RunSummary`; the probe overhead is shown as a percentage of step time.
    """
    a = ds.attrs
    n = int(ds.sizes.get(S.STEP, 0))
    last = a.get(S.ATTR_LAST_STEP)
    if last is None and n:
        last = int(ds[S.STEP].values[-1])
    rows: list[tuple[str, str]] = []
    meta = a.get(S.ATTR_META) or {}
    for key in S.META_KEYS:
        if key in meta:
            rows.append((key.replace("_", " "), _fmt(meta[key])))
    rows += [(str(k), _fmt(v)) for k, v in meta.items() if k not in S.META_KEYS]
    if a.get(S.ATTR_MODEL):
        rows.append(("model", _fmt(a[S.ATTR_MODEL])))
    layers = a.get(S.ATTR_LAYERS) or list(dict.fromkeys(ds[S.LAYER].values.tolist()))
    rows.append(("layers", f"{len(layers)}: {_fmt(list(layers))}"))
    rows.append(("neurons", f"{ds.sizes.get(S.NEURON, 0):,}"))
    ranks = a.get("ranks")
    if isinstance(ranks, Mapping) and ranks:
        rows.append(("ranks", "; ".join(
            f"{r}: {_fmt(v.get(S.ATTR_STATUS))}, {int(v.get(S.ATTR_N_STEPS) or 0):,} steps"
            for r, v in sorted(ranks.items(), key=lambda kv: int(kv[0]))
            if isinstance(v, Mapping))))
    overhead = a.get(S.ATTR_PROBE_OVERHEAD)
    rows.append(("probe overhead", "not measured" if overhead is None
                 else f"{100 * float(overhead):.1f}% of step time"))
    for key in (S.ATTR_STARTED, S.ATTR_ENDED, S.ATTR_COMMAND):
        if a.get(key):
            rows.append((key, _fmt(a[key])))
    versions = a.get(S.ATTR_VERSIONS)
    if versions:
        rows.append(("versions", _fmt(versions)))
    return RunSummary(name=name, status=str(status or a.get(S.ATTR_STATUS) or "unknown"),
                      n_steps=n,
                      last_step=None if last is None else int(last), rows=tuple(rows),
                      error=a.get(S.ATTR_ERROR))
