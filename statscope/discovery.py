"""Finding runs: is a path a statscope run (of a format this version reads), which runs does a
folder hold, and which folders look like runs but cannot be read, and why.

A run is one zarr v3 group whose root attributes carry ``statscope_format``; a distributed run
is a folder of such groups named ``rank0``, ``rank1``, .... Only the root metadata is read here
(:mod:`statscope.store` opens the data).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone

from statscope import schema as S
from statscope.errors import StoreDamagedError, StoreError
from statscope.storage import (client_error, filesystem, is_unusable, is_url, local_path,
                               unusable, zarr_store)

__all__ = ["read_attrs", "rank_paths", "rank_stores", "RankStores", "is_run", "find_runs",
           "scan_runs", "open_checked", "is_single_run", "enclosing_run"]


def read_attrs(path: str | os.PathLike) -> dict:
    """Return a run's root attributes, checking that it is a statscope run of a known format.

    For a distributed run (a folder of ``rank{r}`` runs): rank 0's attributes, with ``status``
    the worst of the ranks' (failed, running, completed), ``n_steps`` the largest, and every
    rank's own under ``ranks``; of the stores that belong to the latest run only
    (:func:`rank_stores`), with ``stale_ranks`` and ``missing_ranks`` where some were left out
    or are missing.

    Raises:
        StoreError: the path does not exist, is not a statscope run, or has an unknown format.
        StoreDamagedError: its root metadata cannot be read.
    """
    try:
        return open_checked(path)[1]
    except StoreError as exc:
        if is_unusable(exc) or not rank_paths(path):
            raise
    stores = rank_stores(path)
    per = stores.attrs
    out = {**per[0], "ranks": {str(a.get(S.ATTR_RANK, r)): a for r, a in zip(stores.ranks, per)},
           S.ATTR_STATUS: _worst([a.get(S.ATTR_STATUS) for a in per]),
           S.ATTR_N_STEPS: max(int(a.get(S.ATTR_N_STEPS) or 0) for a in per)}
    if stores.stale:
        out[S.ATTR_STALE_RANKS] = list(stores.stale)
    if stores.missing:
        out[S.ATTR_MISSING_RANKS] = list(stores.missing)
    return out


@dataclass(frozen=True)
class RankStores:
    """The per-rank stores of a distributed run's folder that belong to its latest run.

    Attributes:
        ranks: the rank numbers kept (from the folder names), ascending.
        paths: their stores.
        attrs: their root attributes.
        world_size: the run's world size (None when no store records one: old stores).
        stale: rank numbers left out: stores whose ``world_size`` differs (an earlier run with
            more or other ranks, left behind by an overwrite), or whose rank lies outside
            ``0..world_size-1``.
        missing: ranks of ``0..world_size-1`` without a store.
    """

    ranks: tuple[int, ...]
    paths: tuple[str, ...]
    attrs: tuple[dict, ...]
    world_size: int | None
    stale: tuple[int, ...] = ()
    missing: tuple[int, ...] = ()

    def problems(self, path: str) -> list[str]:
        """Sentences on what was left out or is missing, for a warning."""
        out = []
        if self.stale:
            out.append(f"path={path!r}: rank stores {[f'rank{r}' for r in self.stale]} belong "
                       f"to an earlier run (world_size other than {self.world_size}, that of "
                       f"the store started last): left out")
        if self.missing:
            out.append(f"path={path!r}: ranks {list(self.missing)} of world_size "
                       f"{self.world_size} have no store; the global statistics cover only "
                       f"ranks {list(self.ranks)}")
        return out


def rank_stores(path: str | os.PathLike) -> RankStores:
    """The rank stores of the distributed run at ``path`` that belong together.

    The run's world size is the ``world_size`` of the store started last (``started``;
    on a tie, or where none records it, the lowest rank's): an overwrite with fewer ranks
    leaves the earlier run's higher ranks behind, and those are older. Stores recording another
    world size, or a rank outside ``0..world_size-1``, are left out; stores recording none (old
    ones) are kept.

    Raises:
        StoreError: ``path`` holds no rank stores.
    """
    paths = rank_paths(path)
    if not paths:
        raise StoreError(f"path={os.fspath(path)!r}: no rank stores (rank0, rank1, ...)")
    ranks = [int(p.rsplit("/rank", 1)[1]) for p in paths]
    attrs = [open_checked(p)[1] for p in paths]
    sizes = [_world_size(a) for a in attrs]
    known = [i for i, w in enumerate(sizes) if w is not None]
    if not known:
        return RankStores(tuple(ranks), tuple(paths), tuple(attrs), None)
    latest = max(known, key=lambda i: (_started(attrs[i]), -ranks[i]))
    world = sizes[latest]
    keep = [i for i, w in enumerate(sizes) if w is None or (w == world and ranks[i] < world)]
    stale = tuple(ranks[i] for i in range(len(paths)) if i not in keep)
    missing = tuple(sorted(set(range(world)) - {ranks[i] for i in keep}))
    return RankStores(tuple(ranks[i] for i in keep), tuple(paths[i] for i in keep),
                      tuple(attrs[i] for i in keep), world, stale, missing)


def _world_size(attrs: dict) -> int | None:
    w = attrs.get(S.ATTR_WORLD_SIZE)
    return w if isinstance(w, int) and not isinstance(w, bool) and w >= 1 else None


def _started(attrs: dict) -> float:
    """When the store's run started (POSIX seconds); -inf when not recorded or unreadable."""
    try:
        when = datetime.fromisoformat(str(attrs[S.ATTR_STARTED]))
    except (KeyError, ValueError):
        return -math.inf
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def open_checked(path: str | os.PathLike):
    """One run's root group (read only) and its attributes, checked as :func:`read_attrs` says.

    Returns: (``zarr.Group``, dict).
    """
    import zarr
    from zarr.errors import ContainsArrayError

    path = os.fspath(path)
    if not is_url(path):
        p = local_path(path)
        if not p.exists():
            raise StoreError(f"path={path!r}: no such file or directory")
        if not (p / "zarr.json").exists():
            raise StoreError(f"path={path!r}: not a statscope run (no zarr.json)"
                             + _being_created(path))
    try:
        group = zarr.open_group(zarr_store(path), mode="r", zarr_format=3)
        attrs = dict(group.attrs)
    except PermissionError as exc:
        raise StoreError(f"path={path!r}: permission denied ({exc.filename or path})") from None
    except StoreError:
        raise
    except ContainsArrayError:  # an array's folder, e.g. one inside a run
        raise StoreError(f"path={path!r}: a zarr array (one of a run's arrays?), not a "
                         f"statscope run") from None
    except Exception as exc:  # zarr raises several types for a non-store or damaged JSON
        if is_url(path) and client_error(exc) and not isinstance(exc, FileNotFoundError):
            # an endpoint, credentials: not the run (zarr's "no group" is a FileNotFoundError)
            raise unusable(path, exc) from exc
        kind = StoreDamagedError if not is_url(path) else StoreError
        raise kind(f"path={path!r}: not a readable statscope run (its root zarr.json: "
                   f"{type(exc).__name__}: {exc})") from None
    version = attrs.get(S.ATTR_FORMAT)
    if version is None:
        raise StoreError(f"path={path!r}: not a statscope run (no {S.ATTR_FORMAT!r} attribute)"
                         + _being_created(path))
    if isinstance(version, bool) or not isinstance(version, int) \
            or version not in S.READABLE_FORMATS:
        raise StoreError(f"path={path!r}: store format version {version!r} is unknown; this "
                         f"statscope reads versions {list(S.READABLE_FORMATS)}")
    return group, attrs


def _being_created(path: str) -> str:
    """What to add to "not a statscope run" for a local folder whose writer holds the lease
    beside it: a run in its first moments, before its root attributes are written."""
    from statscope.lease import lease_path

    if is_url(path):
        return ""
    try:
        lease = lease_path(path)
    except StoreError:
        return ""
    if not os.path.exists(lease):
        return ""
    return (f"; {lease!r} is beside it: a writer may be creating the run this moment, so read "
            "it again shortly")


def rank_paths(path: str | os.PathLike) -> list[str]:
    """The per-rank stores of a distributed run at ``path`` (``rank0``, ``rank1``, ...), in rank
    order; empty when ``path`` is not one."""
    path = os.fspath(path).rstrip("/")
    try:
        if is_url(path):
            fs, p = filesystem(path)
            fs.invalidate_cache(p)
            names = [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(p, detail=False)]
        else:
            base = local_path(path)
            if not base.is_dir() or (base / "zarr.json").exists():
                return []
            names = [c.name for c in base.iterdir() if c.is_dir()]
    except Exception as exc:  # noqa: BLE001 - an object store's client raises its own types
        if is_url(path) and client_error(exc) and not isinstance(exc, FileNotFoundError):
            raise unusable(path, exc) from exc
        if isinstance(exc, (OSError, ValueError)):
            return []
        raise
    ranks = sorted(int(n[4:]) for n in names if n.startswith("rank") and n[4:].isdigit())
    found = [f"{path}/rank{r}" for r in ranks]
    return found if found and all(is_single_run(f) for f in found) else []


def is_single_run(path: str) -> bool:
    """True when ``path`` is one run (not a folder of per-rank runs) of a format this version
    reads."""
    try:
        open_checked(path)
    except StoreError as exc:
        if is_unusable(exc):
            raise
        return False
    return True


def is_run(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a statscope run (or a distributed run's per-rank runs) of a
    format this version reads."""
    return is_single_run(os.fspath(path)) or bool(rank_paths(path))


def enclosing_run(path: str | os.PathLike) -> str | None:
    """The run that the local path ``path`` lies inside (one of its parent folders is a run), or
    None; None for a URL. A run made there would sit among that run's files, unseen by readers
    (they find the run above it), and go when that run is overwritten.

    Example:
        >>> enclosing_run("/tmp/no-such-folder/run") is None
        True
    """
    path = os.fspath(path)
    if is_url(path):
        return None
    target = local_path(path).expanduser().resolve()
    for parent in target.parents:
        if (parent / "zarr.json").exists() and is_single_run(str(parent)):
            return str(parent)
    return None


def find_runs(root: str | os.PathLike) -> list[str]:
    """Return the runs at ``root``: the root itself if it is a run, else its run subfolders, sorted.

    A distributed run (a folder of ``rank{r}`` runs) counts as one run; a folder at a URL is
    searched as a local one is. Folders that look like runs but cannot be read are left out;
    :func:`scan_runs` names them with the reason.
    """
    return [path for path, error in scan_runs(root) if error is None]


def scan_runs(root: str | os.PathLike) -> list[tuple[str, str | None]]:
    """The runs at ``root`` as :func:`find_runs` finds them, and the folders holding a
    ``zarr.json`` that are not readable runs: ``(path, None)`` or ``(path, reason)``, sorted.

    Raises:
        StoreError: ``root`` is neither a run nor a folder.
    """
    root = os.fspath(root)
    if is_run(root):
        return [(root, None)]
    if is_url(root):
        return _scan_url(root)
    base = local_path(root)
    if (base / "zarr.json").exists():
        return [(root, _reason(root))]
    if not base.is_dir():
        raise StoreError(f"path={root!r}: no such directory")
    out: list[tuple[str, str | None]] = []
    for p in sorted(base.iterdir()):
        if not p.is_dir():
            continue
        if is_run(p):
            out.append((str(p), None))
        elif (p / "zarr.json").exists():
            out.append((str(p), _reason(str(p))))
    return out


def _scan_url(root: str) -> list[tuple[str, str | None]]:
    """:func:`scan_runs` below a URL (a sweep's folder on S3): its immediate subfolders."""
    fs, base = filesystem(root)
    root = root.rstrip("/")
    try:
        fs.invalidate_cache(base)
        if fs.exists(f"{base.rstrip('/')}/zarr.json"):
            return [(root, _reason(root))]
        entries = fs.ls(base, detail=True)
    except FileNotFoundError:
        raise StoreError(f"path={root!r}: no such folder or run") from None
    except Exception as exc:  # noqa: BLE001 - an object store's client raises its own types
        if client_error(exc):
            raise unusable(root, exc) from exc
        raise
    out: list[tuple[str, str | None]] = []
    for entry in sorted(entries, key=lambda e: e["name"]):
        if entry.get("type") != "directory":
            continue
        child = f"{root}/{entry['name'].rstrip('/').rsplit('/', 1)[-1]}"
        if is_run(child):
            out.append((child, None))
        elif fs.exists(f"{entry['name'].rstrip('/')}/zarr.json"):
            out.append((child, _reason(child)))
    return out


def _reason(path: str) -> str:
    try:
        open_checked(path)
    except StoreError as exc:
        return str(exc)
    return "not readable by this statscope"


def _worst(statuses: list[str]) -> str:
    """The status a distributed run shows: failed, else running, else completed."""
    for s in (S.STATUS_FAILED, S.STATUS_RUNNING):
        if s in statuses:
            return s
    return S.STATUS_COMPLETED
