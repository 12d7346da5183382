"""``statscope export RUN --to tensorboard DIR``: a run's fluctuation and scalars for TensorBoard."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["register", "run_export", "MAX_STEP_OFFSET"]

MAX_STEP_OFFSET = 2**62  # statscope.export.exporter's, here so the CLI imports no numpy
"""The largest ``--step-offset``: TensorBoard steps are signed 64-bit, and a run's own steps are
added to it."""


def register(subparsers) -> None:
    """Add the ``export`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "export", help="write a run's fluctuation and scalars as TensorBoard event files",
        description="Per window of W steps: the per-layer fluctuation of bn_mean, bn_std, "
                    "en_mean and en_std (raw and scale-free) as scalars, the per-neuron "
                    "fluctuation as histograms, and the logged scalars (loss, lr, ...). A folder "
                    "of runs (e.g. the rank0, rank1 stores of a distributed run) exports each "
                    "run into DIR/<run name>.")
    p.add_argument("run", metavar="RUN", help="a run store, or a folder of runs")
    p.add_argument("--to", nargs=2, required=True, metavar=("FORMAT", "DIR"),
                   help="the format (tensorboard) and the folder to write into")
    p.add_argument("--window", type=int, default=200,
                   help="steps per window (default 200, the paper's window)")
    p.add_argument("--step-offset", type=int, default=None,
                   help="added to every step written (0 or more), to line up with the "
                        "trainer's own curves (default: what the Lightning or Hugging Face "
                        "callback stored, else 0)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``statscope export``: one line per run exported, a hint to open TensorBoard."""
    from pathlib import Path

    from statscope.commands import check_path_argument, missing_url
    from statscope.commands.analyze import warn
    from statscope.errors import StatscopeError, StoreError
    from statscope.export import export_run
    from statscope.store import find_runs, is_run, rank_paths

    check_path_argument(args.run, "RUN")
    if args.step_offset is not None and not 0 <= args.step_offset <= MAX_STEP_OFFSET:
        raise StatscopeError(f"--step-offset {args.step_offset}: expected an integer in "
                             "0..2**62 (store step k is written at step k + offset)")
    kind, target = args.to
    if is_run(args.run):
        jobs = [(args.run, target)]
    elif Path(args.run).is_dir():
        jobs = [(run, os.path.join(target, Path(run).name)) for run in find_runs(args.run)]
        if not jobs:
            raise StatscopeError(f"RUN={args.run!r}: a folder without statscope runs")
    else:
        raise missing_url(args.run, "RUN") or StatscopeError(
            f"RUN={args.run!r}: not a statscope run or a folder of runs")
    # a distributed run: each rank's store into its own folder (TensorBoard shows them as runs)
    jobs = [job for run, folder in jobs for job in _per_rank(run, folder, rank_paths(run))]
    _check_target(kind, target, [run for run, _ in jobs])
    skipped = []
    for run, folder in jobs:
        try:
            result = export_run(run, kind, folder, window=args.window, offset=args.step_offset)
        except (StoreError, OSError, KeyError, ValueError, TypeError) as err:
            if len(jobs) == 1 or (isinstance(err, StatscopeError)
                                  and not isinstance(err, StoreError)):
                raise  # one run asked for, or a bad argument (the same for every run)
            skipped.append(f"{run}: {err}")
            warn(f"skipping {run}: {err}")
            continue
        line = (f"{run}: {result.windows} windows of {args.window} steps, {result.scalars} "
                f"scalar points, {result.histograms} histograms -> {os.path.abspath(folder)}")
        if result.windows == 0:
            line += f" (no complete window up to step {result.last_step}; try a smaller --window)"
        print(line)
    if len(skipped) == len(jobs):
        raise StatscopeError(f"RUN={args.run!r}: no run could be exported: " + "; ".join(skipped))
    if kind == "tensorboard":
        print(f"open with: tensorboard --logdir {os.path.abspath(target)}", file=sys.stderr)
    return 0


def _check_target(kind: str, target: str, runs: list[str]) -> None:
    """Refuse a target folder inside a run (its event files would sit among the run's arrays)
    or one that is a file.

    Raises:
        StatscopeError: naming the target and why.
    """
    from pathlib import Path

    from statscope.commands.analyze import run_around
    from statscope.errors import StatscopeError

    if "://" in target:
        return
    path = Path(target).expanduser().resolve()
    parent = run_around(path, runs)
    if parent is not None:
        raise StatscopeError(f"--to {kind} {target}: inside the run {parent}; write it "
                             "elsewhere (its files would sit among the run's arrays)")
    if path.exists() and not path.is_dir():
        raise StatscopeError(f"--to {kind} {target}: is a file; name a folder")


def _per_rank(run: str, folder: str, ranks: list[str]) -> list[tuple[str, str]]:
    """``(run, folder)``, or for a distributed run one ``(rank store, folder/rank{r})`` per rank."""
    if not ranks:
        return [(run, folder)]
    return [(path, os.path.join(folder, os.path.basename(path))) for path in ranks]
