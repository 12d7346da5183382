"""What an export writes: per-window fluctuation summaries and the logged scalars of a run.

A run is cut into consecutive windows of ``W`` steps aligned at multiples of ``W``
(``[0, W)``, ``[W, 2W)``, ...). For each complete window, with :mod:`statscope.analyses`:

* per layer and statistic (``bn_mean``, ``bn_std``, ``en_mean``, ``en_std``), the layer median of
  the per-neuron fluctuation, raw (activation units) and scale-free (units of the neuron's σ̄),
  as scalars;
* per layer and statistic, the per-neuron fluctuation itself, raw and scale-free, as histograms.

Each window's summaries sit at the window's last step, so the curves line up with the training
curves of the same steps. The logged scalars (loss, lr, ...) are passed through at their steps.
NaN means "no value" (a scalar not logged at that step, a layer that did not run) and is left
out; ±inf is a value (a diverged loss) and is written as a scalar, which TensorBoard stores and
draws. Histograms hold the finite values only: an infinite value has no bucket.
This module needs no torch; the writers live in :mod:`statscope.export.sinks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from statscope import schema as S
from statscope.errors import StatscopeError

__all__ = ["Scalar", "Histogram", "STATISTICS", "FLUCTUATION", "FLUCTUATION_SCALE_FREE",
           "NEURONS", "NEURONS_SCALE_FREE", "SCALARS", "window_summaries", "scalar_summaries",
           "custom_layout"]

STATISTICS = (S.BN_MEAN, S.BN_STD, S.EN_MEAN, S.EN_STD)
"""The statistics whose fluctuation is exported."""

FLUCTUATION = "fluctuation"
"""Tag prefix of the layer medians of the raw fluctuation: ``fluctuation/<layer>/<statistic>``."""
FLUCTUATION_SCALE_FREE = "fluctuation_scale_free"
"""Tag prefix of the layer medians of the scale-free fluctuation."""
NEURONS = "neurons"
"""Tag prefix of the per-neuron raw fluctuation histograms: ``neurons/<layer>/<statistic>``."""
NEURONS_SCALE_FREE = "neurons_scale_free"
"""Tag prefix of the per-neuron scale-free fluctuation histograms."""
SCALARS = "scalars"
"""Tag prefix of the logged scalars: ``scalars/<name>``."""


@dataclass(frozen=True)
class Scalar:
    """One scalar point: ``value`` of ``tag`` at ``step``."""

    tag: str
    step: int
    value: float


@dataclass(frozen=True, eq=False)
class Histogram:
    """The distribution of ``values`` ((n,) float64, all finite, n ≥ 1) of ``tag`` at ``step``."""

    tag: str
    step: int
    values: np.ndarray


def window_summaries(window: xr.Dataset, step: int) -> list[Scalar | Histogram]:
    """Fluctuation summaries of one window of a run.

    Args:
        window: one run (dims step, neuron) restricted to the window's steps, best in memory.
        step: the step to write them at (the window's last step, plus any offset).

    Returns:
        Scalars ``fluctuation[_scale_free]/<layer>/<statistic>`` (layer medians; a NaN median
        left out, ±inf kept: a scale-free fluctuation is infinite where a neuron's σ̄ is 0) and
        histograms ``neurons[_scale_free]/<layer>/<statistic>`` (per neuron, finite values
        only); an empty list when the window holds no step with data.

    Example:
        >>> from statscope.analyses._demo import demo_run
        >>> ds = demo_run(batch_size=16).isel(step=slice(0, 50)).load()
        >>> items = window_summaries(ds, step=49)
        >>> sorted({i.tag.split("/")[0] for i in items})
        ['fluctuation', 'fluctuation_scale_free', 'neurons', 'neurons_scale_free']
    """
    from statscope.analyses import fluctuation, layer_summary

    out: list[Scalar | Histogram] = []
    for scalar_tag, hist_tag, scale_free in ((FLUCTUATION, NEURONS, False),
                                             (FLUCTUATION_SCALE_FREE, NEURONS_SCALE_FREE, True)):
        try:
            per_neuron = fluctuation(window, "all", scale_free=scale_free)
        except StatscopeError:  # no step of the window has data: nothing to summarise
            return []
        medians = layer_summary(per_neuron)
        layers = np.asarray(per_neuron[S.LAYER].values)
        for layer in medians[S.LAYER].values:
            layer = str(layer)
            for stat in STATISTICS:
                value = float(medians[stat].sel({S.LAYER: layer, S.QUANTITY: "median"}))
                if not np.isnan(value):
                    out.append(Scalar(f"{scalar_tag}/{layer}/{stat}", int(step), value))
                values = np.asarray(per_neuron[stat].values, np.float64)[layers == layer]
                values = values[np.isfinite(values)]
                if values.size:
                    out.append(Histogram(f"{hist_tag}/{layer}/{stat}", int(step), values))
    return out


def scalar_summaries(ds: xr.Dataset, start: int, stop: int, offset: int = 0) -> list[Scalar]:
    """The logged scalars of a run at steps ``start <= step < stop``: NaN (not logged at that
    step) left out, ±inf (a diverged loss) kept.

    Args:
        ds: one run from :func:`statscope.open_run`.
        start, stop: global steps, stop exclusive.
        offset: added to each step when written.

    Returns:
        Scalars ``scalars/<name>``, ordered by name, then step.
    """
    names = [str(n) for n in ds.attrs.get(S.ATTR_SCALARS, []) if n in ds.data_vars]
    if not names or stop <= start:
        return []
    part = ds[names].sel({S.STEP: slice(start, stop - 1)}).load()
    steps = np.asarray(part[S.STEP].values)
    out = []
    for name in names:
        values = np.asarray(part[name].values, np.float64)
        ok = ~np.isnan(values)
        out += [Scalar(f"{SCALARS}/{name}", int(s) + offset, float(v))
                for s, v in zip(steps[ok], values[ok])]
    return out


def custom_layout(layers: list[str]) -> dict:
    """A TensorBoard custom-scalars layout that draws, per layer, the scale-free fluctuation of
    BN beside EN (one chart for the means, one for the stds) and of the mean beside the std.

    Returns:
        ``{category: {chart title: ["Multiline", [tags]]}}``, as
        ``SummaryWriter.add_custom_scalars`` takes it. TensorBoard reads a chart's tags as
        regular expressions it matches from a tag's start: each is the tag escaped and
        anchored, so that a layer name such as ``blocks[0]`` or ``a.b`` draws its own tag only.

    Example:
        >>> custom_layout(["fc1"])["statscope: BN vs EN"]["fc1 mean"][1]
        ['^fluctuation_scale_free/fc1/bn_mean$', '^fluctuation_scale_free/fc1/en_mean$']
    """
    import re

    def tag(layer, stat):
        return "^" + re.escape(f"{FLUCTUATION_SCALE_FREE}/{layer}/{stat}") + "$"

    bn_en, mean_std = {}, {}
    for layer in layers:
        bn_en[f"{layer} mean"] = ["Multiline", [tag(layer, S.BN_MEAN), tag(layer, S.EN_MEAN)]]
        bn_en[f"{layer} std"] = ["Multiline", [tag(layer, S.BN_STD), tag(layer, S.EN_STD)]]
        mean_std[f"{layer} BN"] = ["Multiline", [tag(layer, S.BN_MEAN), tag(layer, S.BN_STD)]]
        mean_std[f"{layer} EN"] = ["Multiline", [tag(layer, S.EN_MEAN), tag(layer, S.EN_STD)]]
    return {"statscope: BN vs EN": bn_en, "statscope: mean vs std": mean_std}
