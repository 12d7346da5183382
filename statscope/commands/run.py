"""``statscope run`` and ``sweep``: train the built-in experiments into run stores.

Handlers import torch, xarray and the experiments only when they run, so ``statscope --help``
stays fast. Progress goes to stderr (silent with ``--quiet``); results go to stdout.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

from statscope.commands import show_warning, warning_line

__all__ = ["register", "run_run", "run_sweep"]


def _number(kind: type, minimum: float, what: str, maximum: float = math.inf):
    """An argparse type: a finite ``kind`` (int or float) in ``minimum..maximum``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a {what}") from None
        if not minimum <= value <= maximum or value == math.inf:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a {what}")
        return value

    return parse


_positive_int = _number(int, 1, "positive integer")
_non_negative_float = _number(float, 0, "non-negative number")


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number")
    return value


def _add_training_flags(p: argparse.ArgumentParser, *, sweep: bool) -> None:
    from statscope.experiments import EXPERIMENTS
    from statscope.experiments.base import DEVICES, MAX_SEED, MAX_THREADS

    seed = _number(int, 0, f"seed in 0..{MAX_SEED}", MAX_SEED)

    p.add_argument("experiment", choices=list(EXPERIMENTS), metavar="EXPERIMENT",
                   help="one of: " + "; ".join(f"{e.name} ({e.summary})"
                                               for e in EXPERIMENTS.values()))
    many = {"nargs": "+"} if sweep else {}
    p.add_argument("--bs", type=_positive_int, required=sweep, default=None if sweep else 128,
                   metavar="N", help="batch size" + ("s" if sweep else " (default 128)"), **many)
    if sweep:
        p.add_argument("--seeds", type=seed, nargs="+", default=[0], metavar="S",
                       help="seeds (default 0)")
    else:
        p.add_argument("--seed", type=seed, default=0, help="seed (default 0)")
    p.add_argument("--norm", default=["bn"] if sweep else "bn", metavar="NAME", **many,
                   help="norm after each hidden layer: bn, in, ln, gn, en, en_g8, sn, hn, hn_g32, "
                        "bn+en, bn+in+ln (default bn, torch's BatchNorm)")
    p.add_argument("--epochs", type=_positive_int, help="epochs (default: the experiment's)")
    p.add_argument("--lr", type=_positive_float,
                   help="learning rate (default 0.1 * bs / 128, the linear scaling rule)")
    p.add_argument("--momentum", type=_non_negative_float, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=_non_negative_float,
                   help="SGD weight decay (default 5e-4)")
    p.add_argument("--en-groups", type=_positive_int, default=1, metavar="G",
                   help="EN groups of the recorded en_mean/en_std (default 1: the whole layer)")
    p.add_argument("--max-steps", type=_positive_int, metavar="N",
                   help="stop after N steps in all (smoke tests)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto (default: CUDA when available), cpu or cuda")
    p.add_argument("--threads", type=_number(int, 0, f"number of threads in 0..{MAX_THREADS}",
                                                MAX_THREADS),
                   default=1, metavar="N",
                   help="torch CPU threads per run (default 1, fastest for small batches; "
                        "0: torch's default)")
    p.add_argument("--dataset", metavar="NAME",
                   help="mnist (default of mnist-fc), fashion-mnist, mnist-5k-subset, cifar10")
    p.add_argument("--data-dir", metavar="DIR", help="read the dataset from this folder only")
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="never download the dataset")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def register(subparsers) -> None:
    """Add ``run`` and ``sweep`` to the ``statscope`` parser."""
    p = subparsers.add_parser(
        "run", help="train a built-in experiment and record its normalization statistics",
        description="Train a built-in experiment (the paper's setups) and record the statistics "
                    "at the input of every norm layer at every step. See docs/experiments.md.")
    _add_training_flags(p, sweep=False)
    p.add_argument("--out", metavar="PATH",
                   help="the run store (default: runs/<name from the settings>, a new folder)")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true",
                          help="replace an existing store at --out")
    existing.add_argument("--resume", action="store_true",
                          help="continue the store at --out after its last recorded step, "
                               "from the checkpoint beside it (<out>.checkpoint.pt) when there "
                               "is one")
    p.set_defaults(func=run_run)

    p = subparsers.add_parser(
        "sweep", help="run a grid of batch sizes x seeds x norms into one folder (restartable)",
        description="Run every combination of --bs, --seeds and --norm into one folder. Completed "
                    "runs are skipped; failed or interrupted ones are resumed.")
    _add_training_flags(p, sweep=True)
    p.add_argument("--out", default="runs", metavar="DIR", help="the sweep folder (default runs)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--jobs", "-j", type=_positive_int, metavar="N",
                       help="runs in parallel processes (default 1)")
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="run each run as a task on the dask.distributed cluster whose "
                            "scheduler is at ADDRESS (e.g. tcp://10.0.0.5:8786); its workers "
                            "must see --out at the same path (needs statscope[dask])")
    where.add_argument("--workers", type=_positive_int, metavar="N",
                       help="start a local dask.distributed cluster of N one-thread worker "
                            "processes and run the sweep on it (needs statscope[dask])")
    p.set_defaults(func=run_sweep)


def _config(args, **override):
    from statscope.experiments import RunConfig

    values = dict(experiment=args.experiment, epochs=args.epochs, lr=args.lr,
                  momentum=args.momentum, weight_decay=args.weight_decay,
                  en_groups=args.en_groups, max_steps=args.max_steps, device=args.device,
                  threads=args.threads, dataset=args.dataset, data_dir=args.data_dir,
                  download=args.download)
    values.update(override)
    return RunConfig(**values)


def _free_default_out(config):
    """``runs/<name>``, or ``runs/<name>-2``... when taken: a default ``--out`` is a new folder."""
    import dataclasses

    if config.out is not None or config.overwrite or config.resume:
        return config
    base = config.resolved().out
    path, k = base, 1
    while os.path.exists(path):
        k += 1
        path = f"{base}-{k}"
    return dataclasses.replace(config, out=path)


def run_run(args) -> int:
    """``statscope run EXPERIMENT ...``: train, record, print one summary line."""
    from statscope.experiments.train import run_experiment
    from statscope.nn.factory import check_norm_name

    check_norm_name(args.norm)  # before loading data
    config = _free_default_out(_config(
        args, batch_size=args.bs, seed=args.seed, norm=args.norm, out=args.out,
        overwrite=args.overwrite, resume=args.resume))
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # shown once each, as lines, whatever the filters were
        warnings.showwarning = show_warning
        bar = None if args.quiet else _Bar()
        try:
            t0 = time.perf_counter()
            result = run_experiment(config, progress=bar)
        finally:
            if bar is not None:
                bar.close()
    total = time.perf_counter() - t0
    print(_summary(config.experiment, result, total), flush=True)
    if not args.quiet:
        _print_next(result.path)
    return 0


def _where(path: str) -> str:
    """A local store as an absolute path (a URL as it is)."""
    from statscope.storage import is_url

    return path if is_url(path) else os.path.abspath(path.removeprefix("file://"))


def _print_next(path: str) -> None:
    """What to do with a finished run: look at it, check the paper's claims on it."""
    import shlex

    where = shlex.quote(_where(path))
    print(f"next: statscope dashboard {where}\n"
          f"      statscope report {where} -o report.md", file=sys.stderr)


def _epochs(result) -> str:
    """How far training went, in epochs: "3 epochs", or "1.001 epochs" where it stopped inside
    one (``--max-steps``), whose accuracy is measured there too."""
    per = result.steps_per_epoch
    if not per:
        n = len(result.test_accuracy)
        return f"{n} epoch{'s' if n != 1 else ''}"
    epochs = result.steps / per
    if result.steps % per == 0:
        n = result.steps // per
        return f"{n} epoch{'s' if n != 1 else ''}"
    return f"{epochs:.4g} epochs"


def _summary(experiment: str, result, total: float) -> str:
    acc = (f"test accuracy {result.test_accuracy[-1]:.4f} after {_epochs(result)}"
           if result.test_accuracy else "no test accuracy")
    trained = result.steps - (result.checkpoint_step or 0)
    rate = trained / result.wall_seconds if result.wall_seconds > 0 else float("nan")
    overhead = ("n/a" if result.probe_overhead is None
                else f"{100 * result.probe_overhead:.1f}% of the training thread")
    steps = f"{result.steps} steps" if result.resumed_at is None else \
        f"{result.steps} steps{_resumed(result)}, {trained} of them"
    return (f"{experiment}: {acc} ({result.dataset}); {steps} in {result.wall_seconds:.1f} s "
            f"({rate:.0f} steps/s; {total:.1f} s in all); probe overhead {overhead}; "
            f"store {_where(result.path)}")


def _resumed(result) -> str:
    if result.resumed_at is None:
        return ""
    s = "" if result.replayed_steps == 1 else "s"
    if result.checkpoint_step is None:
        return (f" (resumed at step {result.resumed_at} without a checkpoint: "
                f"{result.replayed_steps} step{s} replayed from step 0)")
    return (f" (resumed at step {result.resumed_at} from the checkpoint at step "
            f"{result.checkpoint_step}: {result.replayed_steps} step{s} replayed)")


class _Bar:
    """A tqdm bar on stderr fed by :class:`statscope.experiments.train.Progress`."""

    def __init__(self):
        self.bar = None

    def __call__(self, p) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=p.total_steps, unit="step", file=sys.stderr, dynamic_ncols=True,
                            smoothing=0.1)
        self.bar.set_description(f"{'epoch' if p.recording else 'replay'} {p.epoch}/{p.epochs}",
                                 refresh=False)
        post = {"loss": f"{p.loss:.4f}"}
        if p.test_accuracy is not None:
            post["test_acc"] = f"{p.test_accuracy:.4f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(p.step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_sweep(args) -> int:
    """``statscope sweep EXPERIMENT --bs ... --seeds ...``: the grid into one folder.

    Exit 0 when no run failed (runs held by another process are that process's to finish), 1
    when a run failed at run time (the same sweep retries it), else 2 when a run was refused on
    its settings or on what is in its way (the same sweep would fail it again).
    """
    from statscope.experiments.sweep import plan_sweep, run_sweep as sweep
    from statscope.nn.factory import check_norm_name

    for norm in args.norm:
        check_norm_name(norm)  # before any run starts
    base = _config(args)
    items = plan_sweep(base, args.out, batch_sizes=args.bs, seeds=args.seeds, norms=args.norm)
    todo = sum(item.action != "skip" for item in items)
    jobs = args.jobs or 1
    on_cluster = todo and (args.scheduler is not None or args.workers is not None)
    seen_warnings: set[str] = set()

    def warn(messages) -> None:
        for w in messages:
            if w not in seen_warnings:
                seen_warnings.add(w)
                print(warning_line(w), file=sys.stderr)

    if todo and not on_cluster:  # a cluster's workers have their own data and devices
        from statscope.experiments.preflight import check_grid

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_grid(base, args.bs, args.norm, quiet=args.quiet)
        warn(dict.fromkeys(str(w.message) for w in caught))

    def header(how: str) -> None:
        if not args.quiet:
            print(f"sweep: {len(items)} runs in {args.out}, {len(items) - todo} completed "
                  f"already, {todo} to run" + (f" {how}" if how else ""), file=sys.stderr)

    t0 = time.perf_counter()

    def report(outcome) -> None:
        item = outcome.item
        warn(outcome.warnings)
        if item.action == "skip":
            line = f"skip  {item.name} (completed)"
        elif outcome.held:
            line = f"held  {item.name}: another process is writing it ({outcome.error})"
        elif outcome.error is not None:
            line = f"FAIL  {item.name}" + (f" (attempt {outcome.attempts})"
                                           if outcome.attempts > 1 else "") + f": {outcome.error}"
        else:
            line = f"done  {item.name}" + (" (resumed)" if item.action == "resume" else "")
            if outcome.attempts > 1:
                line += f" (attempt {outcome.attempts})"
            elapsed = time.perf_counter() - t0
            line += f": {_summary(item.config.experiment, outcome.result, elapsed)}"
        print(line, flush=True)

    if on_cluster:
        from statscope.commands.cluster import scheduler_of
        from statscope.experiments.cluster import describe

        with scheduler_of(args) as client:
            header(f"on the dask cluster at {describe(client)}")
            outcomes = sweep(items, on_done=report, client=client)
    else:
        header(f"with {jobs} job{'s' if jobs != 1 else ''}" if todo else "")
        outcomes = sweep(items, jobs=jobs, on_done=report)
    return _sweep_end(args, outcomes)


def _sweep_end(args, outcomes) -> int:
    """The sweep's last lines on stderr, and its exit code."""
    n = len(outcomes)
    held = sum(o.held for o in outcomes)
    refused = sum(o.error is not None and o.bad_input and not o.held for o in outcomes)
    failed = sum(o.error is not None for o in outcomes) - held - refused
    if held:
        print(f"statscope: {held} of {n} runs are held by another process, which is writing "
              "them or wrote them meanwhile; run the same sweep again once it is done to see "
              "them completed", file=sys.stderr)
    if refused:
        print(f"statscope: {refused} of {n} runs cannot run as set (bad input: see their FAIL "
              "lines); the same sweep would fail them again", file=sys.stderr)
    if failed:
        print(f"statscope: {failed} of {n} runs failed; run the same sweep again to retry them",
              file=sys.stderr)
        return 1
    if refused:
        return 2
    if not args.quiet:
        _print_next(args.out)
    return 0
