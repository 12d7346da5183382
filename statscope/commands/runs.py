"""``statscope runs`` and ``info``: the run stores in a folder, and one run's settings and layers.

A run marked ``running`` whose writer is gone (killed, its machine rebooted) shows as ``stopped``,
told from its lease as the dashboard tells it (:func:`statscope.lease.writer_state`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from statscope import schema as S
from statscope.errors import StatscopeError, StoreError

__all__ = ["register", "run_runs", "run_info", "writer_gone", "STOPPED"]


def register(subparsers) -> None:
    """Add ``runs`` and ``info`` to the ``statscope`` parser."""
    p = subparsers.add_parser("runs", help="list the runs in a folder",
                              description="List the run stores in a folder with their status.")
    p.add_argument("dir", metavar="DIR", help="a folder of runs (or one run)")
    p.set_defaults(func=run_runs)

    p = subparsers.add_parser("info", help="show one run's settings and layers",
                              description="Show one run's attributes, layers and test accuracy.")
    p.add_argument("run", metavar="RUN", help="a run store")
    p.set_defaults(func=run_info)


def _scan(folder: str) -> list[tuple[str, dict | None, str | None]]:
    """(path, attrs or None, error or None) for the run at ``folder`` or each store in it: the
    runs :func:`statscope.store.find_runs` finds, and the folders holding a ``zarr.json`` it left
    out because they are not readable runs (listed as damaged, with the reason)."""
    from statscope.commands import check_path_argument, explaining_missing_url
    from statscope.storage import is_url, local_path
    from statscope.store import read_attrs, scan_runs

    check_path_argument(folder, "dir")
    if not is_url(folder):
        root = local_path(folder)
        if not root.exists():
            raise StatscopeError(f"dir={folder!r}: no such file or directory")
        if not root.is_dir():
            raise StatscopeError(f"dir={folder!r}: not a folder of runs")
    with explaining_missing_url(folder, "dir"):
        scanned = scan_runs(folder)
    out = []
    for path, error in scanned:
        try:
            out.append((path, read_attrs(path), None) if error is None else (path, None, error))
        except StoreError as exc:
            out.append((path, None, str(exc)))
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


STOPPED = "stopped"
"""The status ``runs`` and ``info`` show for a run marked ``running`` whose writer is gone."""


def writer_gone(path: str, attrs: dict) -> str | None:
    """Why the run at ``path``, marked ``running``, has no writer any more; None when it is not
    marked running, when its writer lives, or when that cannot be told from this machine.

    A local run's writer holds the lease beside it while it lives (the kernel drops the lock
    when its process ends, ``kill -9`` included), and the lease file names it; so does an object
    store's lease, with a heartbeat. This reads the record without taking the lease (taking it,
    even for an instant, could refuse a writer starting then): the writer is gone when the
    process it names no longer runs on this host (or its training process has ended), or when an
    object store's lease is stale (:func:`statscope.lease.writer_state`, as the dashboard tells
    it). A writer on another host of a shared folder, or a run without its lease file (a copy),
    cannot be told from here: shown as marked.

    Args:
        path: the run.
        attrs: its root attributes (:func:`statscope.store.read_attrs`).

    Returns:
        e.g. ``"its writer, pid 4242 on host, since 2026-05-01T10:00:00+00:00, has ended"``.

    Example:
        >>> writer_gone("runs/r", {"status": "completed"}) is None  # not marked running
        True
    """
    ranks = attrs.get("ranks")
    if ranks:  # a distributed run: gone when every rank still marked running has no writer
        running = [r for r, a in ranks.items() if a.get(S.ATTR_STATUS) == S.STATUS_RUNNING]
        why = [_writer_gone(f"{path.rstrip('/')}/rank{r}") for r in running]
        if not running or any(w is None for w in why):
            return None
        return "; ".join(f"rank {r}: {w}" for r, w in zip(running, why))
    if attrs.get(S.ATTR_STATUS) != S.STATUS_RUNNING:
        return None
    return _writer_gone(path)


def _writer_gone(path: str) -> str | None:
    from statscope.lease import read_holder, writer_state
    from statscope.storage import is_url

    if writer_state(path) != "dead":  # live, or not to be told from here (as the dashboard)
        return None
    held = read_holder(path)
    if held is None:
        return None
    if is_url(path):
        return f"its writer's lease, {held.describe()}, is stale"
    return f"its writer, {held.describe()}, has ended"


def run_runs(args) -> int:
    """``statscope runs DIR``: one line per run with its status and settings; a run marked
    ``running`` whose writer is gone shows as ``stopped`` (the reason on stderr)."""
    found = _scan(args.dir)
    if not found:
        print(f"statscope: no runs in {args.dir}", file=sys.stderr)
        return 0
    rows, notes = [], []
    for path, attrs, error in found:
        if attrs is None:
            rows.append([Path(path).name, "corrupt", "", "", "", "", "", "", "", path])
            continue
        meta = attrs.get(S.ATTR_META) or {}
        last = attrs.get(S.ATTR_LAST_STEP)
        status = str(attrs.get(S.ATTR_STATUS))
        gone = writer_gone(path, attrs)
        if gone is not None:
            status = STOPPED
            notes.append(f"statscope: note: {Path(path).name} is marked running, but {gone}: "
                         "it stopped without closing its store; the same sweep, or run with "
                         "--resume, continues it")
        rows.append([Path(path).name, status,
                     str(attrs.get(S.ATTR_N_STEPS, 0)), "" if last is None else str(last),
                     *(str(meta.get(k, "")) for k in ("experiment", S.META_BATCH_SIZE,
                                                      S.META_SEED, S.META_DATASET, S.META_NORM)),
                     path])
    print(_table(["NAME", "STATUS", "STEPS", "LAST", "EXPERIMENT", "BS", "SEED", "DATASET",
                  "NORM", "PATH"], rows))
    for path, _, error in found:
        if error is not None:
            print(f"statscope: warning: {error}", file=sys.stderr)
    for note in notes:
        print(note, file=sys.stderr)
    return 0


def run_info(args) -> int:
    """``statscope info RUN``: attributes, layers and test accuracy of one run."""
    from statscope.commands import check_path_argument, explaining_missing_url
    from statscope.store import Layout, read_attrs

    check_path_argument(args.run, "RUN")
    with explaining_missing_url(args.run, "RUN"):
        attrs = read_attrs(args.run)
    meta = attrs.get(S.ATTR_META) or {}
    lines = [f"run       {args.run}"]
    gone = writer_gone(args.run, attrs)
    shown = attrs if gone is None else \
        {**attrs, S.ATTR_STATUS: f"{STOPPED} (marked running, but {gone})"}
    for key in (S.ATTR_STATUS, S.ATTR_N_STEPS, S.ATTR_LAST_STEP, S.ATTR_STARTED, S.ATTR_ENDED,
                S.ATTR_ERROR, S.ATTR_MODEL, S.ATTR_COMMAND, S.ATTR_STATS, S.ATTR_SCALARS,
                S.ATTR_PROBE_OVERHEAD, S.ATTR_PROBE_SECONDS, S.ATTR_NONFINITE,
                S.ATTR_STD_DEFINITION, S.ATTR_FORMAT):
        if shown.get(key) not in (None, {}, []):
            lines.append(f"{key:<9} {shown[key]}")
    if meta:
        lines.append("settings")
        lines += [f"  {k:<13} {v}" for k, v in meta.items()]
    versions = attrs.get(S.ATTR_VERSIONS) or {}
    if versions:
        lines.append("versions  " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print("\n".join(lines))
    _print_ranks(attrs)
    try:
        layout = Layout.from_attrs(attrs)
    except (KeyError, TypeError) as exc:
        raise StoreError(f"run={args.run!r}: its layer list is damaged ({exc!r})") from None
    print(_table(["LAYER", "TYPE", "WHERE", "CHANNELS", "GROUPS"],
                 [[p.name, p.type, p.where, str(p.channels), str(p.groups)]
                  for p in layout.probes]))
    accuracy = _test_accuracy(args.run, attrs)
    if accuracy:
        print("test accuracy by epoch: " + ", ".join(f"{a:.4f}" for a in accuracy))
    return 0


def _print_ranks(attrs: dict) -> None:
    """A distributed run's ranks (``read_attrs`` puts each rank's attributes under ``ranks``):
    the lines above are rank 0's, with the worst status and the largest step count."""
    ranks = attrs.get("ranks")
    if not ranks:
        return
    world = attrs.get(S.ATTR_WORLD_SIZE)
    print(f"ranks     {len(ranks)}" + (f" of world size {world}" if world else "")
          + " (the lines above: rank 0's, with the worst status and the most steps)")
    for key, what in ((S.ATTR_MISSING_RANKS, "missing"), (S.ATTR_STALE_RANKS, "left out")):
        if attrs.get(key):
            print(f"  {what}: ranks {attrs[key]}")
    print(_table(["RANK", "STATUS", "STEPS", "LAST", "STARTED"],
                 [[r, str(a.get(S.ATTR_STATUS)), str(a.get(S.ATTR_N_STEPS)),
                   str(a.get(S.ATTR_LAST_STEP, "—")), str(a.get(S.ATTR_STARTED, "—"))]
                  for r, a in ranks.items()]))


def _test_accuracy(path: str, attrs: dict) -> list[float]:
    if "test_acc" not in (attrs.get(S.ATTR_SCALARS) or []) or not attrs.get(S.ATTR_N_STEPS):
        return []
    import numpy as np

    from statscope.store import open_run

    values = open_run(path)["test_acc"].values
    return [float(v) for v in values[np.isfinite(values)]]
