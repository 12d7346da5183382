"""Across seeds: which runs repeat one configuration, and the between-seed summary of an effect.

Runs that differ only in their seed are replicates of one configuration (model, batch size,
norm, learning rate, ...). A claim about the configuration is judged on the seeds: how many of
them show it, and a t interval for the mean effect over seeds, whose spread includes what the
within-run bootstrap cannot see (initialisation, data order).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from statscope import schema as S
from statscope.errors import StatscopeError

from ._data import Layers, t_quantile, t_two_sided
from .resampling import check_settings

__all__ = ["config_labels", "config_meta", "run_configs", "layer_set", "between_seeds",
           "SEED_FREE_KEYS", "MODEL_KEYS"]

# what the built-in experiments (statscope run) and the integrations store beside the seed
_TRAINING_KEYS = ("experiment", "model_type", "momentum", "weight_decay", "en_groups",
                  "gradient_accumulation_steps")

SEED_FREE_KEYS = (S.META_BATCH_SIZE, S.META_NORM, S.ATTR_MODEL, S.META_DATASET, S.META_LR,
                  S.META_EPOCHS, *_TRAINING_KEYS, "max_steps", S.ATTR_RANK, S.ATTR_WORLD_SIZE)
"""The settings that define a configuration (the seed is not one of them), in label order: a run
differing in any of them from another is not its replicate. The rank of a distributed run's
entry (a rank, or "global" for the merged statistics) and the run's world size are among them:
rank 0 of two seeds are replicates, rank 0 and rank 1 of one run are not, wherever the rank
comes from (a folder of rank stores, or rank stores given one by one: :func:`config_meta`)."""

MODEL_KEYS = (S.ATTR_MODEL, S.META_DATASET, S.META_NORM, S.META_EPOCHS, *_TRAINING_KEYS,
              S.ATTR_RANK, S.ATTR_WORLD_SIZE)
"""The settings that make runs one model trained alike, whatever their batch size (and a
learning rate scaled with it): the series of a batch-size comparison (per rank, or global, for
distributed runs)."""

_NAMES = {S.ATTR_MODEL: "", S.META_DATASET: "data", S.META_NORM: "norm",
          S.META_BATCH_SIZE: "batch size", S.META_LR: "lr", S.META_EPOCHS: "epochs",
          S.ATTR_RANK: "rank", "experiment": "", "model_type": "", "momentum": "momentum",
          "weight_decay": "weight decay", "en_groups": "EN groups",
          "gradient_accumulation_steps": "accumulation", "max_steps": "max steps",
          S.ATTR_WORLD_SIZE: "world size"}


def config_meta(attrs: Mapping) -> dict:
    """A run's settings from its root attributes: its ``meta`` (batch_size, seed, ...), its
    ``model``, and, for one rank's store of a distributed run (``world_size`` > 1), its ``rank``
    and ``world_size`` (unless ``meta`` sets them): a rank store opened on its own
    (``runs/ddp/rank1``, or a ``{rank}`` path template's ``runs/exp_rank1``) is that rank's
    entry, not a seed of the other ranks.

    Example:
        >>> config_meta({"meta": {"batch_size": 8}, "model": "m", "rank": 1, "world_size": 2})
        {'batch_size': 8, 'model': 'm', 'rank': 1, 'world_size': 2}
        >>> config_meta({"meta": {"batch_size": 8}, "rank": 0, "world_size": 1})
        {'batch_size': 8}
    """
    meta = dict(attrs.get(S.ATTR_META) or {})
    if attrs.get(S.ATTR_MODEL) is not None:
        meta.setdefault(S.ATTR_MODEL, attrs[S.ATTR_MODEL])
    world = attrs.get(S.ATTR_WORLD_SIZE)
    if isinstance(world, int) and not isinstance(world, bool) and world > 1:
        meta.setdefault(S.ATTR_RANK, attrs.get(S.ATTR_RANK))
        meta.setdefault(S.ATTR_WORLD_SIZE, world)
    return meta


def config_labels(metas: Sequence[Mapping],
                  layers: Sequence[Sequence[str]] | None = None) -> list[str]:
    """One label per run naming its configuration, without the seed: the batch size (when
    known) and each other setting that splits the runs further (a learning rate scaled with the
    batch size does not); then, where runs that share a label probe different layers, their
    layers (runs of two models are not seeds of one configuration, whatever their settings say).

    Args:
        metas: each run's settings (:func:`config_meta`).
        layers: each run's probed layers (:func:`layer_set`), or None to label by the settings
            alone.

    Returns:
        One label per run, e.g. "batch size 4" or "batch size 8 · layers fc1, fc2".

    Example:
        >>> config_labels([{"batch_size": 4, "lr": 0.1, "seed": 0},
        ...                {"batch_size": 4, "lr": 0.1, "seed": 1},
        ...                {"batch_size": 128, "lr": 3.2, "seed": 0}])
        ['batch size 4', 'batch size 4', 'batch size 128']
        >>> config_labels([{"model": "a"}, {"model": "b"}])
        ['a', 'b']
        >>> config_labels([{"batch_size": 8, "rank": 0}, {"batch_size": 16, "rank": "global"},
        ...                {"batch_size": 16}])
        ['batch size 8 · rank 0', 'batch size 16 · rank global', 'batch size 16']
        >>> config_labels([{"batch_size": 8}, {"batch_size": 8}, {"batch_size": 16}],
        ...               [("fc1", "fc2"), ("conv", "fc1", "fc2"), ("fc1",)])
        ['batch size 8 · layers fc1, fc2', 'batch size 8 · layers conv, fc1, fc2', 'batch size 16']
    """
    if layers is not None and len(layers) != len(metas):
        raise StatscopeError(f"layers: expected one layer set per run ({len(metas)}), got "
                             f"{len(layers)}")
    keys: list[str] = []
    for k in SEED_FREE_KEYS:
        if k in (S.META_BATCH_SIZE, S.ATTR_RANK) and any(m.get(k) is not None for m in metas):
            keys.append(k)
            continue
        before = len({tuple(_text(m.get(j)) for j in keys) for m in metas})
        after = len({tuple(_text(m.get(j)) for j in (*keys, k)) for m in metas})
        if after > before:
            keys.append(k)
    out = []
    for m in metas:
        parts = [(f"{_NAMES[k]} {_text(m.get(k))}" if _NAMES[k] else _text(m.get(k))).strip()
                 for k in keys if not (k == S.ATTR_RANK and m.get(k) is None)]
        out.append(" · ".join(parts) or "all runs")
    return out if layers is None else _by_layers(out, [tuple(map(str, n)) for n in layers])


def _by_layers(labels: list[str], layers: list[tuple[str, ...]]) -> list[str]:
    """``labels`` with the layers appended where runs sharing a label probe different ones."""
    per_label: dict[str, set] = {}
    for label, names in zip(labels, layers):
        per_label.setdefault(label, set()).add(names)
    out = []
    for label, names in zip(labels, layers):
        sets = per_label[label]
        if len(sets) < 2:
            out.append(label)
            continue
        short = {_layers_text(n) for n in sets}  # the short form, unless it would merge two
        out.append(f"{label} · layers "
                   f"{_layers_text(names) if len(short) == len(sets) else ', '.join(names)}")
    return out


def _layers_text(names) -> str:
    if len(names) <= 4:
        return ", ".join(names)
    return f"{names[0]} … {names[-1]} ({len(names)})"


def layer_set(ds) -> tuple[str, ...]:
    """The layers a run probes, which tell its model apart: those of its probe records
    (``attrs["probes"]``, so that a run narrowed to some layers is still known by all of
    them), else those of its ``layer`` coordinate, in store order.

    Example:
        >>> from statscope.analyses._demo import demo_run
        >>> layer_set(demo_run())
        ('fc1', 'fc2')
    """
    probes = ds.attrs.get(S.ATTR_PROBES) or []
    names = [str(p["name"]) for p in probes if isinstance(p, Mapping) and "name" in p]
    return tuple(dict.fromkeys(names)) if names else Layers.of(ds).names


def run_configs(windows) -> list[str]:
    """The configuration label of each run's window (:func:`config_labels` of their settings
    and layer sets): the one labelling that the claims, the tables, the report and
    ``statscope analyze`` share.

    Args:
        windows: RunWindows (name, data, meta), e.g. from
            :func:`statscope.analyses.run_windows`.

    Returns:
        One label per window.
    """
    windows = list(windows)
    return config_labels([w.meta for w in windows], [layer_set(w.data) for w in windows])


def _text(v) -> str:
    if v is None:
        return "?"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def between_seeds(effects, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Mean of per-seed effects and its t interval over seeds (NaN seeds left out).

    Args:
        effects: one value per seed.
        confidence: two-sided level.

    Returns:
        (mean, lower, upper, p-value of mean = 0); bounds and p are NaN with fewer than two
        finite values.

    Example:
        >>> [round(v, 3) for v in between_seeds([1.0, 2.0, 3.0])]
        [2.0, -0.484, 4.484, 0.074]
    """
    check_settings(confidence=confidence)
    x = np.asarray(effects, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return (math.nan,) * 4
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan, math.nan
    se = float(x.std(ddof=1)) / math.sqrt(x.size)
    q = float(t_quantile(0.5 + confidence / 2.0, x.size - 1))
    p = float(t_two_sided(mean / se, x.size - 1)) if se > 0 else (
        1.0 if mean == 0 else 0.0)
    return mean, mean - q * se, mean + q * se, p
