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

4. With ``--ci``: the dashboard's fluctuation view with window "all" — ``fluctuation_ci(ds,
   "all", n_boot=200)``, plain and scale-free — on a synthetic run of 6,000 steps x 512 neurons
   (4 layers of 128, AR(1) series with drift, written by ``statscope.writer.write_run``), in
   fresh subprocesses: seconds and peak RSS. With ``--baseline REV`` or ``--baseline-overlay
   DIR`` (a folder of files laid over today's tree at the same paths, e.g. the old
   ``analyses/resampling.py``) the same call of that tree runs alternately, A B B A, and the
   intervals of both are compared (the bootstrap must give the same numbers).

Usage: python benchmarks/bench_analyses.py [--steps 300000] [--dir /tmp/statscope-bench]
           [--sweep DIR] [--baseline REV] [--repeats 2] [--skip-large] [--skip-sweep]
           [--cluster] [--cluster-runs 20] [--cluster-steps 20000]
           [--ci] [--ci-steps 6000] [--baseline-overlay DIR]
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


def write_ar(path: str, steps: int, layers: int = 4, width: int = 128) -> None:
    """A run of AR(1) statistics with a slow drift (autocorrelated like training series), so
    the bootstrap picks blocks of tens to hundreds of steps."""
    from statscope.writer import write_run

    rng = np.random.default_rng(0)

    def ar(shape, phi):
        e = rng.standard_normal(shape)
        x = np.empty(shape)
        x[0] = e[0]
        for t in range(1, shape[0]):
            x[t] = phi * x[t - 1] + e[t]
        return x

    n = layers * width
    drift = np.linspace(1.0, 0.5, steps)[:, None]
    data = {"bn_mean": 0.2 + 0.05 * ar((steps, n), 0.5) + 0.01 * drift,
            "bn_std": np.abs(1.0 + 0.1 * ar((steps, n), 0.7)) * drift,
            "en_mean": 0.2 + 0.05 * ar((steps, layers), 0.3),
            "en_std": np.abs(1.0 + 0.1 * ar((steps, layers), 0.3))}
    write_run(path, {f"fc{i + 1}": width for i in range(layers)},
              {k: v.astype(np.float32) for k, v in data.items()},
              count=np.full((steps, layers), 4), meta={"batch_size": 4}, overwrite=True)


CI_CODE = ("import numpy as np, statscope; "
           "from statscope.analyses.bootstrap import fluctuation_ci; "
           "ci = fluctuation_ci(statscope.open_run(PATH), 'all', scale_free={sf}, n_boot=200); "
           "np.savez({out!r}, **{{s: ci[s].values for s in ci.data_vars}})")


def overlay_tree(overlay: str) -> str:
    """Today's statscope laid out as an importable package, with the files under ``overlay``
    (paths as in the repository, e.g. ``analyses/resampling.py``) in place of today's."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = tempfile.mkdtemp(prefix="statscope-overlay-")
    pkg = os.path.join(root, "statscope")
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(os.path.join(repo, "statscope"), pkg, ignore=ignore)
    for sub in ("probes", "analyses", "dashboards"):
        shutil.copytree(os.path.join(repo, sub), os.path.join(pkg, sub), ignore=ignore)
    for here, _, files in os.walk(overlay):
        rel = os.path.relpath(here, overlay)
        top = rel.split(os.sep)[0]
        if top not in ("statscope", "probes", "analyses", "dashboards"):
            continue
        dest = os.path.join(root, rel) if top == "statscope" else os.path.join(pkg, rel)
        for f in files:
            if f.endswith(".py"):
                shutil.copy(os.path.join(here, f), os.path.join(dest, f))
    return root


def bench_ci(root: str, steps: int, baseline: str | None, repeats: int) -> dict:
    """The dashboard's fluctuation_ci call with window "all": today vs ``baseline`` (a tree on
    PYTHONPATH), A B B A, and the largest relative difference of their intervals."""
    path = os.path.join(root, f"ar-{steps}x512")
    if not os.path.exists(path):
        write_ar(path, steps)
    out = tempfile.mkdtemp(prefix="statscope-bench-ci-")
    results = {}
    for sf in (False, True):
        runs = {"now": [], "baseline": []}
        order = ("now", "baseline", "baseline", "now") if baseline else ("now",)
        for _ in range(repeats):
            for who in order:
                code = CI_CODE.format(sf=sf, out=os.path.join(out, f"{who}-{sf}.npz"))
                runs[who].append(measure(code, path, None if who == "now" else baseline))
        entry = {"now": runs["now"]}
        if baseline:
            entry["baseline"] = runs["baseline"]
            for key in ("seconds", "peak_rss_mib"):
                entry[f"{key}_ratio_now_over_baseline"] = round(statistics.median(
                    a[key] / b[key] for a, b in zip(runs["now"], runs["baseline"])), 3)
            a, b = (np.load(os.path.join(out, f"{w}-{sf}.npz")) for w in ("now", "baseline"))
            with np.errstate(invalid="ignore", divide="ignore"):
                entry["max_rel_diff_of_intervals"] = float(max(
                    np.nanmax(np.abs(a[k] - b[k]) / np.abs(b[k]), initial=0.0)
                    for k in a.files))
        results[f"fluctuation_ci('all', n_boot=200, scale_free={sf})"] = entry
    return {"steps": steps, "neurons": 512, "results": results}


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


def measure(code: str, path: str, pythonpath: str | None = None) -> dict:
    script = (f"import os, time; PATH = {path!r}; t = time.perf_counter(); {code}; "
              "print(time.perf_counter() - t, int([l.split()[1] for l in open('/proc/self/status')"
              " if l.startswith('VmHWM')][0]) / 1024)")
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                         text=True, cwd=tempfile.gettempdir(), env=env).stdout.split()
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
    ap.add_argument("--ci", action="store_true",
                    help="the dashboard's fluctuation_ci('all') on a 6,000-step run")
    ap.add_argument("--ci-steps", type=int, default=6_000)
    ap.add_argument("--baseline-overlay",
                    help="folder of old files (repository paths) laid over today's tree: the "
                         "baseline of --ci when --baseline is not given")
    args = ap.parse_args()
    report = {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    if args.ci:
        base = baseline_tree(args.baseline) if args.baseline else \
            overlay_tree(args.baseline_overlay) if args.baseline_overlay else None
        report["ci"] = bench_ci(args.dir, args.ci_steps, base, max(1, args.repeats // 2))
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
