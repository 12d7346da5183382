"""The notes of the claims table (:mod:`statscope.analyses.claims`): why a row has no test, and
on how much of the window its effect rests (private)."""

from __future__ import annotations

import numpy as np

from statscope import schema as S

from ._data import FLUCT_STATS, Layers, quiet
from .resampling import MIN_EFFECTIVE


USES: dict[str, dict[str, tuple[str, ...]]] = {
    "a": {"mean": (S.BN_MEAN, S.EN_MEAN), "std": (S.BN_STD, S.EN_STD)},
    "b": {"mean gap / std gap": FLUCT_STATS},
    "c": {"bn_std vs bn_mean": (S.BN_STD, S.BN_MEAN)}}
"""The statistics whose fluctuation each claim's effect divides (claim (d): its statistic)."""


def why(claim: str, stat: str, note: str, series: dict, layers: Layers, layer: str) -> str:
    """The interval's note, made specific where a statistic does not move over the window (a
    log ratio of zero fluctuations is undefined) or BN and EN coincide (EN groups of one
    channel)."""
    def still(s: str, la: str) -> bool:
        return constant(series[s][:, layers.index[layers.names.index(la)]])

    if claim == "d":  # the first layer, or every layer it is compared with
        rest = layers.names[1:]
        flat = [f"{stat} in layer {layer}"] if still(stat, layer) else \
            [f"{stat} in layer {la}" for la in rest] if all(still(stat, la) for la in rest) \
            else []
    else:
        flat = [f"{s} in layer {layer}" for s in USES[claim][stat] if still(s, layer)]
    if flat:
        return (f"constant over the window (zero fluctuation at every neuron): "
                f"{', '.join(flat)}; a log ratio of fluctuations is undefined there")
    sel = layers.index[layers.names.index(layer)]
    same = all(np.array_equal(series[f"bn_{x}"][:, sel], series[f"en_{x}"][:, sel],
                              equal_nan=True) for x in ("mean", "std"))
    if same and claim in ("a", "b"):
        return ("BN and EN statistics are identical in this layer (EN groups of one channel): "
                "there is nothing to compare")
    return note


def constant(values: np.ndarray) -> bool:
    """Whether every neuron's series (step, neuron) with data takes a single value."""
    ok = np.isfinite(values)
    if not ok.any():
        return False
    with quiet():
        return bool(np.all(~ok.any(0) | (np.nanmax(values, 0) == np.nanmin(values, 0))))


def compared_with(values: np.ndarray, layers: Layers, steps: int) -> str:
    """Claim (d)'s caveat: which other layers the first one was compared with, naming those
    left out for want of data in the window (a fluctuation needs 2 steps)."""
    valid = {la: int(np.isfinite(values[:, i]).any(axis=1).sum())
             for la, i in zip(layers.names, layers.index)}
    others = layers.names[1:]
    out = [la for la in others if valid[la] < 2]
    if not out:
        return ""
    used = [la for la in others if valid[la] >= 2]
    said = ", ".join(f"{la} has values in {valid[la]} of the window's {steps} steps"
                     for la in out)
    if not used:
        return f"no other layer to compare with: {said} (a fluctuation needs 2)"
    return f"compared with {', '.join(used)} only: {said} (a fluctuation needs 2)"


def steps_with_values(series: dict, stats, columns: np.ndarray) -> int:
    """The window's steps at which, for each of ``stats``, some neuron of ``columns`` has a
    finite value (the series are NaN where the layer did not run or its value is NaN/Inf)."""
    return int(np.all([np.isfinite(series[s][:, columns]).any(axis=1) for s in stats],
                      axis=0).sum())


def ran_note(finite: int, ran: int, steps: int) -> str:
    """A caveat for a layer with values in ``finite`` of the window's ``steps``, of which it ran
    in ``ran`` (layer drop, a branch that skips; NaN/Inf statistics where it diverged): the
    interval rests on fewer steps than the window has, and under :data:`MIN_EFFECTIVE` of them
    there is no estimate."""
    if finite < ran:
        said = (f"the layer has values in {finite} of the window's {steps} steps (it ran in "
                f"{ran}; its statistics were NaN/Inf in {ran - finite})")
    else:
        said = f"the layer ran in {ran} of the window's {steps} steps"
    if finite < MIN_EFFECTIVE:
        return f"not evaluable: {said}"
    return said if finite < steps else ""
