"""Independent references for the export tests: numpy fluctuation per window, event-file reading."""

import warnings

import numpy as np

STATS = ("bn_mean", "bn_std", "en_mean", "en_std")


def reference_window(data, count, layers, steps, lo, hi):
    """Per-neuron fluctuation of steps [lo, hi), raw and scale-free, with plain numpy.

    Args:
        data: {stat: (T, n_neurons) float} with EN already expanded to neurons.
        count: (T, n_neurons) elements per channel; 0 where the layer did not run.
        layers: (n_neurons,) layer name per neuron.
        steps: (T,) global steps.

    Returns:
        {(scale_free, stat): (n_neurons,) float64}; NaN where fewer than 2 valid steps; the
        scale-free one ±inf (or NaN) where σ̄ is 0.
    """
    rows = (steps >= lo) & (steps < hi)
    n = count[rows].astype(np.float64)
    out = {}
    bn_std = data["bn_std"][rows].astype(np.float64)
    ok_std = (n > 0) & np.isfinite(bn_std)
    s2 = np.where(ok_std & (n > 1), bn_std ** 2 * n / np.where(n > 1, n - 1, 1), np.nan)
    with warnings.catch_warnings():  # a neuron without valid steps has σ̄ NaN, as intended
        warnings.simplefilter("ignore", RuntimeWarning)
        sigma = np.sqrt(np.nanmean(s2, axis=0))
    for stat in STATS:
        x = data[stat][rows].astype(np.float64)
        ok = (n > 0) & np.isfinite(x)
        sd = np.full(x.shape[1], np.nan)
        for j in range(x.shape[1]):
            v = x[ok[:, j], j]
            if v.size >= 2:
                sd[j] = np.std(v, ddof=1)
        out[(False, stat)] = sd
        with np.errstate(divide="ignore", invalid="ignore"):  # σ̄ 0: inf or NaN, as intended
            out[(True, stat)] = sd / sigma
    return out


def read_events(log_dir):
    """Every scalar and histogram in the event files under ``log_dir``.

    Returns:
        (scalars {tag: {step: value}}, histograms {tag: {step: HistogramValue}},
        the EventAccumulator).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0,
                                                        "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: {e.step: e.value for e in acc.Scalars(t)} for t in tags["scalars"]}
    hists = {t: {e.step: e.histogram_value for e in acc.Histograms(t)} for t in tags["histograms"]}
    return scalars, hists, acc
