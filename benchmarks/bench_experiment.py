"""Speed of the built-in mnist-fc experiment, with and without the probes, measured in one run.

    python benchmarks/bench_experiment.py [--steps 3000] [--repeats 5] [--threads 1] [--e2e]
    python benchmarks/bench_experiment.py --sweep [--sweep-steps 2000] [--repeats 3]

For batch sizes 4 and 128 it runs the experiment's own training loop
(:func:`statscope.experiments.run_experiment`) for ``--steps`` steps on the shipped MNIST subset,
once recording (``record=True``: probes, per-step loss and lr, the store written) and once as the
same loop without probes (``record=False``), alternating repeat after repeat so drift of a shared
machine hits both sides alike. It prints the median steps/s of each and three probed/plain
ratios (goal <= 1.05): of the loop's wall time (the recorder's start and final flush included),
of the steady-state wall time between the first and last progress report (without those fixed
costs), and of the training thread's CPU time for the whole call (setup included on both sides);
then the recorder's own ``probe_overhead`` (probe time / other time of the training thread).
``--e2e`` also times ``statscope run mnist-fc --bs 4`` end to end as a subprocess (20 epochs).
``--sweep`` instead times one sweep of 4 runs (``--bs 4 8 --seeds 0 1``, ``--sweep-steps``
steps each) as a subprocess three ways, ABBA-ordered repeat after repeat: ``--jobs 2``
(spawn workers), ``--workers 2`` (a dask LocalCluster of 2 one-thread workers started by the
command, one run process per task) and ``--jobs 1`` (one process); median wall times, and the
median over repeats of each one's ratio to ``--jobs 2`` in the same repeat.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

from statscope.experiments import RunConfig, run_experiment


def measure(bs: int, steps: int, repeats: int, threads: int, tmp: str) -> dict:
    """Median seconds per step of the probed and plain loops, and the recorder's overhead.

    ``loop`` is the whole loop (the recorder's start and final flush included), ``steady`` the
    rate between the first and the last progress report, which leaves out those fixed costs.
    """
    times = {k: {False: [], True: []} for k in ("loop", "steady", "cpu")}
    overhead = []
    for r in range(repeats):
        for record in ((False, True) if r % 2 == 0 else (True, False)):
            config = RunConfig("mnist-fc", batch_size=bs, max_steps=steps, threads=threads,
                               dataset="mnist-5k-subset", out=os.path.join(tmp, f"bs{bs}"),
                               overwrite=True)
            reports = []

            def progress(p):
                reports.append((time.perf_counter(), p.step))

            c0 = time.thread_time()
            result = run_experiment(config, record=record, progress=progress,
                                    progress_seconds=0.05)
            times["cpu"][record].append((time.thread_time() - c0) / result.steps)
            times["loop"][record].append(result.wall_seconds / result.steps)
            (t0, s0), (t1, s1) = reports[0], reports[-2]  # the last one follows the evaluation
            times["steady"][record].append((t1 - t0) / (s1 - s0))
            if record:
                overhead.append(result.probe_overhead)
    out = {k: {side: statistics.median(v) for side, v in sides.items()}
           for k, sides in times.items()}
    out["overhead"] = statistics.median(overhead)
    return out


def end_to_end(tmp: str, threads: int) -> tuple[float, str]:
    """Wall seconds of ``statscope run mnist-fc --bs 4`` as a subprocess, and its summary line."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "statscope", "run", "mnist-fc", "--bs", "4",
                           "--threads", str(threads), "--quiet", "--out",
                           os.path.join(tmp, "e2e")], capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, proc.stdout.strip()


SWEEP_MODES = {"jobs 2": ["--jobs", "2"], "workers 2": ["--workers", "2"],
               "jobs 1": ["--jobs", "1"]}


def sweep(steps: int, repeats: int, tmp: str) -> dict[str, list[float]]:
    """Wall seconds of the same 4-run ``statscope sweep`` in each of :data:`SWEEP_MODES`, the
    modes' order reversed every other repeat so drift hits them alike."""
    times: dict[str, list[float]] = {mode: [] for mode in SWEEP_MODES}
    for r in range(repeats):
        for mode in (list(SWEEP_MODES) if r % 2 == 0 else list(SWEEP_MODES)[::-1]):
            out = os.path.join(tmp, f"sweep-{mode.replace(' ', '')}-{r}")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "statscope", "sweep", "mnist-fc", "--bs", "4",
                            "8", "--seeds", "0", "1", "--dataset", "mnist-5k-subset",
                            "--max-steps", str(steps), "--quiet", "--out", out,
                            *SWEEP_MODES[mode]], capture_output=True, text=True, check=True)
            times[mode].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="alternating repeats per side")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--e2e", action="store_true",
                        help="also time `statscope run mnist-fc --bs 4` end to end")
    parser.add_argument("--sweep", action="store_true",
                        help="only time a 4-run sweep: --jobs 2, --workers 2 (dask), --jobs 1")
    parser.add_argument("--sweep-steps", type=int, default=2000, help="steps per sweep run")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.sweep:
        print(f"statscope sweep mnist-fc --bs 4 8 --seeds 0 1 --max-steps {args.sweep_steps} "
              f"(4 runs, subprocess), {args.repeats} repeats, {os.cpu_count()} CPUs, load "
              f"average {os.getloadavg()[0]:.1f}")
        with tempfile.TemporaryDirectory() as tmp:
            times = sweep(args.sweep_steps, args.repeats, tmp)
        for mode, values in times.items():
            ratio = statistics.median(v / b for v, b in zip(values, times["jobs 2"]))
            print(f"  --{mode:<10} median {statistics.median(values):6.1f} s, median ratio to "
                  f"--jobs 2 {ratio:.3f} (all: {', '.join(f'{v:.1f}' for v in values)})")
        return
    print(f"mnist-fc on the shipped subset, {args.steps} steps x {args.repeats} repeats per side, "
          f"{args.threads} thread(s), {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'bs':>4} {'plain steps/s':>14} {'probed steps/s':>15} {'wall ratio':>11} "
          f"{'steady ratio':>13} {'thread-CPU ratio':>17} {'probe_overhead':>15}")
    with tempfile.TemporaryDirectory() as tmp:
        for bs in (4, 128):
            m = measure(bs, args.steps, args.repeats, args.threads, tmp)
            loop, steady, cpu = m["loop"], m["steady"], m["cpu"]
            print(f"{bs:>4} {1 / loop[False]:>14.0f} {1 / loop[True]:>15.0f} "
                  f"{loop[True] / loop[False]:>11.3f} {steady[True] / steady[False]:>13.3f} "
                  f"{cpu[True] / cpu[False]:>17.3f} {100 * m['overhead']:>14.1f}%", flush=True)
        if args.e2e:
            seconds, line = end_to_end(tmp, args.threads)
            print(f"statscope run mnist-fc --bs 4 (end to end, subprocess): {seconds:.1f} s\n"
                  f"  {line}")


if __name__ == "__main__":
    main()
