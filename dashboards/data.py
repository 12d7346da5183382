"""Store access for the dashboard: the runs under one root, opened, cached and followed live.

Every read the app makes goes through :class:`RunCatalog`. It knows the runs by name only; a
name from a URL or a request that is not one of the runs found under the root is refused, so
no request can make the app read a path outside the root. Runs are found by
:func:`statscope.store.scan_runs`; a run any of whose files or folders resolves outside the root
(through a symbolic link) is not served, and the page says so. The names of
:mod:`.keys`, :mod:`.links` and :mod:`.cache` are importable from here too.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from statscope import schema as S
from statscope.errors import StatscopeError, StoreError

from .cache import ByteLRU
from .columns import ColumnReads
from .following import RunFollowing, _Run, _run
from .keys import layer_slices, natural_key, neuron_key, parse_neuron_key
from .links import outside_links
from .state import EACH, MERGED

__all__ = ["RunInfo", "RunCatalog", "ByteLRU", "neuron_key", "parse_neuron_key", "natural_key",
           "layer_slices", "outside_links", "STOPPED"]

STOPPED = "stopped (no writer)"
"""What the page calls a run whose status says ``running`` but whose writer is gone (killed
with ``kill -9``, or its machine went down): it will not grow."""


@dataclass(frozen=True)
class RunInfo:
    """What the dashboard shows about a run without reading its statistics.

    Attributes:
        name: the run's name (its folder name relative to the root).
        status: ``running``, ``completed`` or ``failed``; ``None`` when the store is unreadable.
        n_steps: rows committed.
        last_step: the last training step recorded, or ``None``.
        error: why the store could not be opened, or ``None``.
        writer: for a ``running`` run, whether a writer is behind it: ``"live"``, ``"dead"``
            or ``"unknown"`` (:func:`statscope.lease.writer_state`); ``None`` otherwise.
    """

    name: str
    status: str | None
    n_steps: int
    last_step: int | None
    error: str | None = None
    writer: str | None = None

    @property
    def live(self) -> bool:
        """Whether the run may still grow: it says ``running`` and its writer is not known
        to be gone."""
        return self.status == S.STATUS_RUNNING and self.writer != "dead"

    @property
    def label(self) -> str | None:
        """The status as the page shows it: :data:`STOPPED` for a running run whose writer
        is gone."""
        if self.status == S.STATUS_RUNNING and self.writer == "dead":
            return STOPPED
        return self.status


class RunCatalog(RunFollowing, ColumnReads):
    """The runs under a root folder, opened lazily, cached per column, and refreshed when live.

    Its column reads (:meth:`columns`, :meth:`column_list`, :meth:`scalar`, :meth:`memo`) are
    :class:`~statscope.dashboards.columns.ColumnReads`.

    Args:
        root: a run folder, or a folder whose sub-folders are runs.
        cache_bytes: memory the column cache may hold.

    Raises:
        StoreError: ``root`` does not exist.
    """

    def __init__(self, root: str | os.PathLike, *, cache_bytes: int = 512 * 2**20):
        from statscope.storage import is_url

        self._url = is_url(os.fspath(root))
        if self._url:  # an object store: runs are listed, not stat'ed; no links to follow
            self.root: Any = os.fspath(root).rstrip("/")
        else:
            self.root = Path(root).resolve()
            if not self.root.exists():
                raise StoreError(f"path={os.fspath(root)!r}: no such file or directory")
        self.cache = ByteLRU(cache_bytes)
        self._runs: dict[str, _Run] = {}
        self._lock = threading.RLock()
        self._static = False
        self._signature: tuple | None = None
        self._found: dict[str, str] | None = None
        self._refreshed = float("-inf")
        self._init_workers()
        self.refresh()

    @classmethod
    def from_datasets(cls, datasets: Mapping[str, xr.Dataset], *,
                      cache_bytes: int = 512 * 2**20) -> "RunCatalog":
        """Build a catalog over in-memory Datasets (tests, notebooks); it never touches disk.

        Args:
            datasets: run name to a Dataset in the schema of :mod:`statscope.schema`.
            cache_bytes: memory the column cache may hold.
        """
        self = cls.__new__(cls)
        self.root = None
        self._url = False
        self.cache = ByteLRU(cache_bytes)
        self._lock = threading.RLock()
        self._static = True
        self._runs = {name: _run(None, ds, 0) for name, ds in datasets.items()}
        self._init_workers()
        return self

    # -- background work -------------------------------------------------------------------

    def _init_workers(self) -> None:
        self.closing = threading.Event()
        """Set by :meth:`close`: background work stops at its next step."""
        self._workers: list[threading.Thread] = []

    def spawn(self, target: Callable[..., Any], *args: Any, name: str = "statscope-prewarm"
              ) -> threading.Thread:
        """Run ``target(*args)`` in a daemon thread that :meth:`close` waits for."""
        thread = threading.Thread(target=target, args=args, daemon=True, name=name)
        with self._lock:
            self._workers = [t for t in self._workers if t.is_alive()] + [thread]
        thread.start()
        return thread

    def close(self, timeout: float = 10.0) -> None:
        """Ask background work to stop and wait for it (up to ``timeout`` s each), so that
        none is cut off mid-read when the process exits."""
        self.closing.set()
        for thread in list(self._workers):
            thread.join(timeout)

    # -- queries ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Names of the runs that opened, in sorted order."""
        return sorted((n for n, r in self._runs.items() if r.ds is not None), key=natural_key)

    def errors(self) -> dict[str, str]:
        """Runs under the root that could not be opened, with the reason."""
        return {n: r.error for n, r in sorted(self._runs.items()) if r.error is not None}

    def valid(self, names: Sequence[str] | None) -> list[str]:
        """Keep the names that are runs of this catalog, in the given order; drop the rest."""
        known = set(self.names())
        if isinstance(names, str) or not isinstance(names, (list, tuple)):
            return []
        return [n for n in dict.fromkeys(n for n in names if isinstance(n, str)) if n in known]

    def dataset(self, name: str) -> xr.Dataset:
        """The lazy Dataset of run ``name``.

        Raises:
            StatscopeError: ``name`` is not a run of this catalog.
        """
        run = self._runs.get(name)
        if run is None or run.ds is None:
            raise StatscopeError(f"run={name!r}: no such run; available: "
                                 f"{', '.join(self.names()) or 'none'}")
        return run.ds

    def info(self, name: str) -> RunInfo:
        """Status and progress of run ``name``, from its attributes only."""
        run = self._runs[name]
        if run.ds is None:
            return RunInfo(name, None, 0, None, run.error)
        attrs = run.ds.attrs
        last = attrs.get(S.ATTR_LAST_STEP)
        if (last is None or S.RANK in run.ds.dims) and run.ds.sizes[S.STEP]:
            # of a distributed run, the last step every running rank committed: what is drawn
            last = int(run.ds[S.STEP].values[-1])
        elif S.RANK in run.ds.dims:
            last = None
        return RunInfo(name, attrs.get(S.ATTR_STATUS), int(run.ds.sizes[S.STEP]),
                       None if last is None else int(last), writer=run.writer)

    def version(self) -> dict[str, int]:
        """Run name to its generation; changes whenever a run is reopened."""
        return {n: r.generation for n, r in sorted(self._runs.items())}

    def neuron_index(self, name: str, layer: str, unit: int) -> int | None:
        """Position along ``neuron`` of ``(layer, unit)`` in run ``name``, or ``None``."""
        return self._runs[name].index.get((layer, int(unit)))

    def layers(self, name: str) -> list[str]:
        """Layers of run ``name``, in store order."""
        return list(self._runs[name].layers)

    def layer_map(self, name: str) -> dict[str, np.ndarray]:
        """Positions along ``neuron`` of each layer's neurons in run ``name``, in store order
        (do not modify)."""
        return self._runs[name].layers

    def layer_positions(self, name: str, layer: str) -> np.ndarray:
        """Positions along ``neuron`` of the neurons of ``layer`` in run ``name`` (maybe empty)."""
        return self._runs[name].layers.get(layer, np.zeros(0, np.int64))

    def first_unit(self, name: str, layer: str) -> int:
        """The unit of the first neuron of ``layer`` in run ``name`` (the paper's "i-1")."""
        pos = self._runs[name].layers[layer]
        return int(self.dataset(name)[S.UNIT].values[pos[0]])

    def scalar_names(self, name: str) -> list[str]:
        """The logged scalars of run ``name`` (``loss``, ``lr``...), as its attrs list them."""
        return list(self._runs[name].scalars)

    def search_neurons(self, names: Sequence[str], text: str, most: int) -> list[tuple[str, int]]:
        """Up to ``most`` neurons of the runs ``names`` whose label matches ``text``.

        ``"fc2"`` matches every neuron of the layers whose name contains it, ``"fc2[1"`` or
        ``"fc2:1"`` the units of ``fc2`` that start with 1. The search stops at ``most``, so it
        costs the answer's length, not the runs' neuron count.
        """
        # a request may carry anything: what is not text searches for nothing in particular
        text = (text if isinstance(text, str) else "").strip().lower().replace(":", "[").rstrip("]")
        want, _, digits = text.partition("[")
        out: dict[tuple[str, int], None] = {}
        for name in names:
            ds = self.dataset(name)
            units = ds[S.UNIT].values
            for layer, pos in self._runs[name].layers.items():
                if want not in layer.lower() or (digits and layer.lower() != want):
                    continue
                for p in pos:
                    u = int(units[p])
                    if not digits or str(u).startswith(digits):
                        out[(layer, u)] = None
                        if len(out) >= most:
                            return list(out)
        return list(out)

    def steps(self, name: str) -> np.ndarray:
        """Steps of run ``name``, (step,) int64."""
        return self.dataset(name)[S.STEP].values

    def ranks(self, name: str) -> tuple[int, ...]:
        """The ranks of a distributed run (a folder of ``rank{r}`` stores); ``()`` for a run
        written by one process."""
        return self._runs[name].ranks

    def rank_key(self, name: str, rank: str | int | None) -> str | int | None:
        """The rank choice as the data of run ``name`` knows it: ``None`` for a single-process
        run (it has one set of statistics, whatever the choice), else
        :data:`~statscope.dashboards.state.MERGED` or a rank number it has.

        Raises:
            StatscopeError: a rank number the run does not have.
        """
        ranks = self._runs[name].ranks
        if not ranks:
            return None
        if rank is None or rank in (MERGED, EACH):
            return MERGED
        if rank not in ranks:
            raise StatscopeError(f"rank={rank!r}: run {name!r} has ranks "
                                 f"{', '.join(map(str, ranks))}")
        return int(rank)

    def view(self, name: str, rank: str | int | None = None) -> xr.Dataset:
        """Run ``name`` as one set of (step, neuron) statistics: for a distributed run, one
        rank's, or the global ones merged exactly over its ranks
        (:func:`statscope.ranks.merge_ranks`, what SyncBatchNorm computes), lazily; the
        Dataset itself for a single-process run.

        Args:
            name: run name.
            rank: :data:`~statscope.dashboards.state.MERGED` (or ``None``) or a rank number.
        """
        key = self.rank_key(name, rank)
        run = self._runs[name]
        if key is None:
            return self.dataset(name)
        with self._lock:
            ds = run.derived.get(("view", key))
            if ds is None:
                from statscope.ranks import merge_ranks

                whole = self.dataset(name)
                ds = merge_ranks(whole) if key == MERGED else whole.sel({S.RANK: key})
                run.derived[("view", key)] = ds
        return ds

    def windows(self, name: str, rank: str | int | None = None) -> xr.Dataset | None:
        """The window summaries of run ``name`` (of one rank for a distributed run; there are
        none of the merged ranks), from :func:`statscope.store.open_windows`, lazy; ``None``
        when the run keeps none, lives only in memory, or the choice is the merged ranks."""
        key = self.rank_key(name, rank)
        run = self._runs[name]
        if run.path is None or key == MERGED:
            return None
        with self._lock:
            if ("windows", key) not in run.derived:
                from statscope.store import open_windows, rank_stores

                path = (run.path if key is None
                        else rank_stores(run.path).paths[run.ranks.index(key)])
                try:
                    w = open_windows(path)
                except StatscopeError:
                    w = None
                run.derived[("windows", key)] = w
            return run.derived[("windows", key)]


