"""Latency of every dashboard callback: a long run, an LLM-sized run and a distributed run.

Three synthetic stores, written once (reused when they exist; ``--store`` is their folder):

* **long**: 300,000 steps × 512 neurons (4 layers of 128), and five links to it inside the same
  folder (six runs: the most a page draws side by side; each has its own caches, as six real
  runs would); plus issue 10's costly link on a 12,000 × 256 store.
* **llm**: 80 layers × 8,192 channels (655,360 neurons), every channel kept per step, window
  summaries of 200 steps, ``--llm-steps`` steps (2,000: ~8.5 GB, about 40 min to write here).
* **ranks**: a two-rank distributed run (``ddp/rank0``, ``ddp/rank1``), 20,000 steps × 512.

Each callback is timed as Dash runs it: the Python function plus the JSON encoding of its
result, which is what a browser waits for. Every round builds a fresh app (empty caches, no
prewarm) and calls each case once **cold**, then five times **warm** (median); rounds
interleave the cases, and the tables give the median over rounds (cold: min–max too). "Cold"
means the dashboard's caches are empty; the operating system's page cache is not dropped, so
after the first round the files are read from memory.

``--baseline DIR`` times an older dashboard beside this one: DIR holds its ``dashboards``
folder, e.g. ``git archive 41fcd3f dashboards | tar -x -C DIR``. The long run's figure callbacks
both versions share are run interleaved (new, old, old, new, ...) and reported as the median
ratio.

    python benchmarks/bench_dashboard.py [--store DIR] [--rounds 3] [--llm-steps 2000]
                                         [--only long,llm,ranks] [--baseline DIR]
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
from statscope.writer import RunWriter

ALIASES = 5
LLM_LAYERS, LLM_CHANNELS = 80, 8192


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


def write_llm_store(path: Path, steps: int, layers: int = LLM_LAYERS,
                    channels: int = LLM_CHANNELS, block: int = 16) -> None:
    """An LLM-sized run: ``layers`` RMSNorm inputs of ``channels`` channels, every channel kept
    per step, window summaries of 200 steps; per channel a slow random walk plus noise."""
    rng = np.random.default_rng(0)
    probes = tuple(ProbeInfo(name=f"layers.{i}.norm", module=f"layers.{i}.norm", type="RMSNorm",
                             where="input", channel_dim=-1, channels=channels)
                   for i in range(layers))
    writer = RunWriter(path, Layout(probes=probes), overwrite=True, flush_seconds=float("inf"),
                       attrs={S.ATTR_META: {S.META_BATCH_SIZE: 8, S.META_SEED: 0}})
    n = layers * channels
    level = rng.normal(0, 1, n).astype(np.float32)
    scale = (1 + rng.random(n)).astype(np.float32)
    for s in range(0, steps, block):
        k = min(block, steps - s)
        noise = rng.standard_normal((k, n), dtype=np.float32)
        level += 0.01 * noise[0]
        writer.append(np.arange(s, s + k), np.full((k, layers), 8 * 4096), {
            S.BN_MEAN: level + 0.1 * noise, S.BN_STD: scale * (1 + 0.05 * np.abs(noise)),
            S.EN_MEAN: rng.normal(0, .01, (k, layers)).astype(np.float32),
            S.EN_STD: (1 + rng.normal(0, .01, (k, layers))).astype(np.float32)},
            scalars={"loss": 3 - np.arange(s, s + k) / steps})
    writer.close()


def write_ranks_store(path: Path, steps: int = 20_000, neurons: int = 512, ranks: int = 2,
                      layers: int = 4) -> None:
    """A distributed run: ``ranks`` stores ``path/rank{r}``, each its own batch's statistics
    (batches of 4, noise around shared drifting levels)."""
    per = neurons // layers
    probes = tuple(ProbeInfo(name=f"fc{i + 1}", module=f"fc{i + 1}", type="BatchNorm1d",
                             where="input", channel_dim=1, channels=per) for i in range(layers))
    rng = np.random.default_rng(1)
    level = np.cumsum(rng.normal(0, 0.01, (steps, neurons)), axis=0).astype(np.float32)
    for r in range(ranks):
        writer = RunWriter(path / f"rank{r}", Layout(probes=probes), overwrite=True,
                           flush_seconds=float("inf"),
                           attrs={S.ATTR_META: {S.META_BATCH_SIZE: 4}, S.ATTR_RANK: r,
                                  S.ATTR_WORLD_SIZE: ranks})
        for start in range(0, steps, 8192):
            k = min(8192, steps - start)
            writer.append(np.arange(start, start + k), np.full((k, layers), 4), {
                S.BN_MEAN: level[start:start + k] + rng.normal(0, .5, (k, neurons)).astype(
                    np.float32),
                S.BN_STD: (1 + 0.3 * np.abs(rng.normal(size=(k, neurons)))).astype(np.float32),
                S.EN_MEAN: rng.normal(0, 0.05, (k, layers)).astype(np.float32),
                S.EN_STD: (1 + 0.02 * rng.normal(size=(k, layers))).astype(np.float32)},
                {"loss": np.full(k, 2.0 + r)})
        writer.close()


def encoded(fn, *args) -> tuple[float, int]:
    """Milliseconds and JSON bytes of ``fn(*args)`` plus its JSON encoding (as Dash sends it)."""
    t = time.perf_counter()
    body = json.dumps(fn(*args), cls=plotly.utils.PlotlyJSONEncoder)
    return (time.perf_counter() - t) * 1e3, len(body)


def ensure(root: Path, name: str, write, aliases: int = 0) -> None:
    run = root / name
    if not is_run(run):
        t = time.perf_counter()
        write(run)
        print(f"wrote {run} in {time.perf_counter() - t:.0f} s", flush=True)
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


def rounds_table(title: str, make, cases, rounds: int, repeat: int = 5) -> dict:
    """Run ``cases`` (name, fn, args after the catalog) on ``rounds`` fresh catalogs from
    ``make()``, cold then ``repeat`` warm calls each; print and return the medians."""
    cold = {c[0]: [] for c in cases}
    warm = {c[0]: [] for c in cases}
    size = {}
    opened = []
    for _ in range(rounds):
        t = time.perf_counter()
        cat = make()
        opened.append((time.perf_counter() - t) * 1e3)
        for name, fn, args in cases:
            ms, size[name] = encoded(fn, cat, *args)
            cold[name].append(ms)
            warm[name].append(statistics.median(encoded(fn, cat, *args)[0]
                                                for _ in range(repeat)))
    print(f"\n{title}: {rounds} rounds, each a fresh app (create_app: median "
          f"{statistics.median(opened):.0f} ms); cold = first call, warm = median of {repeat}")
    print(f"{'callback':40} {'cold ms (min-max)':>24} {'warm ms':>9} {'JSON kB':>9}")
    out = {}
    for name, _, _ in cases:
        c, w = statistics.median(cold[name]), statistics.median(warm[name])
        spread = f"{c:9.1f} ({min(cold[name]):.0f}-{max(cold[name]):.0f})"
        print(f"{name:40} {spread:>24} {w:9.1f} {size[name] / 1e3:9.0f}", flush=True)
        out[name] = (c, w, size[name])
    return out


def controls(runs) -> tuple:
    """The selector values (and no click) that sync_state takes after the version."""
    return (list(runs), None, None, S.BN_STD, "last", 200, None, None, "scale_free", "neuron",
            "evolution", 0, None, None)


def bench_long(args, cb, create_app) -> list:
    """The 300,000 × 512 store, alone and as six runs; issue 10's link."""
    ensure(args.store, "bs4-long", lambda p: write_store(p, args.steps, args.neurons),
           aliases=ALIASES)
    wide_root = args.store.with_name(args.store.name + "-256")
    ensure(wide_root, "wide", lambda p: write_store(p, 12_000, 256))
    names = ["bs4-long"] + [f"bs4-long-{i}" for i in range(2, 2 + ALIASES)]
    one = "?run=bs4-long&layer=fc1&neuron=fc1:0&neuron=fc2:0&neuron=fc3:0&neuron=fc4:0"
    six = "?" + "&".join(f"run={n}" for n in names) + one[13:]
    full = one + "&window=all"
    zoom = cb.zoom_store({"xaxis.range[0]": 150_000, "xaxis.range[1]": 151_500}, full)
    wide = cb.zoom_store({"xaxis.range[0]": 50_000, "xaxis.range[1]": 250_000}, full)
    heat_zoom = cb.zoom_store({"xaxis.range[0]": 150_000, "xaxis.range[1]": 151_500},
                              full + "&tab=heatmap")
    ctrl = controls(names)
    cases = [
        ("page load: URL -> selectors", cb.sync_state, (None, "", None, *ctrl)),
        ("selector change -> URL", cb.sync_state, ("win-kind", one, None, *ctrl)),
        ("poll (no change)", lambda c: cb.poll(c, 1, None, max_age=0), ()),
        ("evolution, last 200 steps", cb.evolution, (one,)),
        ("evolution, all 300k steps", cb.evolution, (full,)),
        ("evolution, zoom 1,500 steps", cb.evolution, (full, None, zoom)),
        ("evolution, zoom 200k steps", cb.evolution, (full, None, wide)),
        ("evolution, 6 runs, last 200", cb.evolution, (six,)),
        ("evolution, 6 runs, all 300k", cb.evolution, (six + "&window=all",)),
        ("  same, figure not cached", fresh_figure(cb.evolution), (six + "&window=all",)),
        ("fluctuation bars, last 200", cb.fluctuation, (one + "&scale=raw",)),
        ("fluctuation bars per layer", cb.fluctuation, (one + "&by=layer",)),
        ("fluctuation bars, 6 runs", cb.fluctuation, (six + "&scale=raw",)),
        ("std-vs-mean scatter, last 200", cb.scatter, (one,)),
        ("std-vs-mean scatter, 6 runs", cb.scatter, (six,)),
        ("layer heatmap, last 200", cb.heatmap, (one + "&tab=heatmap",)),
        ("layer heatmap, all 300k", cb.heatmap, (full + "&tab=heatmap",)),
        ("layer heatmap, zoom 1,500", cb.heatmap, (full + "&tab=heatmap", None, heat_zoom)),
        ("run panel + claims, last 200", cb.runs_tab, (one,)),
    ]
    rounds_table(f"long run ({args.steps:,} steps x {args.neurons} neurons, six runs)",
                 lambda: create_app(args.store, warm=False).catalog, cases, args.rounds)
    many = "?run=wide&window=all" + "".join(f"&neuron=fc{1 + i // 64}:{i % 64}"
                                            for i in range(256))
    rounds_table("issue 10's link: 256 neurons x all 12,000 steps",
                 lambda: create_app(wide_root, warm=False).catalog,
                 [("256 neurons x all 12k", cb.evolution, (many,))], args.rounds)
    t = time.perf_counter()
    fresh = create_app(args.store, warm=False).catalog
    cb.prewarm(fresh, ["bs4-long"])
    print(f"\nprewarm of one run (what create_app runs in a background thread): "
          f"{(time.perf_counter() - t) * 1e3:.0f} ms; then the first request:")
    for name, fn, fargs in cases[3:5] + cases[10:12] + cases[13:14] + cases[18:19]:
        print(f"{name:40} {encoded(fn, fresh, *fargs)[0]:9.1f}")
    return cases


def read_layouts(args, cb, create_app, rounds: int = 2) -> None:
    """Cold views of the long run under the store's two read layouts, interleaved ABBA, a
    fresh app per call: a dask task per shard's rows and chunk's columns (now), and a task per
    whole shard (before the store read a few neurons' chunks only; emulated by reading
    per-step arrays with ``whole_shards=True``)."""
    import functools

    import statscope.store as store

    one = "?run=bs4-long&layer=fc1&neuron=fc1:0&neuron=fc2:0&neuron=fc3:0&neuron=fc4:0"
    views = [("evolution, last 200 steps", cb.evolution, one),
             ("evolution, all 300k steps", cb.evolution, one + "&window=all"),
             ("fluctuation bars, last 200", cb.fluctuation, one + "&scale=raw"),
             ("layer heatmap, all 300k", cb.heatmap, one + "&window=all&tab=heatmap")]
    real = store.lazy
    layouts = {"chunk columns": real, "whole shards": functools.partial(real, whole_shards=True)}
    print(f"\ncold views of the long run under two read layouts, median of {2 * rounds} "
          "interleaved calls, each on a fresh app")
    print(f"{'callback':40} {'chunk cols ms':>14} {'shards ms':>10} {'ratio':>7}")
    try:
        for name, fn, q in views:
            times: dict[str, list[float]] = {k: [] for k in layouts}
            for order in [list(layouts), list(layouts)[::-1]] * rounds:
                for layout in order:
                    store.lazy = layouts[layout]
                    cat = create_app(args.store, warm=False).catalog
                    times[layout].append(encoded(fn, cat, q)[0])
            a, b = (statistics.median(times[k]) for k in layouts)
            print(f"{name:40} {a:14.0f} {b:10.0f} {a / b:7.2f}", flush=True)
    finally:
        store.lazy = real


def bench_llm(args, cb, create_app) -> None:
    """80 layers x 8,192 channels: every callback, cold and warm."""
    root = args.store.with_name(args.store.name + "-llm")
    ensure(root, "llm", lambda p: write_llm_store(p, args.llm_steps))
    one = "?run=llm"
    layer7 = "&layer=layers.7.norm"
    zoom = cb.zoom_store({"xaxis.range[0]": 500, "xaxis.range[1]": 900}, one + "&window=all")

    def search(cat):
        return cb.sync_state(cat, "neuron-search", one, None, *controls(["llm"]),
                             search_value="layers.7.norm[81")

    cases = [
        ("page load: URL -> selectors", cb.sync_state, (None, "", None, *controls(["llm"]))),
        ("selector change -> URL", cb.sync_state, ("win-kind", one, None, *controls(["llm"]))),
        ("neuron search 'layers.7.norm[81'", search, ()),
        ("poll (no change)", lambda c: cb.poll(c, 1, None, max_age=0), ()),
        ("evolution, last 200 (16 neurons)", cb.evolution, (one,)),
        ("evolution, all steps", cb.evolution, (one + "&window=all",)),
        ("evolution, zoom 400 steps", cb.evolution, (one + "&window=all", None, zoom)),
        ("  same, figure not cached", fresh_figure(cb.evolution), (one + "&window=all",)),
        ("fluctuation bars, last 200", cb.fluctuation, (one + "&tab=fluctuation",)),
        ("fluctuation bars, raw", cb.fluctuation, (one + "&tab=fluctuation&scale=raw",)),
        ("fluctuation bars per layer", cb.fluctuation, (one + "&tab=fluctuation&by=layer",)),
        ("fluctuation bars, all steps", cb.fluctuation, (one + "&tab=fluctuation&window=all",)),
        ("std-vs-mean scatter, last 200", cb.scatter, (one + "&tab=scatter",)),
        ("layer heatmap (8,192 wide), last 200", cb.heatmap, (one + "&tab=heatmap" + layer7,)),
        ("layer heatmap, all steps", cb.heatmap, (one + "&tab=heatmap&window=all" + layer7,)),
        ("run panel + claims (sample)", cb.runs_tab, (one + "&tab=run",)),
    ]
    t = time.perf_counter()
    cat = create_app(root, warm=False).catalog
    print(f"\nLLM run: create_app {(time.perf_counter() - t) * 1e3:.0f} ms; "
          f"{cat.info('llm').n_steps:,} steps x {cat.dataset('llm').sizes['neuron']:,} neurons")
    res = rounds_table(f"LLM run ({LLM_LAYERS} x {LLM_CHANNELS:,} channels)",
                       lambda: create_app(root, warm=False).catalog, cases, args.rounds)
    slow = [n for n, (_, w, _) in res.items() if w >= 100]
    print("every callback < 100 ms warm" if not slow else f"warm >= 100 ms: {slow}")
    t = time.perf_counter()
    fresh = create_app(root, warm=False).catalog
    cb.prewarm(fresh, ["llm"])
    print(f"prewarm of the LLM run: {(time.perf_counter() - t) * 1e3:.0f} ms; then the first "
          "request:")
    for name, fn, fargs in [cases[i] for i in (4, 8, 10, 12, 15)]:
        print(f"{name:40} {encoded(fn, fresh, *fargs)[0]:9.1f}")
    if args.series:
        sources_compare(root)


def sources_compare(root: Path, layers: int = 8, rounds: int = 2) -> None:
    """The two sources of the fluctuation views on the same numbers: ``layers`` layers of the
    LLM run (the analyses on every neuron of all 80 need over 22 GB: the benchmark's first try
    was OOM-killed on this 24 GB machine), last 200 steps, from the per-step series
    (``statscope.analyses.fluctuation``) and from the window summaries; interleaved ABBA,
    each read from the store every time (the stores opened once, as the dashboard keeps them)."""
    import statscope
    from statscope import analyses as A
    from statscope.dashboards.sources import windowed
    from statscope.store import open_windows

    cols = slice(0, layers * LLM_CHANNELS)
    ds = statscope.open_run(root / "llm").isel(neuron=cols)
    w = open_windows(root / "llm").isel(neuron=cols)

    def series():
        return A.fluctuation(ds, 200)

    def summaries():
        return windowed(w, (w.sizes["window"] - 1, w.sizes["window"]))[0]

    times = {"series": [], "windows": []}
    out = {}
    for order in [("series", "windows"), ("windows", "series")] * rounds:
        for name in order:
            t = time.perf_counter()
            out[name] = (series if name == "series" else summaries)()
            times[name].append((time.perf_counter() - t) * 1e3)
    diff = max(float(np.nanmax(np.abs(out["series"][s].values / out["windows"][s].values - 1)))
               for s in (S.BN_MEAN, S.BN_STD))
    a, b = statistics.median(times["series"]), statistics.median(times["windows"])
    print(f"\nfluctuation of {layers} layers ({layers * LLM_CHANNELS:,} neurons), last 200 steps, "
          f"median of {2 * rounds} interleaved: per-step series {a:,.0f} ms, window summaries "
          f"{b:,.0f} ms ({a / b:.1f}x); largest relative difference {diff:.1e}")


def bench_ranks(args, cb, create_app) -> None:
    """A two-rank run of 20,000 steps x 512 neurons under every rank choice."""
    root = args.store.with_name(args.store.name + "-ranks")
    run = root / "ddp"
    if not is_run(run):
        t = time.perf_counter()
        write_ranks_store(run)
        print(f"wrote {run} in {time.perf_counter() - t:.0f} s")
    one = "?run=ddp&neuron=fc1:0&neuron=fc2:0&neuron=fc3:0&neuron=fc4:0"
    cases = [
        ("page load: URL -> selectors", cb.sync_state,
         (None, one + "&rank=each", None, *controls(["ddp"]))),
        ("evolution, merged, last 200", cb.evolution, (one,)),
        ("evolution, merged, all 20k", cb.evolution, (one + "&window=all",)),
        ("evolution, rank 1, all 20k", cb.evolution, (one + "&window=all&rank=1",)),
        ("evolution, each rank + merged, all", cb.evolution, (one + "&window=all&rank=each",)),
        ("  same, figure not cached", fresh_figure(cb.evolution),
         (one + "&window=all&rank=each",)),
        ("fluctuation, merged", cb.fluctuation, (one + "&tab=fluctuation",)),
        ("fluctuation, each rank + gap", cb.fluctuation, (one + "&tab=fluctuation&rank=each",)),
        ("fluctuation, each, per layer", cb.fluctuation,
         (one + "&tab=fluctuation&rank=each&by=layer",)),
        ("std-vs-mean scatter, rank 0", cb.scatter, (one + "&tab=scatter&rank=0",)),
        ("layer heatmap, merged, all 20k", cb.heatmap, (one + "&tab=heatmap&window=all",)),
        ("run panel + claims, merged", cb.runs_tab, (one + "&tab=run",)),
    ]
    rounds_table("distributed run (2 ranks x 20,000 steps x 512 neurons)",
                 lambda: create_app(root, warm=False).catalog, cases, args.rounds)


def load_baseline(folder: Path):
    """The ``callbacks`` and ``data`` modules of an older dashboard in ``folder/dashboards``."""
    sys.path.insert(0, str(folder))
    try:
        return (importlib.import_module("dashboards.callbacks"),
                importlib.import_module("dashboards.data"))
    finally:
        sys.path.remove(str(folder))


def compare(args, cb, cases, rounds: int = 4) -> None:
    """Median ratio new / old of the long run's figure callbacks, interleaved ABBA, caches warm.

    Both versions cache store columns; only the new one caches whole figures, so its evolution
    figures are dropped from the cache before each call: the ratio compares building a figure,
    not a cache hit. A case the old version takes over 5 s on is compared on one warm call.
    """
    from statscope.dashboards.app import create_app

    old_cb, old_data = load_baseline(args.baseline)
    new_cat = create_app(args.store, warm=False).catalog
    old_cat = old_data.RunCatalog(new_cat.root)
    print(f"\nbaseline {args.baseline}: ratio new/old, median of {2 * rounds} interleaved "
          "warm calls (new evolution figures not cached)")
    print(f"{'callback':40} {'old ms':>9} {'new ms':>9} {'new/old':>9}")
    for name, fn, fargs in cases[3:]:
        if name.startswith(" ") or not hasattr(old_cb, fn.__name__):
            continue
        old_fn = getattr(old_cb, fn.__name__)
        new_fn = fresh_figure(fn) if fn is cb.evolution else fn
        old_cold, _ = encoded(old_fn, old_cat, *fargs)
        encoded(new_fn, new_cat, *fargs)
        if old_cold > 5_000:  # one warm call is enough to make the point
            old, _ = encoded(old_fn, old_cat, *fargs)
            new = statistics.median(encoded(new_fn, new_cat, *fargs)[0] for _ in range(3))
            print(f"{name:40} {old:9.0f} {new:9.1f} {new / old:9.3g}  (one old call)")
            continue
        ratios, olds, news = [], [], []
        for _ in range(rounds):
            a, _ = encoded(new_fn, new_cat, *fargs)
            b1, _ = encoded(old_fn, old_cat, *fargs)
            b2, _ = encoded(old_fn, old_cat, *fargs)
            a2, _ = encoded(new_fn, new_cat, *fargs)
            ratios += [a / b1, a2 / b2]
            olds += [b1, b2]
            news += [a, a2]
        print(f"{name:40} {statistics.median(olds):9.1f} {statistics.median(news):9.1f} "
              f"{statistics.median(ratios):9.3g}")


def main() -> None:
    """Write (or reuse) the stores, then print tables of callback latencies."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path,
                   default=Path(tempfile.gettempdir()) / "statscope-bench-dashboard")
    p.add_argument("--steps", type=int, default=300_000)
    p.add_argument("--neurons", type=int, default=512)
    p.add_argument("--llm-steps", type=int, default=2_000)
    p.add_argument("--rounds", type=int, default=3, help="fresh apps per table (cold calls)")
    p.add_argument("--only", default="long,layouts,llm,ranks",
                   help="which of long, layouts (the long run's cold views under two store read "
                        "layouts), llm, ranks to run")
    p.add_argument("--series", action="store_true",
                   help="also time the fluctuation of 8 of the LLM run's layers from the "
                        "per-step series against the window summaries (a few GB of memory)")
    p.add_argument("--baseline", type=Path, help="folder holding an older dashboards package")
    args = p.parse_args()
    only = set(args.only.split(","))

    from statscope.dashboards import callbacks as cb
    from statscope.dashboards.app import create_app

    print(f"cpu: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
    cases = bench_long(args, cb, create_app) if "long" in only else None
    if "layouts" in only:
        read_layouts(args, cb, create_app)
    if "llm" in only:
        bench_llm(args, cb, create_app)
    if "ranks" in only:
        bench_ranks(args, cb, create_app)
    if args.baseline and cases:
        compare(args, cb, cases)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
