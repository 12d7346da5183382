"""``statscope analyze`` and ``statscope report``: fluctuation tables and a markdown report."""

from __future__ import annotations

import argparse
import sys

__all__ = ["register", "run_analyze", "run_report"]


def register(subparsers) -> None:
    """Add the ``analyze`` and ``report`` subcommands to an argparse subparsers object."""
    p = subparsers.add_parser("analyze", help="fluctuation per layer (the paper's Figure 6)",
                              description="Fluctuation of BN/EN statistics per layer and run.")
    p.add_argument("paths", nargs="+", metavar="RUN_OR_DIR",
                   help="a run store, or a folder of runs (stacked)")
    p.add_argument("--window", default="200",
                   help="last W steps (int), START:STOP steps, a fraction in (0, 1], or 'all'")
    p.add_argument("--layers", nargs="+", help="only these layers")
    p.add_argument("--scale-free", action="store_true", help="divide by the neuron's σ")
    p.add_argument("--detrend", action="store_true", help="remove a linear trend per neuron")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    p.set_defaults(func=run_analyze)
    r = subparsers.add_parser("report", help="markdown report: claims, Figure 6, scaling",
                              description="A self-contained markdown report over a folder of runs.")
    r.add_argument("runs_dir", metavar="RUNS_DIR")
    r.add_argument("--window", default="200")
    r.add_argument("--n-boot", type=int, default=1000)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("-o", "--output", default="report.md")
    r.set_defaults(func=run_report)


def parse_window(text: str):
    """``"200"`` → 200, ``"100:500"`` → (100, 500), ``"0.1"`` → 0.1, ``"all"`` → "all"."""
    from statscope.errors import StatscopeError

    t = str(text).strip()
    try:
        if t == "all":
            return "all"
        if ":" in t:
            a, b = t.split(":")
            return int(a), int(b)
        if "." in t:
            return float(t)
        return int(t)
    except ValueError:
        raise StatscopeError(f"--window={text!r}: expected an int, START:STOP, a fraction in "
                             f"(0, 1] or 'all'") from None


def _open(path: str):
    from pathlib import Path

    from statscope.errors import StatscopeError
    from statscope.store import is_run, open_run, open_runs

    if is_run(path):
        return open_run(path), Path(path).name
    if Path(path).is_dir():
        return open_runs(path), Path(path).name
    raise StatscopeError(f"RUN_OR_DIR={path!r}: not a statscope run or a folder of runs")


def _write(text: str, output: str | None) -> None:
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)


def run_analyze(args: argparse.Namespace) -> int:
    """Handler of ``statscope analyze``."""
    import pandas as pd

    import statscope.analyses  # noqa: F401  (registers the accessor)
    from statscope.analyses.report import fluctuation_table, select_layers

    window = parse_window(args.window)
    frames, notes = [], []
    for path in args.paths:
        ds, name = _open(path)
        ds = select_layers(ds, args.layers)
        df = fluctuation_table(ds, window, scale_free=args.scale_free, detrend=args.detrend,
                               name=name)
        frames.append(df)
        notes += [f"{name}: {n}" for n in df.attrs.get("notes", [])]
    table = pd.concat(frames, ignore_index=True)
    if args.format == "csv":
        text = table.to_csv(index=False)
    elif args.format == "json":
        text = table.to_json(orient="records", indent=1) + "\n"
    else:
        text = table.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="—") + "\n"
        if notes:
            text += "".join(f"note: {n}\n" for n in notes)
    _write(text, args.output)
    return 0


def run_report(args: argparse.Namespace) -> int:
    """Handler of ``statscope report``."""
    from statscope.analyses.report import markdown_report

    ds, _ = _open(args.runs_dir)
    text = markdown_report(ds, parse_window(args.window), source=args.runs_dir,
                           n_boot=args.n_boot, seed=args.seed)
    _write(text, args.output)
    return 0
