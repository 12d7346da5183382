"""Benchmark statscope.analyses: a run the size of the paper's bs-4 MNIST run, and the report.

1. 300,000 steps x 512 neurons (four FC layers of 128, BatchNorm1d inputs, batch 4), written once
   with the real RunWriter to a zarr store, then timed in fresh subprocesses (so peak RSS is per
   task): ``statscope analyze RUN`` (the last 200 steps), ``fluctuation(ds, "all")`` (plain
   and detrended, every row), ``claims(ds)`` on the default window.
2. ``statscope report`` and ``statscope analyze`` on the 6-run sweep of the issue (mnist-fc,
   batch sizes 4 and 128, seeds 0-2; made with ``statscope sweep`` when ``--sweep`` is missing,
   ~20 s per run). With ``--baseline REV`` the same commands of statscope at git revision REV
   (extracted with ``git archive``, nothing in the working tree changes) run interleaved with
   today's, A B B A, and the median ratio of wall and CPU time is printed.

3. With ``--cluster``: ``statscope report`` on 20 synthetic runs of 20,000 steps x 1,024
   neurons (issue 14) in one process, and on a 2-worker dask.distributed LocalCluster
   (``--scheduler ADDRESS``; worker processes of one thread, the cluster started fresh for each
   measurement and its start-up not counted), alternating A B B A: wall seconds, the command's
   own peak RSS, and each worker's peak RSS (VmHWM read on the worker).

Usage: python benchmarks/bench_analyses.py [--steps 300000] [--dir /tmp/statscope-bench]
           [--sweep DIR] [--baseline REV] [--repeats 2] [--skip-large] [--skip-sweep]
           [--cluster] [--cluster-runs 20] [--cluster-steps 20000]
Not a timed test: it prints seconds (wall and CPU), peak RSS and ratios; record them in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
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

SWEEP_TASKS = {
    "report -o report.html": ["report", "{sweep}", "-o", "{out}/report.html"],
    "report -o report.md": ["report", "{sweep}", "-o", "{out}/report.md"],
    "analyze (6 runs, last 200 steps)": ["analyze", "{sweep}", "-o", "{out}/analyze.txt"],
}
BASELINE_TASKS = {  # what the same work was called at the baseline revision
    "report -o report.html": ["report", "{sweep}", "-o", "{out}/report.md"],
    "report -o report.md": ["report", "{sweep}", "-o", "{out}/report.md"],
    "analyze (6 runs, last 200 steps)": ["analyze", "{sweep}", "-o", "{out}/analyze.txt"],
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


def write_synthetic(path: str, steps: int, batch: int, seed: int, layers: int = 4,
                    width: int = 256) -> None:
    """A run whose statistics are drawn directly (no batches): bn_mean ~ N(0, 1/batch), bn_std ~
    1 + N(0, 1/(2 batch)) per step and channel, EN per layer likewise; fast to make at scale."""
    from statscope import schema as S
    from statscope.store import Layout, ProbeInfo
    from statscope.writer import RunWriter

    probes = tuple(ProbeInfo(name=f"bn{i + 1}", module=f"bn{i + 1}", type="BatchNorm1d",
                             where="input", channel_dim=1, channels=width)
                   for i in range(layers))
    w = RunWriter(path, Layout(probes=probes, stats=S.DEFAULT_STATS), overwrite=True,
                  flush_seconds=float("inf"),
                  attrs={S.ATTR_META: {S.META_BATCH_SIZE: batch, S.META_SEED: seed}})
    rng = np.random.default_rng(seed * 1000 + batch)
    n = layers * width
    for lo in range(0, steps, 5000):
        k = min(5000, steps - lo)
        sd = 1 / np.sqrt(batch)
        w.append(np.arange(lo, lo + k), np.full((k, layers), batch),
                 {S.BN_MEAN: (rng.standard_normal((k, n)) * sd).astype(np.float32),
                  S.BN_STD: (1 + rng.standard_normal((k, n)) * sd / np.sqrt(2)).astype(
                      np.float32),
                  S.EN_MEAN: (rng.standard_normal((k, layers)) * sd / 16).astype(np.float32),
                  S.EN_STD: (1 + rng.standard_normal((k, layers)) * sd / 23).astype(
                      np.float32)})
    w.close()


def _worker_peaks(client) -> list[int]:
    def peak() -> int:
        return int([line.split()[1] for line in open("/proc/self/status")
                    if line.startswith("VmHWM")][0]) // 1024

    return sorted(client.run(peak).values())


def bench_cluster(root: str, n_runs: int, steps: int, repeats: int, order: str = "ABBA"
                  ) -> dict:
    """report on ``n_runs`` synthetic runs: one process against a 2-worker LocalCluster, ABBA."""
    import logging

    from distributed import Client, LocalCluster

    runs = os.path.join(root, f"cluster-{n_runs}x{steps}")
    sizes = (4, 16, 64, 256)
    if not os.path.isdir(runs) or len([p for p in os.listdir(runs) if p.startswith("bs")]) \
            < n_runs:
        t = time.perf_counter()
        for k in range(n_runs):
            bs, seed = sizes[k % len(sizes)], k // len(sizes)
            write_synthetic(os.path.join(runs, f"bs{bs}-s{seed}"), steps, bs, seed)
        print(f"wrote {n_runs} runs in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    out = tempfile.mkdtemp(prefix="statscope-bench-cluster-")
    argv = ["report", runs, "-o", os.path.join(out, "report.md")]
    results = {"one process": [], "2-worker LocalCluster": []}
    for _ in range(repeats):
        for who in (("one process" if c == "A" else "2-worker LocalCluster") for c in order):
            if who == "one process":
                results[who].append(_cli(argv, None))
                print(f"{who}: {json.dumps(results[who][-1])}", file=sys.stderr, flush=True)
                continue
            t = time.perf_counter()
            with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                              dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
                    Client(cluster) as client:
                start = round(time.perf_counter() - t, 2)
                entry = _cli([*argv, "--scheduler", cluster.scheduler_address], None)
                entry["worker_peak_rss_mib"] = _worker_peaks(client)
                entry["cluster_start_s"] = start
            results[who].append(entry)
            print(f"{who}: {json.dumps(entry)}", file=sys.stderr, flush=True)
    a, b = results["2-worker LocalCluster"], results["one process"]
    return {"runs": n_runs, "steps": steps, "neurons": 1024, "results": results,
            "wall_ratio_cluster_over_one": round(statistics.median(
                x["wall_s"] / y["wall_s"] for x, y in zip(a, b)), 3)}


def measure(code: str, path: str) -> dict:
    script = (f"import os, time; PATH = {path!r}; t = time.perf_counter(); {code}; "
              "print(time.perf_counter() - t, int([l.split()[1] for l in open('/proc/self/status')"
              " if l.startswith('VmHWM')][0]) / 1024)")
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                         text=True, cwd=tempfile.gettempdir()).stdout.split()
    return {"seconds": round(float(out[-2]), 2), "peak_rss_mib": round(float(out[-1]))}


def _cli(argv: list[str], pythonpath: str | None) -> dict:
    """One CLI command in a fresh interpreter: wall seconds, CPU seconds, peak RSS."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent
    code = ("import atexit, sys; atexit.register(lambda: sys.stderr.write('\\npeak-rss-kib ' + "
            "[l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0] + "
            "'\\n')); from statscope.cli import main; sys.exit(main(sys.argv[1:]))")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    # run outside the repository: its statscope/ folder would shadow the baseline's
    proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True,
                          text=True, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rss = [line for line in proc.stderr.splitlines() if line.startswith("peak-rss-kib")]
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "peak_rss_mib": round(int(rss[-1].split()[1]) / 1024) if rss else None}


def baseline_tree(rev: str) -> str:
    """statscope at ``rev`` laid out as an importable package (package-dir as in pyproject)."""
    root = tempfile.mkdtemp(prefix="statscope-baseline-")
    src = os.path.join(root, "src")
    os.makedirs(src)
    archive = subprocess.run(["git", "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    pkg = os.path.join(root, "statscope")
    shutil.copytree(os.path.join(src, "statscope"), pkg)
    for sub in ("probes", "analyses", "dashboards"):
        if os.path.isdir(os.path.join(src, sub)):
            shutil.copytree(os.path.join(src, sub), os.path.join(pkg, sub))
    return root


def make_sweep(path: str) -> None:
    subprocess.run([sys.executable, "-m", "statscope", "sweep", "mnist-fc", "--bs", "4", "128",
                    "--seeds", "0", "1", "2", "--out", path, "--quiet"], check=True)


def bench_sweep(sweep: str, baseline: str | None, repeats: int) -> dict:
    out = tempfile.mkdtemp(prefix="statscope-bench-out-")
    base_path = baseline_tree(baseline) if baseline else None
    results = {}
    for name, argv in SWEEP_TASKS.items():
        now = [a.format(sweep=sweep, out=out) for a in argv]
        then = [a.format(sweep=sweep, out=out) for a in BASELINE_TASKS[name]]
        runs = {"now": [], "baseline": []}
        for _ in range(repeats):
            order = ("now", "baseline", "baseline", "now") if base_path else ("now",)
            for who in order:
                runs[who].append(_cli(now if who == "now" else then,
                                      None if who == "now" else base_path))
        entry = {"now": runs["now"]}
        if base_path:
            entry["baseline"] = runs["baseline"]
            for key in ("wall_s", "cpu_s"):
                entry[f"{key}_ratio_now_over_baseline"] = round(statistics.median(
                    a[key] / b[key] for a, b in zip(runs["now"], runs["baseline"])), 3)
        results[name] = entry
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300_000)
    ap.add_argument("--dir", default="/tmp/statscope-bench")
    ap.add_argument("--sweep", help="the 6-run mnist-fc sweep (made here when missing)")
    ap.add_argument("--baseline", help="git revision to compare the sweep commands with")
    ap.add_argument("--repeats", type=int, default=2, help="ABBA rounds per sweep task")
    ap.add_argument("--skip-large", action="store_true", help="only the sweep tasks")
    ap.add_argument("--skip-sweep", action="store_true", help="no 6-run sweep tasks")
    ap.add_argument("--cluster", action="store_true",
                    help="report on synthetic runs: one process vs a 2-worker LocalCluster")
    ap.add_argument("--cluster-runs", type=int, default=20)
    ap.add_argument("--cluster-steps", type=int, default=20_000)
    ap.add_argument("--cluster-order", default="ABBA",
                    help="A: one process, B: the cluster; AB when time is short")
    args = ap.parse_args()
    report = {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    if not args.skip_large:
        path = os.path.join(args.dir, f"bs4-{args.steps}")
        if not os.path.exists(path):
            t = time.perf_counter()
            write(path, args.steps)
            print(f"wrote {path} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        report.update({"steps": args.steps, "neurons": 512,
                       "results": {name: measure(code, path) for name, code in TASKS.items()}})
    if not args.skip_sweep:
        sweep = args.sweep or os.path.join(args.dir, "sweep-mnist-fc")
        if not os.path.isdir(sweep) or len(os.listdir(sweep)) < 6:
            make_sweep(sweep)
        report["sweep"] = bench_sweep(sweep, args.baseline, args.repeats)
    if args.cluster:
        report["cluster"] = bench_cluster(args.dir, args.cluster_runs, args.cluster_steps,
                                          max(1, args.repeats // 2), args.cluster_order)
    report["load_avg_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
