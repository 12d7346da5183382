"""``statscope analyze``: the fluctuation table of each run; and the run handling that
``statscope report`` shares (finding and opening runs, skipping unreadable ones with a warning,
refusing to write into a run)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from statscope.commands.cluster import add_cluster_arguments, scheduler_of

__all__ = ["register", "run_analyze", "parse_window", "OpenedRun", "open_runs_at",
           "check_output", "write_text", "warn", "add_cluster_arguments", "scheduler_of",
           "skipping_unreadable"]


def register(subparsers) -> None:
    """Add the ``analyze`` and ``report`` subcommands to an argparse subparsers object."""
    from statscope.commands import report
    p = subparsers.add_parser("analyze", help="fluctuation per layer (the paper's Figure 6)",
                              description="Fluctuation of BN/EN statistics per layer, one block "
                                          "of rows per run (runs may be of different models).")
    p.add_argument("paths", nargs="+", metavar="RUN_OR_DIR",
                   help="a run store, or a folder of runs")
    p.add_argument("--window", default="200",
                   help="last W steps (int), START:STOP steps, a fraction in (0, 1], or 'all'")
    p.add_argument("--layers", nargs="+", help="only these layers")
    p.add_argument("--scale-free", action="store_true", help="divide by the neuron's σ")
    p.add_argument("--detrend", action="store_true", help="remove a linear trend per neuron")
    p.add_argument("--source", choices=("auto", "steps", "windows"), default="auto",
                   help="per-step series (the kept channels), window summaries (every channel; "
                        "whole stored windows, no --detrend), or auto (default): window "
                        "summaries where a run keeps per-step columns for only some channels "
                        "and the window is made of stored windows")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    add_cluster_arguments(p)
    p.set_defaults(func=run_analyze)
    report.register(subparsers)


def parse_window(text: str):
    """``"200"`` → 200, ``"100:500"`` → (100, 500), ``"0.1"`` → 0.1, ``"all"`` → "all".

    Raises:
        StatscopeError: not one of these forms, or a value no run can take (an int below 2,
            a fraction outside (0, 1], STOP ≤ START), before any run is opened.
    """
    from statscope.analyses.window import window_problem
    from statscope.errors import StatscopeError

    expected = "expected an int of at least 2, START:STOP, a fraction in (0, 1] or 'all'"
    t = str(text).strip()
    try:
        if t == "all":
            return "all"
        if ":" in t:
            a, b = t.split(":")
            window = int(a), int(b)
        elif "." in t:
            window = float(t)
        else:
            window = int(t)
    except ValueError:
        raise StatscopeError(f"--window={text!r}: {expected}") from None
    why = window_problem(window)
    if why is not None:
        raise StatscopeError(f"--window={text}: {why}")
    return window


def warn(message: str) -> None:
    """One ``statscope: warning: ...`` line on stderr."""
    print(f"statscope: warning: {message}", file=sys.stderr)


@dataclass(frozen=True)
class OpenedRun:
    """A run ready to analyse: its path, the name to show, its window (step, neuron; (rank,
    step, neuron) for a distributed run), and the whole run (lazy)."""

    path: str
    name: str
    window: object
    run: object = None


def _candidates(path: str) -> list[str]:
    """The runs at ``path`` (statscope.store.scan_runs); folders that look like runs but are not
    readable are named in a warning."""
    from statscope.errors import StoreError
    from statscope.storage import is_unusable
    from statscope.store import scan_runs

    try:
        scanned = scan_runs(path)
    except StoreError as exc:  # neither a run nor a folder: the caller says so
        if is_unusable(exc):  # an object store that cannot be reached: that is why
            raise
        return []
    found = []
    for run, reason in scanned:
        if reason is None:
            found.append(run)
        else:
            warn(f"skipping {run}: {reason}")
    return found


def _short_names(paths: list[str]) -> list[str]:
    names = [Path(p.rstrip("/")).name or p for p in paths]
    return names if len(set(names)) == len(names) else [p.rstrip("/") for p in paths]


def open_runs_at(paths, window, *, by_path: bool = False, prepare=None,
                 load: bool = True) -> list[OpenedRun]:
    """Find, open and window every run at ``paths``; warn about and skip any that fails.

    Args:
        paths: run stores or folders of runs.
        window: the analyses' window (see statscope.analyses.select_window).
        by_path: name runs by their path (else by folder name, paths where names repeat).
        prepare: optional Dataset -> Dataset applied before the window (e.g. a layer filter).
        load: read small windows into memory here; False keeps them lazy, for dask workers to
            read (``--scheduler``/``--workers``).

    Returns:
        The runs that opened and hold the window, in order.

    Raises:
        StatscopeError: a path that is neither a run nor a folder, or no run left to analyse
            (the message lists why each was skipped).
    """
    from statscope.analyses import load_window, select_window
    from statscope.commands import check_path_argument, missing_url
    from statscope.errors import StatscopeError
    from statscope.store import open_run

    found: list[str] = []
    for path in paths:
        check_path_argument(path, "RUN_OR_DIR")
        if not Path(path).exists() and "://" not in str(path):
            raise StatscopeError(f"RUN_OR_DIR={path!r}: no such run or folder")
        hits = _candidates(str(path))
        if not hits and not Path(path).is_dir():
            raise missing_url(str(path), "RUN_OR_DIR") or StatscopeError(
                f"RUN_OR_DIR={path!r}: not a statscope run or a folder of runs")
        found += [h for h in hits if h not in found]
    names = found if by_path else _short_names(found)
    out, reasons = [], []
    for path, name in zip(found, names):
        try:
            ds = open_run(path)
            if prepare is not None:
                ds = prepare(ds)
            pick = load_window if load else select_window
            out.append(OpenedRun(path, name, pick(ds, window), ds))
        except StatscopeError as err:
            reasons.append(f"{name}: {err}")
            warn(f"skipping {name}: {err}")
        except (OSError, KeyError, ValueError, TypeError) as err:  # zarr/xarray on damaged data
            reasons.append(f"{name}: {type(err).__name__}: {err}")
            warn(f"skipping {name}: unreadable ({type(err).__name__}: {err})")
    if not out:
        where = ", ".join(map(str, paths))
        raise StatscopeError(f"no run to analyse at {where}" +
                             (f": {'; '.join(reasons)}" if reasons else ": no statscope runs "
                                                                        "found"))
    return out


def skipping_unreadable(runs: list[OpenedRun], scheduler, work):
    """``(work(runs), runs)``; on a cluster, without the runs whose data cannot be read.

    In this process a run's window is read when it opens (:func:`open_runs_at`), where a damaged
    chunk skips the run with a warning. On a cluster the workers read it, inside ``work``'s
    graph, where one such chunk fails the whole command: then one read task per run finds the
    runs that cannot be read, they are skipped with the same warning, and ``work`` runs again
    on the others.

    Raises:
        StatscopeError: no run is left.
    """
    from statscope.errors import StatscopeError

    try:
        return work(runs), runs
    except (StatscopeError, OSError, KeyError, ValueError, TypeError):
        bad = _unreadable(runs, scheduler) if scheduler is not None else []
        if not bad:
            raise
    for r, why in bad:
        warn(f"skipping {r.name}: {why}")
    left = [r for r in runs if all(r is not b for b, _ in bad)]
    if not left:
        raise StatscopeError("no run to analyse: " + "; ".join(f"{r.name}: {why}"
                                                             for r, why in bad))
    return work(left), left


def _unreadable(runs: list[OpenedRun], scheduler) -> list[tuple[OpenedRun, str]]:
    """The runs whose window cannot be read on the cluster, with why (one task per run)."""
    import dask

    from statscope.errors import StatscopeError

    def read(held):
        try:  # on the worker, by this task itself (not dask's dependencies): errors stay here
            held[0].load(scheduler="synchronous")
        except StatscopeError as err:
            return str(err)
        except (OSError, KeyError, ValueError, TypeError) as err:  # zarr on damaged data
            return f"unreadable ({type(err).__name__}: {err})"
        return None

    # a list holding the window is no dask collection: dask hands it over unread
    reasons = dask.compute(*[dask.delayed(read, pure=False)(_Held(r.window)) for r in runs],
                           scheduler=scheduler)
    return [(r, why) for r, why in zip(runs, reasons) if why is not None]


class _Held(list):
    """A window wrapped so that dask does not compute it as a task's dependency."""

    def __init__(self, window):
        super().__init__([window])


def check_output(output: str, runs) -> Path:
    """Refuse an output path inside a run (it would overwrite the run's own files) or in a
    missing folder; return it resolved.

    Raises:
        StatscopeError: naming the path and why.
    """
    from statscope.errors import StatscopeError

    target = Path(output).expanduser().resolve()
    parent = run_around(target, [r.path for r in runs])
    if parent is not None:
        raise StatscopeError(f"-o {output}: inside the run {parent}; write it elsewhere "
                             f"(it would overwrite the run's own files)")
    if not target.parent.is_dir():
        raise StatscopeError(f"-o {output}: the folder {target.parent} does not exist")
    if target.is_dir():
        raise StatscopeError(f"-o {output}: is a folder; name a file")
    return target


def run_around(target: Path, runs) -> Path | None:
    """The run that the resolved local path ``target`` is or lies inside: one of ``runs`` (their
    paths) or any folder that is a run; None when there is none."""
    from statscope.store import is_run

    inside = [Path(r).resolve() for r in runs if "://" not in r]
    for parent in (target, *target.parents):
        if parent in inside or (parent.is_dir() and (parent / "zarr.json").exists()
                                and is_run(parent)):
            return parent
    return None


def write_text(text: str, output: str | None) -> None:
    """Write to ``output`` (already checked) or to stdout."""
    from statscope.errors import StatscopeError

    if not output:
        sys.stdout.write(text)
        return
    try:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as err:
        raise StatscopeError(f"-o {output}: cannot write ({err.strerror or err})") from None


def run_analyze(args: argparse.Namespace) -> int:
    """Handler of ``statscope analyze``: one fluctuation table per run, stacked; and the rank
    gap of each distributed run."""
    import pandas as pd

    from statscope.analyses.tables import (entry_configs, fluctuation_table, rank_gap_table,
                                           select_layers)

    window = parse_window(args.window)
    if args.output is not None and not args.output.strip():
        from statscope.errors import StatscopeError

        raise StatscopeError(f"-o {args.output!r}: expected a file name (without -o the table "
                             "goes to stdout)")
    if args.source == "windows" and args.detrend:
        from statscope.errors import StatscopeError

        raise StatscopeError("--source windows --detrend: window summaries keep each window's "
                             "mean and std, not the steps a trend is fitted to")
    with scheduler_of(args) as scheduler:
        runs = open_runs_at(args.paths, window, by_path=True, load=scheduler is None,
                            prepare=lambda ds: select_layers(ds, args.layers))
        if args.output:
            check_output(args.output, runs)

        def one_table(r, configs):
            summaries = _summaries(r, window, args)
            if summaries is not None:
                return fluctuation_table(r.run, window, scale_free=args.scale_free, name=r.name,
                                         windows=select_layers(summaries, args.layers),
                                         configs=configs)
            return fluctuation_table(r.window, "all", scale_free=args.scale_free,
                                     detrend=args.detrend, name=r.name, scheduler=scheduler,
                                     configs=configs)

        def work(runs):
            frames, notes, gaps = [], [], []
            # each run is tabled on its own, but labelled among all of them: runs that differ
            # in a setting, or are of different models, are not seeds of one configuration
            configs = entry_configs({r.name: r.window for r in runs})
            runs = _tabled(runs, lambda r: one_table(r, configs), frames, scheduler)
            notes += [n for n in map(_status_note, runs) if n is not None]
            for r, df in zip(runs, frames):
                notes += [n if n.startswith(f"{r.name}/") else f"{r.name}: {n}"
                          for n in df.attrs.get("notes", [])]
            ranked = {r.name: r.window for r in runs if "rank" in r.window.dims}
            if ranked:
                gap = rank_gap_table(ranked, "all", scale_free=args.scale_free,
                                     scheduler=scheduler)
                gaps.append(gap)
                notes += gap.attrs.get("notes", [])
            return frames, notes, gaps

        (frames, notes, gaps), runs = skipping_unreadable(runs, scheduler, work)
    table = pd.concat(frames, ignore_index=True)
    if args.format == "csv":
        text = table.to_csv(index=False)
        if gaps:
            text += "\n" + gaps[0].to_csv(index=False)
    elif args.format == "json":
        if gaps:
            text = (f'{{"fluctuation": {table.to_json(orient="records", indent=1)},\n'
                    f'"rank_gap": {gaps[0].to_json(orient="records", indent=1)}}}\n')
        else:
            text = table.to_json(orient="records", indent=1) + "\n"
    else:
        fmt = (lambda v: f"{v:.4g}")
        text = table.to_string(index=False, float_format=fmt, na_rep="—") + "\n"
        text += (f"window: {frames[0].attrs.get('window')}; median/q25/q75: over the "
                 f"layer's neurons of each neuron's std over the window; first: unit 0; excess: "
                 f"observed / sampling-theory fluctuation (1 = batch sampling explains it)\n")
        if gaps:
            text += ("\nranks: per-rank and global fluctuation (layer medians); removed: the "
                     "fraction of a rank's fluctuation that the global statistics (over every "
                     "rank's batch) do not have; expected: that fraction from batch sampling "
                     "alone\n")
            text += gaps[0].to_string(index=False, float_format=fmt, na_rep="—") + "\n"
        text += "".join(f"note: {n}\n" for n in notes)
    write_text(text, args.output)
    return 0


def _status_note(r: OpenedRun) -> str | None:
    """:func:`statscope.analyses.report.status_note` of a single-process run; a distributed
    run's ranks keep their own status."""
    from statscope import schema as S
    from statscope.analyses.report import status_note

    attrs = getattr(r.run if r.run is not None else r.window, "attrs", {})
    if S.ATTR_STATUS not in attrs:
        return None
    return status_note(r.name, str(attrs[S.ATTR_STATUS]), int(attrs.get(S.ATTR_N_STEPS) or 0))


def _tabled(runs: list[OpenedRun], table, frames: list, scheduler) -> list[OpenedRun]:
    """Append ``table(r)`` of each run to ``frames``; return the runs tabled. In this process a
    run whose table cannot be made (window summaries that are damaged, missing or do not fit
    the window, read only here) is skipped with a warning, as one that cannot be opened is
    (:func:`open_runs_at`); on a cluster :func:`skipping_unreadable` finds such runs.

    Raises:
        StatscopeError: no run is left.
    """
    from statscope.errors import StatscopeError

    done, reasons = [], []
    for r in runs:
        try:
            frames.append(table(r))
        except (StatscopeError, OSError, KeyError, ValueError) as err:
            if scheduler is not None:
                raise
            reasons.append(f"{r.name}: {err}")
            warn(f"skipping {r.name}: {err}")
            continue
        done.append(r)
    if not done:
        raise StatscopeError("no run to analyse: " + "; ".join(reasons))
    return done


def _summaries(r: OpenedRun, window, args):
    """The window summaries the run's Figure-6 table comes from, or None for its per-step series
    (``--source``: ``windows`` always, ``auto`` when the run keeps per-step columns for only
    some channels and the window is made of whole stored windows)."""
    from statscope import schema as S
    from statscope.analyses.summaries import summary_span
    from statscope.errors import StatscopeError, StoreError
    from statscope.store import open_windows

    if args.source == "steps" or S.RANK in r.window.dims:
        if args.source == "windows":
            raise StatscopeError(f"--source windows: {r.name} is a distributed run; window "
                                 f"summaries are per rank (open_windows of PATH/rank0, ...)")
        return None
    subset = any(p.get("units") is not None for p in r.window.attrs.get(S.ATTR_PROBES, []))
    if args.source == "auto" and (not subset or args.detrend):
        return None
    try:
        summaries = open_windows(r.path)
        summary_span(summaries, window)
    except (StatscopeError, StoreError) as err:
        if args.source == "windows":
            raise StatscopeError(f"--source windows: {r.name}: {err}") from None
        warn(f"{r.name}: per-step columns keep only some channels, and the window summaries "
             f"cannot be used ({err}); the table covers the kept channels")
        return None
    return summaries
