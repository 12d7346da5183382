"""Latency of every dashboard callback on a 300,000-step × 512-neuron run, alone and six at once.

Writes the synthetic store once (``--store``, default a folder under the temp dir; reused when it
exists) and five links to it inside the same folder (six runs: the most a page draws side by
side; each has its own caches, as six real runs would), builds the app over them, and times each
callback as Dash runs it: the Python function plus the JSON encoding of its result, which is
what a browser waits for. "cold" is the first call after the app starts (store reads included),
"warm" the median of five repeats (column cache hot).

A second, small store reproduces issue 10's costly link: 256 neurons × all 12,000 steps.

``--baseline DIR`` times an older dashboard beside this one: DIR holds its ``dashboards``
folder, e.g. ``git archive 41fcd3f dashboards | tar -x -C DIR``. The figure callbacks both
versions share are run interleaved (new, old, old, new, ...) and reported as the median ratio.

    python benchmarks/bench_dashboard.py [--store PATH] [--steps 300000] [--neurons 512]
                                         [--baseline DIR]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
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

ALIASES = 5


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


def encoded(fn, *args) -> tuple[float, int]:
    """Milliseconds and JSON bytes of ``fn(*args)`` plus its JSON encoding (as Dash sends it)."""
    t = time.perf_counter()
    body = json.dumps(fn(*args), cls=plotly.utils.PlotlyJSONEncoder)
    return (time.perf_counter() - t) * 1e3, len(body)


def timed(fn, *args, repeat: int = 5) -> tuple[float, float, int]:
    """(cold ms, warm median ms, JSON bytes) of ``fn(*args)`` plus its JSON encoding."""
    cold, size = encoded(fn, *args)
    warm = statistics.median(encoded(fn, *args)[0] for _ in range(repeat))
    return cold, warm, size


def ensure(root: Path, name: str, steps: int, neurons: int, aliases: int = 0) -> None:
    run = root / name
    if not is_run(run):
        t = time.perf_counter()
        write_store(run, steps, neurons)
        print(f"wrote {run} in {time.perf_counter() - t:.0f} s")
    for i in range(2, 2 + aliases):
        link = root / f"{name}-{i}"
        if not link.exists():
            os.symlink(run, link)


def fresh_figure(fn):
    """``fn`` with the evolution figures dropped from the cache first: the cost of a new view
    over columns already read (a repeated view is served from the figure cache)."""

    def call(cat, *args):
        cat.cache.drop(lambda k: len(k) > 3 and k[2] == "memo" and k[3][0] == "evolution")
        return fn(cat, *args)

    call.__name__ = fn.__name__
    return call


def load_baseline(folder: Path):
    """The ``callbacks`` and ``data`` modules of an older dashboard in ``folder/dashboards``."""
    sys.path.insert(0, str(folder))
    try:
        return (importlib.import_module("dashboards.callbacks"),
                importlib.import_module("dashboards.data"))
    finally:
        sys.path.remove(str(folder))


def main() -> None:
    """Write (or reuse) the stores, then print tables of callback latencies."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path,
                   default=Path(tempfile.gettempdir()) / "statscope-bench-dashboard")
    p.add_argument("--steps", type=int, default=300_000)
    p.add_argument("--neurons", type=int, default=512)
    p.add_argument("--baseline", type=Path, help="folder holding an older dashboards package")
    args = p.parse_args()
    ensure(args.store, "bs4-long", args.steps, args.neurons, aliases=ALIASES)
    wide_root = args.store.with_name(args.store.name + "-256")
    ensure(wide_root, "wide", 12_000, 256)

    from statscope.dashboards import callbacks as cb
    from statscope.dashboards.app import create_app

    t = time.perf_counter()
    app = create_app(args.store, warm=False)
    cat = app.catalog
    print(f"create_app (scan + open {len(cat.names())} runs): "
          f"{(time.perf_counter() - t) * 1e3:.0f} ms; {cat.info('bs4-long').n_steps:,} steps × "
          f"{cat.dataset('bs4-long').sizes['neuron']} neurons; cpu: {os.cpu_count()} cores")
    one = "?run=bs4-long&layer=fc1&neuron=fc1:0&neuron=fc2:0&neuron=fc3:0&neuron=fc4:0"
    six = "?" + "&".join(f"run={n}" for n in cat.names()) + one[13:]
    full = one + "&window=all"
    zoom = cb.zoom_store({"xaxis.range[0]": 150_000, "xaxis.range[1]": 151_500}, full)
    wide = cb.zoom_store({"xaxis.range[0]": 50_000, "xaxis.range[1]": 250_000}, full)
    heat_zoom = cb.zoom_store({"xaxis.range[0]": 150_000, "xaxis.range[1]": 151_500},
                              full + "&tab=heatmap")
    ctrl = (cat.names(), None, None, S.BN_STD, "last", 200, None, None, "scale_free", "neuron",
            "evolution", 0, None, None)
    wcat = create_app(wide_root, warm=False).catalog
    many = "?run=wide&window=all" + "".join(f"&neuron=fc{1 + i // 64}:{i % 64}" for i in range(256))
    cases = [
        ("page load: URL -> selectors", cb.sync_state, (cat, None, "", None, *ctrl)),
        ("selector change -> URL", cb.sync_state, (cat, "win-kind", one, None, *ctrl)),
        ("poll (no change)", lambda c: cb.poll(c, 1, None, max_age=0), (cat,)),
        ("evolution, last 200 steps", cb.evolution, (cat, one)),
        ("evolution, all 300k steps", cb.evolution, (cat, full)),
        ("evolution, zoom 1,500 steps", cb.evolution, (cat, full, None, zoom)),
        ("evolution, zoom 200k steps", cb.evolution, (cat, full, None, wide)),
        ("evolution, 6 runs, last 200", cb.evolution, (cat, six)),
        ("evolution, 6 runs, all 300k", cb.evolution, (cat, six + "&window=all")),
        ("  same, figure not cached", fresh_figure(cb.evolution), (cat, six + "&window=all")),
        ("fluctuation bars, last 200", cb.fluctuation, (cat, one + "&scale=raw")),
        ("fluctuation bars per layer", cb.fluctuation, (cat, one + "&by=layer")),
        ("fluctuation bars, 6 runs", cb.fluctuation, (cat, six + "&scale=raw")),
        ("std-vs-mean scatter, last 200", cb.scatter, (cat, one)),
        ("std-vs-mean scatter, 6 runs", cb.scatter, (cat, six)),
        ("layer heatmap, last 200", cb.heatmap, (cat, one + "&tab=heatmap")),
        ("layer heatmap, all 300k", cb.heatmap, (cat, full + "&tab=heatmap")),
        ("layer heatmap, zoom 1,500", cb.heatmap, (cat, full + "&tab=heatmap", None, heat_zoom)),
        ("run panel + claims, last 200", cb.runs_tab, (cat, one)),
        ("256 neurons x all 12k (issue 10)", cb.evolution, (wcat, many)),
    ]
    print(f"\n{'callback':34} {'cold ms':>9} {'warm ms':>9} {'JSON kB':>9}")
    for name, fn, fargs in cases:
        cold, warm, size = timed(fn, *fargs)
        print(f"{name:34} {cold:9.1f} {warm:9.1f} {size / 1e3:9.0f}")
    t = time.perf_counter()
    fresh = create_app(args.store, warm=False).catalog
    cb.prewarm(fresh, ["bs4-long"])
    print(f"\nprewarm of one run (what create_app runs in a background thread): "
          f"{(time.perf_counter() - t) * 1e3:.0f} ms; then the first request:")
    for name, fn, fargs in cases[3:5] + cases[10:12] + cases[13:14] + cases[18:19]:
        cold, _, _ = timed(fn, fresh, *fargs[1:], repeat=1)
        print(f"{name:34} {cold:9.1f}")
    if args.baseline:
        compare(args, cb, cases)


def compare(args, cb, cases, rounds: int = 4) -> None:
    """Median ratio new / old of the figure callbacks, interleaved ABBA, caches warm.

    Both versions cache store columns; only the new one caches whole figures, so its evolution
    figures are dropped from the cache before each call: the ratio compares building a figure,
    not a cache hit. A case the old version takes over 5 s on is compared on one warm call.
    """
    old_cb, old_data = load_baseline(args.baseline)
    new_cat = {"main": cases[3][2][0], "wide": cases[-1][2][0]}
    old_cat = {k: old_data.RunCatalog(c.root) for k, c in new_cat.items()}
    print(f"\nbaseline {args.baseline}: ratio new/old, median of {2 * rounds} interleaved "
          "warm calls (new evolution figures not cached)")
    print(f"{'callback':34} {'old ms':>9} {'new ms':>9} {'new/old':>9}")
    for name, fn, fargs in cases[3:]:
        if name.startswith(" "):
            continue
        key = "wide" if fargs[0] is new_cat["wide"] else "main"
        old_fn = getattr(old_cb, fn.__name__)
        old_args = (old_cat[key], *fargs[1:])
        new_fn = fresh_figure(fn) if fn is cb.evolution else fn
        old_cold, _ = encoded(old_fn, *old_args)
        encoded(new_fn, *fargs)
        if old_cold > 5_000:  # the case: one warm call is enough to make the point
            old, _ = encoded(old_fn, *old_args)
            new = statistics.median(encoded(new_fn, *fargs)[0] for _ in range(3))
            print(f"{name:34} {old:9.0f} {new:9.1f} {new / old:9.3g}  (one old call)")
            continue
        ratios, olds, news = [], [], []
        for _ in range(rounds):
            a, _ = encoded(new_fn, *fargs)
            b1, _ = encoded(old_fn, *old_args)
            b2, _ = encoded(old_fn, *old_args)
            a2, _ = encoded(new_fn, *fargs)
            ratios += [a / b1, a2 / b2]
            olds += [b1, b2]
            news += [a, a2]
        print(f"{name:34} {statistics.median(olds):9.1f} {statistics.median(news):9.1f} "
              f"{statistics.median(ratios):9.3g}")


if __name__ == "__main__":
    main()
