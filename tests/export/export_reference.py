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


def read_records(log_dir):
    """Every event in the event files under ``log_dir``, read without TensorBoard's loader: the
    TFRecord framing parsed here, each length and payload checked against its masked CRC-32C.

    A truncated last record (a writer killed mid-write) ends its file's reading, as TensorBoard
    does; a record whose checksum is wrong is an error.

    Returns:
        (points [(tag, step, value or HistogramProto)], one entry per event, duplicates kept;
        the names of files that ended in a truncated record).
    """
    import os
    import struct

    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    points, truncated = [], []
    for root, _, files in os.walk(log_dir):
        for name in sorted(f for f in files if "tfevents" in f):
            with open(os.path.join(root, name), "rb") as f:
                raw = f.read()
            at = 0
            while at < len(raw):
                if at + 12 > len(raw):
                    truncated.append(name)
                    break
                header = raw[at:at + 8]
                (n,) = struct.unpack("<Q", header)
                assert struct.unpack("<I", raw[at + 8:at + 12])[0] == masked_crc32c(header), name
                if at + 12 + n + 4 > len(raw):
                    truncated.append(name)
                    break
                data = raw[at + 12:at + 12 + n]
                assert struct.unpack("<I", raw[at + 12 + n:at + 16 + n])[0] == masked_crc32c(data)
                at += 16 + n
                event = event_pb2.Event.FromString(data)
                for v in event.summary.value:
                    kind = v.WhichOneof("value")
                    if kind == "simple_value":
                        points.append((v.tag, event.step, v.simple_value))
                    elif kind == "histo":
                        points.append((v.tag, event.step, v.histo))
    return points, truncated


def reference_export(full, ncount, layers, steps, window, scalars=None, offset=0):
    """What an export of a run must hold, with plain numpy: complete windows aligned at
    multiples of ``window`` (the last step at or past their end), at their last step + offset.

    Args:
        full: {stat: (T, n_neurons)} as open_run shows them (EN expanded to neurons).
        ncount: (T, n_neurons); layers: (n_neurons,) names; steps: (T,) global steps.
        scalars: {name: (T,)}; NaN: not logged.

    Returns:
        (scalars {tag: {step: value}}, histograms {tag: {step: (n,) finite values}}).
    """
    out_s, out_h = {}, {}
    k_last = (int(steps[-1]) + 1) // window
    for k in range(int(np.ceil(steps[0] / window)), k_last):
        ref = reference_window(full, ncount, layers, steps, k * window, (k + 1) * window)
        at = (k + 1) * window - 1 + offset
        for (scale_free, stat), per_neuron in ref.items():
            suffix = "_scale_free" if scale_free else ""
            for layer in dict.fromkeys(layers):
                values = per_neuron[layers == layer]
                if not np.all(np.isnan(values)):
                    with warnings.catch_warnings():  # ±inf medians are values
                        warnings.simplefilter("ignore", RuntimeWarning)
                        out_s.setdefault(f"fluctuation{suffix}/{layer}/{stat}", {})[at] = \
                            float(np.nanmedian(values))
                finite = values[np.isfinite(values)]
                if finite.size:
                    out_h.setdefault(f"neurons{suffix}/{layer}/{stat}", {})[at] = finite
    for name, values in (scalars or {}).items():
        ok = ~np.isnan(values)
        if ok.any():
            out_s[f"scalars/{name}"] = {int(s) + offset: float(v)
                                        for s, v in zip(steps[ok], values[ok])}
    return out_s, out_h


def assert_export_equals(log_dir, expect_scalars, expect_hists, rel=1e-5):
    """The event files under ``log_dir`` hold exactly the expected points, each once (read with
    :func:`read_records`); histograms compared by count, sum, min, max and bucket total."""
    import pytest

    points, _ = read_records(log_dir)
    got_s, got_h = {}, {}
    for tag, step, value in points:
        target = got_h if tag.startswith("neurons") else got_s
        assert step not in target.setdefault(tag, {}), f"{tag} at step {step} twice"
        target[tag][step] = value
    assert got_s.keys() == expect_scalars.keys()
    for tag, want in expect_scalars.items():
        assert got_s[tag].keys() == want.keys(), tag
        for step, v in want.items():
            assert got_s[tag][step] == pytest.approx(v, rel=rel), (tag, step)
    assert got_h.keys() == expect_hists.keys()
    for tag, want in expect_hists.items():
        assert got_h[tag].keys() == want.keys(), tag
        for step, values in want.items():
            h = got_h[tag][step]
            assert h.num == values.size == sum(h.bucket), (tag, step)
            assert h.sum == pytest.approx(values.sum(), rel=1e-6)
            assert (h.min, h.max) == pytest.approx((values.min(), values.max()), rel=1e-6)


def append_rows(path, data, count, scalars, start, stop, resume=True):
    """Append rows ``start..stop-1`` of ``data`` to the run at ``path`` as a resumed writer would
    (``resume=True``: after its last step; ``resume=start``: its rows from there on replaced)."""
    from statscope.store import Layout, ProbeInfo, read_attrs
    from statscope.writer import RunWriter

    attrs = read_attrs(path)
    probes = [ProbeInfo(**{k: p[k] for k in ("name", "module", "type", "where", "channel_dim",
                                             "channels")}) for p in attrs["probes"]]
    writer = RunWriter(path, Layout(tuple(probes), tuple(attrs["stats"])), resume=resume,
                       flush_seconds=0.0)
    writer.append(np.arange(start, stop), count[start:stop],
                  {s: v[start:stop] for s, v in data.items()},
                  {k: v[start:stop] for k, v in scalars.items()})
    writer.close()
