"""Benchmark statscope.analyses on a run the size of the paper's bs-4 MNIST run.

300,000 steps x 512 neurons (four FC layers of 128, BatchNorm1d inputs, batch 4), written once
with the real RunWriter to a zarr store, then timed in fresh subprocesses (so peak RSS is per
task):

* ``statscope analyze RUN`` (default window: the last 200 steps) through ``cli.main``;
* ``fluctuation(ds, "all")``: the full-run fluctuation (reads all 300k rows);
* ``claims(ds)`` on the default window.

Usage: python benchmarks/bench_analyses.py [--steps 300000] [--dir /tmp/statscope-bench]
Not a timed test: it prints seconds and peak RSS; record them in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

TASKS = {
    "analyze (last 200 steps, CLI)":
        "from statscope.cli import main; rc = main(['analyze', PATH, '-o', os.devnull])",
    "fluctuation(window='all')":
        "import statscope, statscope.analyses as A; A.fluctuation(statscope.open_run(PATH), 'all')",
    "fluctuation(window='all', detrend=True)":
        "import statscope, statscope.analyses as A; "
        "A.fluctuation(statscope.open_run(PATH), 'all', detrend=True)",
    "claims (last 200 steps, 1000 replicates)":
        "import statscope, statscope.analyses as A; A.claims(statscope.open_run(PATH))",
}


def write(path: str, steps: int, batch: int = 4, layers: int = 4, width: int = 128) -> None:
    from statscope import schema as S
    from statscope.store import Layout, ProbeInfo
    from statscope.writer import RunWriter

    probes = tuple(ProbeInfo(name=f"bn{i + 1}", module=f"bn{i + 1}", type="BatchNorm1d",
                             where="input", channel_dim=1, channels=width,
                             norm={"momentum": 0.1, "eps": 1e-5, "track_running_stats": True,
                                   "num_batches_tracked": 0}) for i in range(layers))
    layout = Layout(probes=probes, stats=S.DEFAULT_STATS)
    w = RunWriter(path, layout, overwrite=True, flush_seconds=float("inf"),
                  attrs={S.ATTR_META: {S.META_BATCH_SIZE: batch}})
    rng = np.random.default_rng(0)
    n = layers * width
    block = 10_000
    for lo in range(0, steps, block):
        k = min(block, steps - lo)
        x = rng.standard_normal((k, batch, n)).astype(np.float32)
        en = x.reshape(k, batch, layers, width)
        w.append(np.arange(lo, lo + k), np.full((k, layers), batch),
                 {S.BN_MEAN: x.mean(1), S.BN_STD: x.std(1), S.EN_MEAN: en.mean((1, 3)),
                  S.EN_STD: en.std((1, 3))})
    w.close()


def measure(code: str, path: str) -> dict:
    script = (f"import os, time, resource; PATH = {path!r}; t = time.perf_counter(); {code}; "
              "print(time.perf_counter() - t, "
              "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                         text=True).stdout.split()
    return {"seconds": round(float(out[-2]), 2), "peak_rss_mib": round(float(out[-1]))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300_000)
    ap.add_argument("--dir", default="/tmp/statscope-bench")
    args = ap.parse_args()
    path = os.path.join(args.dir, f"bs4-{args.steps}")
    if not os.path.exists(path):
        t = time.perf_counter()
        write(path, args.steps)
        print(f"wrote {path} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    results = {name: measure(code, path) for name, code in TASKS.items()}
    print(json.dumps({"steps": args.steps, "neurons": 512, "cpus": os.cpu_count(),
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
