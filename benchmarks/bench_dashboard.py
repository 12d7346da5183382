"""Latency of every dashboard callback on a 300,000-step × 512-neuron run.

Writes the synthetic store once (``--store``, default a folder under the temp dir; reused when it
exists), builds the app over it, and times each callback as Dash runs it: the Python function plus
the JSON encoding of its result, which is what a browser waits for. "cold" is the first call
after the app starts (store reads included), "warm" the median of five repeats (column cache hot).

    python benchmarks/bench_dashboard.py [--store PATH] [--steps 300000] [--neurons 512]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import plotly

from statscope import schema as S
from statscope.store import Layout, ProbeInfo, is_run

try:
    from statscope.store import RunWriter
except ImportError:
    from statscope.writer import RunWriter


def write_store(path: Path, steps: int, neurons: int, layers: int = 4, groups: int = 8) -> None:
    """A long run: per-neuron random walks plus noise, written chunk by chunk."""
    per = neurons // layers
    probes = tuple(ProbeInfo(name=f"fc{i + 1}", module=f"fc{i + 1}", type="BatchNorm1d",
                             where="input", channel_dim=1, channels=per, groups=groups)
                   for i in range(layers))
    writer = RunWriter(path, Layout(probes=probes), overwrite=True, flush_seconds=float("inf"),
                       attrs={S.ATTR_META: {S.META_BATCH_SIZE: 4, S.META_SEED: 0}})
    rng = np.random.default_rng(0)
    level = np.zeros(neurons, np.float32)
    block = 8192
    for start in range(0, steps, block):
        k = min(block, steps - start)
        drift = np.cumsum(rng.normal(0, 0.01, (k, neurons)).astype(np.float32), axis=0) + level
        level = drift[-1]
        mean = drift + rng.normal(0, 0.3, (k, neurons)).astype(np.float32)
        std = 1 + 0.2 * np.abs(rng.normal(size=(k, neurons))).astype(np.float32)
        g = layers * groups
        writer.append(np.arange(start, start + k), np.full((k, layers), 4 * 128), {
            S.BN_MEAN: mean, S.BN_STD: std,
            S.EN_MEAN: rng.normal(0, 0.05, (k, g)).astype(np.float32),
            S.EN_STD: (1 + 0.02 * rng.normal(size=(k, g))).astype(np.float32)})
    writer.close()


def timed(fn, *args, repeat: int = 5) -> tuple[float, float, int]:
    """(cold ms, warm median ms, JSON bytes) of ``fn(*args)`` plus its JSON encoding."""
    enc = plotly.utils.PlotlyJSONEncoder

    def once():
        t = time.perf_counter()
        out = fn(*args)
        body = json.dumps(out, cls=enc)
        return (time.perf_counter() - t) * 1e3, len(body)

    cold, size = once()
    warm = statistics.median(once()[0] for _ in range(repeat))
    return cold, warm, size


def main() -> None:
    """Write (or reuse) the store, then print a table of callback latencies."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path,
                   default=Path(tempfile.gettempdir()) / "statscope-bench-dashboard")
    p.add_argument("--steps", type=int, default=300_000)
    p.add_argument("--neurons", type=int, default=512)
    args = p.parse_args()
    run = args.store / "bs4-long"
    if not is_run(run):
        t = time.perf_counter()
        write_store(run, args.steps, args.neurons)
        print(f"wrote {run} in {time.perf_counter() - t:.0f} s")

    from statscope.dashboards import callbacks as cb
    from statscope.dashboards.app import create_app

    t = time.perf_counter()
    app = create_app(args.store, warm=False)
    cat = app.catalog
    print(f"create_app (scan + open): {(time.perf_counter() - t) * 1e3:.0f} ms; "
          f"{cat.info('bs4-long').n_steps:,} steps × {cat.dataset('bs4-long').sizes['neuron']} "
          f"neurons; cpu: {os.cpu_count()} cores")
    last = "?run=bs4-long&layer=fc1&neuron=fc1:0&neuron=fc2:0&neuron=fc3:0&neuron=fc4:0"
    full = last + "&window=all"
    zoom = cb.zoom_store({"xaxis.range[0]": 150_000, "xaxis.range[1]": 151_500}, full)
    wide = cb.zoom_store({"xaxis.range[0]": 50_000, "xaxis.range[1]": 250_000}, full)
    heat_zoom = cb.zoom_store({"xaxis.range[0]": 150_000, "xaxis.range[1]": 151_500},
                              full + "&tab=heatmap")
    ctrl = (cat.names(), None, None, S.BN_STD, "last", 200, None, None, "scale_free", "neuron",
            "evolution", None)
    cases = [
        ("page load: URL -> selectors", cb.sync_state, (cat, None, "", None, *ctrl)),
        ("selector change -> URL", cb.sync_state, (cat, "win-kind", last, None, *ctrl)),
        ("poll (no change)", lambda: cb.poll(cat, 1, None), ()),
        ("evolution, last 200 steps", cb.evolution, (cat, last)),
        ("evolution, all 300k steps", cb.evolution, (cat, full)),
        ("evolution, zoom 1,500 steps", cb.evolution, (cat, full, None, zoom)),
        ("evolution, zoom 200k steps", cb.evolution, (cat, full, None, wide)),
        ("fluctuation bars, last 200", cb.fluctuation, (cat, last + "&scale=raw")),
        ("fluctuation bars per layer", cb.fluctuation, (cat, last + "&by=layer")),
        ("std-vs-mean scatter, last 200", cb.scatter, (cat, last)),
        ("layer heatmap, last 200", cb.heatmap, (cat, last + "&tab=heatmap")),
        ("layer heatmap, all 300k", cb.heatmap, (cat, full + "&tab=heatmap")),
        ("layer heatmap, zoom 1,500", cb.heatmap, (cat, full + "&tab=heatmap", None, heat_zoom)),
        ("run panel + claims, last 200", cb.runs_tab, (cat, last)),
    ]
    print(f"\n{'callback':34} {'cold ms':>9} {'warm ms':>9} {'JSON kB':>9}")
    for name, fn, fargs in cases:
        cold, warm, size = timed(fn, *fargs)
        print(f"{name:34} {cold:9.1f} {warm:9.1f} {size / 1e3:9.0f}")
    t = time.perf_counter()
    fresh = create_app(args.store, warm=False).catalog
    cb.prewarm(fresh)
    print(f"\nprewarm (what create_app runs in a background thread): "
          f"{(time.perf_counter() - t) * 1e3:.0f} ms; then the first request:")
    for name, fn, fargs in cases[3:5] + cases[7:10] + cases[-1:]:
        cold, _, _ = timed(fn, fresh, *fargs[1:], repeat=1)
        print(f"{name:34} {cold:9.1f}")


if __name__ == "__main__":
    main()
