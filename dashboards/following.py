"""Finding the runs under the dashboard's root and following them while they are written (a
mixin of :class:`~statscope.dashboards.data.RunCatalog`).

Each refresh lists the root again when its folders changed, and re-reads a run when it may
have changed: a run that says ``running`` on every refresh (and whether a writer is still
behind it), any other run when the stamp of its documents changed (:mod:`.stamps`): a run
re-run into its own folder is read afresh, with its cached columns dropped. A root that is
renamed or deleted leaves the catalog empty until it is back.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from statscope import schema as S
from statscope.errors import StatscopeError, StoreError

from .cache import ByteLRU
from .keys import layer_slices
from .links import outside_links
from .stamps import RANKS, run_state, stamp, writer_of

__all__ = ["RunFollowing", "RECHECK_SECONDS", "committed_by_every_rank"]

RECHECK_SECONDS = 10.0
"""How often a finished run at a URL (an object store, where there is no cheap stamp) has its
attributes read again, to notice a run re-run into its folder."""


@dataclass
class _Run:
    path: str | None
    ds: xr.Dataset | None
    generation: int
    error: str | None = None
    index: dict[tuple[str, int], int] = field(default_factory=dict)
    layers: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: tuple[str, ...] = ()
    ranks: tuple[int, ...] = ()
    # what the last poll saw: the stamp of its documents (local runs), whether a writer is
    # behind it (running runs), and when its attributes were last read (URLs)
    stamp: tuple | None = None
    writer: str | None = None
    checked: float = float("-inf")
    # lazy Datasets derived from ds (a rank's, the merged ranks', window summaries), built on
    # first use; not in the byte cache, whose size of a lazy Dataset would be the whole run's
    derived: dict[Hashable, Any] = field(default_factory=dict)


def _run(path: str | None, ds: xr.Dataset, generation: int, old: _Run | None = None) -> _Run:
    """A run's record with the lookups every callback needs, built once per (re)open; a live
    run reopened with the same probes keeps ``old``'s (they cost a pass over every neuron)."""
    names = [n for n in ds.attrs.get(S.ATTR_SCALARS) or []
             if n in ds.data_vars and S.STEP in ds[n].dims and S.NEURON not in ds[n].dims]
    ranks = tuple(int(r) for r in ds[S.RANK].values) if S.RANK in ds.dims else ()
    if (old is not None and old.ds is not None
            and old.ds.attrs.get(S.ATTR_PROBES) == ds.attrs.get(S.ATTR_PROBES)
            and old.ds.sizes.get(S.NEURON) == ds.sizes.get(S.NEURON)):
        return _Run(path, ds, generation, index=old.index, layers=old.layers,
                    scalars=tuple(names), ranks=ranks)
    lay = ds[S.LAYER].values
    units = ds[S.UNIT].values
    return _Run(path, ds, generation,
                index={(str(l), int(u)): i for i, (l, u) in enumerate(zip(lay.tolist(),
                                                                          units.tolist()))},
                layers=layer_slices(lay), scalars=tuple(names), ranks=ranks)


def committed_by_every_rank(ds: xr.Dataset) -> xr.Dataset:
    """A distributed run cut to the steps every rank that is still running has committed.

    Each rank's writer commits at its own pace, so while the run trains one rank's store may
    hold steps another's does not yet: their global statistics do not exist yet, and merged
    they would be those of the ranks that got there first (a smaller batch posing as the global
    one). A rank that finished (or failed) does not hold the others back; nor does a
    single-process run, which is returned as it is.

    Args:
        ds: ``open_run`` of a run; of a distributed run, with each rank's attributes under
            ``attrs["ranks"]``.

    Returns:
        ``ds``, or its steps up to the smallest last step of the running ranks (none while a
        running rank has committed no step).

    Example:
        >>> ds = xr.Dataset(coords={"rank": [0, 1], "step": [0, 1, 2]}, attrs={"ranks": {
        ...     "0": {"status": "running", "last_step": 2},
        ...     "1": {"status": "running", "last_step": 1}}})
        >>> committed_by_every_rank(ds)["step"].values.tolist()
        [0, 1]
    """
    ranks = ds.attrs.get(RANKS)
    if S.RANK not in ds.dims or not isinstance(ranks, Mapping):
        return ds
    lasts = [a.get(S.ATTR_LAST_STEP) for a in ranks.values()
             if isinstance(a, Mapping) and a.get(S.ATTR_STATUS) == S.STATUS_RUNNING]
    steps = np.asarray(ds[S.STEP].values)
    if not lasts or not steps.size:
        return ds
    if any(last is None for last in lasts):
        return ds.isel({S.STEP: slice(0, 0)})
    horizon = min(int(last) for last in lasts)
    if steps[-1] <= horizon:
        return ds
    return ds.isel({S.STEP: slice(0, int(np.searchsorted(steps, horizon, "right")))})


class RunFollowing:
    """How :class:`~statscope.dashboards.data.RunCatalog` finds and follows its runs (a mixin)."""

    # Set up by RunCatalog; declared for type checkers.
    root: Any
    cache: ByteLRU
    _runs: dict[str, _Run]
    _lock: threading.RLock
    _url: bool
    _static: bool
    _signature: tuple | None
    _found: dict[str, str] | None
    _refreshed: float

    def _scan_signature(self) -> tuple | None:
        """The root's and its sub-folders' modification times: a new run, or a run's first
        file, changes it; a run writing its chunks does not. ``None`` while the root is gone
        (renamed or deleted under the running dashboard)."""
        if self._url:  # the names below the URL: a new run's first object adds one
            from statscope.storage import filesystem

            fs, base = filesystem(self.root)
            try:
                fs.invalidate_cache(base)
                return tuple(sorted(fs.ls(base, detail=False)))
            except OSError:
                return None
        try:
            top = self.root.stat().st_mtime_ns
        except OSError:
            return None
        try:
            entries = sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(self.root)
                             if e.is_dir())
        except OSError:
            entries = []
        return top, tuple(entries)

    @property
    def root_gone(self) -> bool:
        """Whether the root could not be listed at the last refresh (renamed or deleted); its
        runs are forgotten until it is back."""
        return not self._static and self._signature is None

    def _find(self) -> tuple[dict[str, str], bool]:
        """Run name to path: the runs and the folders that look like runs but cannot be read
        (named on the page with their reason), as :func:`~statscope.store.scan_runs` lists
        them; and whether the root was scanned again (it is only when its folders changed).
        No runs while the root is gone."""
        from statscope.store import scan_runs

        signature = self._scan_signature()
        if signature == self._signature and self._found is not None:
            return self._found, False
        try:
            runs = scan_runs(self.root) if signature is not None else []
        except StoreError:  # gone between the two looks, or no longer a folder
            runs, signature = [], None
        found = {str(p).rstrip("/").rsplit("/", 1)[-1] if self._url else Path(p).name: str(p)
                 for p, _ in runs}
        self._signature, self._found = signature, found
        return found, True

    def refresh(self, *, max_age: float = 0.0) -> list[str]:
        """Rescan the root and reopen every run whose committed steps or status changed, or
        that was replaced by another run in its folder.

        A run that says ``running`` has its attributes read on every refresh, and whether a
        writer is still behind it (:func:`statscope.lease.writer_state`); any other run only
        when the stamp of its documents changed (every :data:`RECHECK_SECONDS` at a URL).

        Args:
            max_age: do nothing when the last refresh is younger than this many seconds (the
                page of every open browser tab polls; one rescan serves them all).

        Returns:
            The names of runs that appeared, changed or vanished (a running run whose writer
            was found gone counts as changed).
        """
        if self._static:
            return []
        changed = []
        with self._lock:
            now = time.monotonic()
            if now - self._refreshed < max_age:
                return []
            self._refreshed = now
            found, rescanned = self._find()
            for name in [n for n in self._runs if n not in found]:
                self._forget(name)
                changed.append(name)
            for name, path in found.items():
                if self._refresh_run(name, path, rescanned, now):
                    changed.append(name)
        return changed

    def _refresh_run(self, name: str, path: str, rescanned: bool, now: float) -> bool:
        """Reread one run if it may have changed; whether it did."""
        from statscope.store import read_attrs

        run = self._runs.get(name)
        kept = run if run is not None and run.path == path else None
        if kept is not None and kept.ds is None and kept.generation < 0 and not rescanned:
            return False  # refused for its links: it does not change until the folders do
        mark = None if self._url else stamp(path)
        if kept is not None and kept.ds is not None and kept.writer in (None, "dead"):
            # finished, or stopped: unchanged until its documents are rewritten
            if self._url and now - kept.checked < RECHECK_SECONDS:
                return False
            if not self._url and mark is not None and mark == kept.stamp:
                return False
        links = [] if self._url else outside_links(path, self.root)
        if links:
            if run is None or run.ds is not None:
                self._replace(name, _Run(path, None, -1, error=(
                    f"not served: {', '.join(links)} resolves outside {self.root} "
                    "(symbolic links must stay inside the dashboard's folder)")))
                return True
            return False
        try:
            attrs = read_attrs(path)
        except StatscopeError as exc:
            if run is None or run.error != str(exc):
                self._replace(name, _Run(path, None, 0 if run is None else
                                         max(0, run.generation) + 1, error=str(exc)))
                return True
            return False
        writer = writer_of(path, attrs)
        if run is not None and run.ds is not None and run_state(run.ds.attrs) == run_state(attrs):
            if writer == run.writer:
                run.stamp, run.checked = mark, now
                return False
            # same data, but its writer died (or came back): a new generation, so that every
            # page's token moves and the badges are drawn again
            self._replace(name, dataclasses.replace(run, generation=run.generation + 1,
                                                    writer=writer, stamp=mark, checked=now))
            return True
        self._open(name, path, 0 if run is None else max(0, run.generation) + 1,
                   mark, writer, now)
        return True

    def _open(self, name: str, path: str, generation: int, mark: tuple | None = None,
              writer: str | None = None, now: float = float("-inf")) -> None:
        from statscope.store import open_run

        try:
            run = _run(path, committed_by_every_rank(open_run(path)), generation,
                       self._runs.get(name))
        except Exception as exc:  # a corrupt store must not take the good runs down
            run = _Run(path, None, generation, error=f"{type(exc).__name__}: {exc}")
        run.stamp, run.writer, run.checked = mark, writer, now
        self._replace(name, run)

    def _replace(self, name: str, run: _Run) -> None:
        """Swap in a run's new record in one step: a request served meanwhile (another page)
        sees the old record or the new one, never none. Cache keys carry the generation, so
        the old one's entries are dropped, and any a request still adds are never read."""
        old = self._runs.get(name)
        self._runs[name] = run
        if old is not None:
            self.cache.drop(lambda key: key[0] == name and key[1] != run.generation)

    def _forget(self, name: str) -> None:
        self._runs.pop(name, None)
        self.cache.drop(lambda key: key[0] == name)
