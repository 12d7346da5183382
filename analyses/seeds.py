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

from ._data import t_quantile, t_two_sided
from .resampling import check_settings

__all__ = ["config_labels", "config_meta", "between_seeds", "SEED_FREE_KEYS", "MODEL_KEYS"]

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


def config_labels(metas: Sequence[Mapping]) -> list[str]:
    """One label per run naming its configuration, without the seed: the batch size (when
    known) and each other setting that splits the runs further (a learning rate scaled with the
    batch size does not).

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
    """
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
    return out


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
