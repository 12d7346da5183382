"""Append-only, crash-safe writing of one run store (format 2).

:class:`RunWriter` holds the run's lease (:mod:`statscope.lease`) for its whole life, stages rows
in host memory and writes them to zarr in blocks, at least every ``flush_seconds``. After the data
of a block is written, the root attribute ``n_steps`` is advanced: that write is atomic (zarr's
local store writes a temporary file and renames it; object stores replace whole objects), so a
reader or a process killed at any moment sees every row up to the last commit and nothing half
written. Every chunk is written, NaN or not, and carries a crc32c checksum, so missing or damaged
data is detected on read instead of being read as fill values. Probes that first run after the
run began get columns appended (their earlier rows are written as NaN, count 0). One thread at a
time calls a writer.

The writer is one class in two modules: this one (opening, appending, flushing, closing) and
:mod:`statscope.writer_arrays` (creating, resuming and widening the run's arrays); the checks
before a run is created or resumed are in :mod:`statscope.destination`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from statscope import schema as S
from statscope.errors import StatscopeError, StoreError
from statscope.lease import Lease
from statscope.storage import remove_partials, remove_tree
from statscope.store import Layout, ProbeInfo
from statscope.destination import (check_path, check_scalar_name, committed_steps,
                                   folder_identity, refuse_completed, resume_step)
from statscope.windows import Windows
from statscope.writer_arrays import WriterArrays, _jsonable, now_iso, package_versions

__all__ = ["RunWriter", "count_nonfinite", "write_run", "check_path", "check_scalar_name",
           "package_versions", "resume_step", "now_iso"]

_STAGE_BYTES = 256 << 20  # rows staged in memory before a flush, at most (wide models)


class RunWriter(WriterArrays):
    """Create (or resume) a run store and append rows to it, holding the run's lease.

    Args:
        path: run folder or fsspec URL.
        layout: the probes known now and the statistics of the run. On resume, probes already in
            the store must agree with these; new ones get columns appended.
        attrs: root attributes to set (model, meta, command, ...).
        overwrite: replace an existing run at ``path``.
        resume: continue an existing run: ``True`` after its last committed step; an int, at
            that step (a training loop restarted from its checkpoint there): committed rows of
            that step and later are dropped first, and a step past the last leaves a gap. With
            no run at ``path``, an int starts the new one's steps there.
        resume_completed: resuming, continue a run that is ``completed`` (more training after
            it ended). False refuses one, with nothing changed: what ``statscope run --resume``
            passes, so that a run another process completed since the caller planned is left
            as that process left it.
        chunk_steps: rows per shard (one object per array and shard); None (default) chooses
            them so that a shard's rows over all kept columns hold about 64 MiB (8192 for narrow
            layouts, fewer for wide ones, at least 256), which bounds what one flush rewrites.
        neuron_chunk: columns per chunk inside a shard.
        flush_seconds: write staged rows at least this often.
        running0: initial running buffers of every channel, ``{"running_mean0": (n,), ...}``.
        window_steps: W of the window summaries (:mod:`statscope.windows`); None for none.

    Raises:
        StoreLockedError: another writer holds the run.
        StoreError: ``path`` holds something and neither ``overwrite`` nor ``resume`` is set, or
            ``resume`` finds a run with other statistics or layers.
    """

    def __init__(self, path, layout: Layout, *, attrs: Mapping[str, Any] | None = None,
                 overwrite: bool = False, resume: bool | int = False,
                 resume_completed: bool = True, chunk_steps: int | None = None, neuron_chunk: int = 64, flush_seconds: float = 2.0,
                 running0: Mapping[str, np.ndarray] | None = None,
                 window_steps: int | None = S.DEFAULT_WINDOW_STEPS):
        self.path = os.fspath(path)
        self.window_steps = window_steps
        self.windows: Windows | None = None
        self._done_windows: list = []
        self.n_windows = 0
        self.chunk_steps = None if chunk_steps is None else int(chunk_steps)
        self.neuron_chunk = int(neuron_chunk)
        self.flush_seconds = float(flush_seconds)
        self.closed = False
        self._stage: list[dict[str, np.ndarray]] = []
        self._staged = 0
        self._staged_bytes = 0
        self._amended = False  # scalars written in place since the last commit
        self._last_write = time.monotonic()
        at = resume_step(resume)
        resume = resume is not False
        check_path(self.path, overwrite=overwrite, resume=resume)
        self.lease = Lease.acquire(self.path)
        try:
            there = check_path(self.path, overwrite=overwrite, resume=resume)  # now under lease
            if resume and there and not resume_completed:
                refuse_completed(self.path)
            if resume and there and committed_steps(self.path):
                remove_partials(self.path)
                self._resume(layout, attrs or {}, running0 or {}, at)
            else:
                # a run killed before its first commit holds no row, and maybe not all of its
                # arrays: it starts afresh
                if there:
                    remove_tree(self.path)
                self._create(layout, attrs or {}, running0 or {})
                self.next_step = at or 0
            self._identity = folder_identity(self.path)
        except BaseException:
            self.lease.release()
            raise

    # -- appending --------------------------------------------------------------------------

    def append(self, steps: np.ndarray, count: np.ndarray, stats: Mapping[str, np.ndarray],
               scalars: Mapping[str, np.ndarray] | None = None) -> int:
        """Stage ``k`` rows; write them when a shard fills or ``flush_seconds`` have passed.

        Args:
            steps: (k,) int64 global steps, increasing, after every step written so far.
            count: (k, n_probes) int64 elements per channel; 0 where a probe did not run.
            stats: per statistic of the layout, (k, n_channels) — every channel, also those
                without per-step columns (window summaries use them) — or, for EN,
                (k, n_groups) float32.
            scalars: optional (k,) float arrays by name (NaN where not logged).

        Returns:
            The number of new non-finite statistics among rows where the probe ran.

        Raises:
            StatscopeError: shapes that do not fit the layout, or steps not after the last one.
        """
        k = len(steps)
        if k == 0:
            return 0
        steps = np.asarray(steps, np.int64)
        if steps[0] < self.next_step or (k > 1 and np.any(np.diff(steps) <= 0)):
            raise StatscopeError(f"steps={steps[0]}..{steps[-1]}: not increasing after step "
                                 f"{self.next_step - 1}")
        row: dict[str, np.ndarray] = {S.STEP: steps, S.COUNT: np.asarray(count, np.int64)}
        lay = self.layout
        nonfinite = count_nonfinite(lay, row[S.COUNT], stats)
        for s, n in nonfinite.items():
            self.nonfinite[s] = self.nonfinite.get(s, 0) + n
        bad = sum(nonfinite.values())
        probe_of = self._probe_of(lay)
        kept = None if lay.n_neurons == lay.n_channels else self._kept_columns(lay)
        full = {}
        for s in lay.stats:
            a = np.asarray(stats[s], np.float32)
            full[s] = a
            row[s] = a if kept is None or s in S.PER_GROUP_STATS else a[:, kept]
        if self.windows is not None:
            self._done_windows += self.windows.add(steps, row[S.COUNT], full, probe_of)
        for name, values in (scalars or {}).items():
            self._ensure_scalar(name)
            row[name] = np.asarray(values, np.float64)
        self._stage.append(row)
        self._staged += k
        self._staged_bytes += sum(a.nbytes for a in row.values())
        self.next_step = int(steps[-1]) + 1
        boundary = self.chunk_steps - (self.n_steps % self.chunk_steps)
        if self._staged >= boundary or self._staged_bytes >= _STAGE_BYTES \
                or time.monotonic() - self._last_write >= self.flush_seconds:
            self.flush()
        return bad

    def amend_scalars(self, values: Mapping[str, Sequence[tuple[int, float]]]) -> None:
        """Write scalars logged for steps appended already: ``{name: [(step, value), ...]}``.

        Under the optimizer rule a step's rows are appended while training is idle after its
        ``optimizer.step()``, and what is logged after that (an evaluation's accuracy) comes
        later. Staged rows take the values in place; written ones in the store, committed with
        the next flush. A step not appended (none such is expected) is left out.
        """
        for name, pairs in values.items():
            self._ensure_scalar(name)
            for step, value in pairs:
                if not self._amend_staged(name, step, value):
                    row = self._written_row(step)
                    if row is not None:
                        self._check_folder()
                        self._arrays[name][row] = value
                        self._amended = True

    def _amend_staged(self, name: str, step: int, value: float) -> bool:
        for row in self._stage:
            steps = row[S.STEP]
            i = int(np.searchsorted(steps, step))
            if i < len(steps) and steps[i] == step:
                if name not in row:
                    row[name] = np.full(len(steps), np.nan)
                row[name][i] = value
                return True
        return False

    def _written_row(self, step: int) -> int | None:
        """The row of a step written to the store (looked up among the last rows first)."""
        n = self.n_steps
        for lo in (max(0, n - 64), 0):
            steps = np.asarray(self._arrays[S.STEP][lo:n])
            i = int(np.searchsorted(steps, step))
            if i < len(steps) and steps[i] == step:
                return lo + i
            if lo == 0 or (len(steps) and steps[0] <= step):
                return None
        return None

    def _ensure_scalar(self, name: str) -> None:
        if name in self._scalars:
            return
        check_scalar_name(name, self.layout.stats)
        self._new_array(name, (0,), "float64", np.nan, (S.STEP,))
        if self.n_steps:
            arr = self._arrays[name]
            arr.resize((self.n_steps,))
            arr[:] = np.nan
        self._scalars.append(name)

    def flush_due(self) -> bool:
        """True when staged rows, or scalars written into rows in place, have waited
        ``flush_seconds``."""
        return (bool(self._staged) or self._amended) \
            and time.monotonic() - self._last_write >= self.flush_seconds

    def flush(self) -> None:
        """Write every staged row, then advance the commit marker."""
        self._check_folder()
        self.lease.renew()
        if not self._staged:
            if self._amended:  # late scalars written in place: commit them (and new names)
                self._amended = False
                self._commit()
            self._last_write = time.monotonic()
            return
        self._amended = False
        k = self._staged
        n0, n1 = self.n_steps, self.n_steps + k
        for name in (S.STEP, S.COUNT, *self.layout.stats, *self._scalars):
            arr = self._arrays[name]
            parts = [r[name] if name in r else np.full((len(r[S.STEP]), *arr.shape[1:]), np.nan)
                     for r in self._stage]
            block = np.concatenate(parts) if len(parts) > 1 else parts[0]
            arr.resize((n1, *arr.shape[1:]))
            arr[n0:n1] = block
        last = int(self._stage[-1][S.STEP][-1])
        self._stage, self._staged, self._staged_bytes = [], 0, 0
        self.n_steps = n1
        self._write_windows()
        self._commit(last)
        self._last_write = time.monotonic()

    def _write_windows(self) -> None:
        if self._done_windows:
            self.n_windows = self._warrays.append(self._done_windows, self.n_windows,
                                                  self.window_steps)
            self._done_windows = []

    def _commit(self, last: int | None = None) -> None:
        """Write the root attributes that name what is committed, in one atomic document."""
        update = {S.ATTR_N_STEPS: self.n_steps, S.ATTR_N_WINDOWS: self.n_windows,
                  S.ATTR_SCALARS: list(self._scalars),
                  S.ATTR_NONFINITE: dict(self.nonfinite),
                  S.ATTR_PROBES: [p.to_json() for p in self.layout.probes],
                  S.ATTR_LAYERS: [p.name for p in self.layout.probes]}
        if last is not None:
            update[S.ATTR_LAST_STEP] = last
        self._group.update_attributes(_jsonable(update))

    def heartbeat(self) -> None:
        """Renew the lease where it needs renewing (object stores); call now and then when idle."""
        self.lease.renew()

    def set_attrs(self, **attrs: Any) -> None:
        """Update root attributes (e.g. the measured probe overhead)."""
        self._check_folder()
        self._group.update_attributes(_jsonable(attrs))

    def _check_folder(self) -> None:
        """Refuse to write once the run's local folder was deleted, moved or replaced: a write
        would make a new folder of stray files at the old path.

        Raises:
            StoreError: naming the path.
        """
        identity = getattr(self, "_identity", None)
        if identity is not None and folder_identity(self.path) != identity:
            raise StoreError(f"path={self.path!r}: the run's folder was deleted, moved or "
                             "replaced while recording; nothing more is written there (rows "
                             "not written yet are lost)")

    def close(self, status: str = S.STATUS_COMPLETED, error: str | None = None) -> None:
        """Flush, mark the run ``completed`` or ``failed`` (with the error's text), release the
        lease. The lease is released even when flushing fails; the run is then marked failed."""
        if self.closed:
            return
        if status not in S.STATUSES:
            raise StatscopeError(f"status={status!r}: expected one of {S.STATUSES}")
        self.closed = True
        try:
            try:
                if self.windows is not None and self.windows.index is not None:
                    self._done_windows.append(self.windows.finish())  # the last, partial window
                self.flush()
                self._write_windows()
                self._commit()
            except BaseException as exc:
                status, error = S.STATUS_FAILED, error or f"writing the last rows: {exc!r}"
                self._mark(status, error)
                raise
            self._mark(status, error)
        finally:
            self.lease.release()

    def _mark(self, status: str, error: str | None) -> None:
        identity = getattr(self, "_identity", None)
        if identity is not None and folder_identity(self.path) != identity:
            return  # not the run's folder any more (see _check_folder)
        self._group.update_attributes({S.ATTR_STATUS: status, S.ATTR_ENDED: now_iso(),
                                  S.ATTR_ERROR: error})


def count_nonfinite(layout: Layout, count: np.ndarray,
                    stats: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Per statistic, its non-finite values in rows where their probe ran (none: left out).

    Args:
        layout: the run's layout.
        count: (k, n_probes) elements per channel, 0 where a probe did not run.
        stats: per statistic of the layout, (k, n_channels), or (k, n_groups) for EN.

    Raises:
        StatscopeError: shapes that do not fit the layout.
    """
    k = len(count)
    if count.shape != (k, len(layout.probes)):
        raise StatscopeError(f"count: shape {count.shape}, expected ({k}, {len(layout.probes)})")
    ran = count > 0
    probe_of = RunWriter._probe_of(layout)
    out = {}
    for s in layout.stats:
        a = np.asarray(stats[s])
        width = layout.n_groups if s in S.PER_GROUP_STATS else layout.n_channels
        if a.shape != (k, width):
            raise StatscopeError(f"stats[{s!r}]: shape {a.shape}, expected ({k}, {width})")
        if np.isfinite(a.sum(dtype=np.float64)):  # one pass: a float64 sum of float32 values
            continue  # cannot overflow, so it is finite when every value is
        n = int(np.count_nonzero(~np.isfinite(a) & ran[:, probe_of[s]]))
        if n:
            out[s] = n
    return out


def write_run(path, probes, data: Mapping[str, np.ndarray], *, steps=None, count=None,
              scalars: Mapping[str, np.ndarray] | None = None, meta: Mapping[str, Any] | None = None,
              status: str = S.STATUS_COMPLETED, overwrite: bool = False,
              chunk_steps: int | None = None, **attrs: Any) -> str:
    """Write a whole run at once, e.g. synthetic data for tests and benchmarks.

    Args:
        path: run folder or URL.
        probes: ProbeInfo records, or a mapping ``{layer name: channels}`` (one EN group each).
        data: ``bn_mean``, ``bn_std`` [, ``bn_kurt``] as (T, n_neurons) and ``en_mean``,
            ``en_std`` as (T, n_groups) arrays; the statistics present define the layout.
        steps: (T,) int steps; default ``arange(T)``.
        count: (T, n_probes) elements per channel; default 1 everywhere.
        scalars: per-step scalars, (T,) each.
        meta: the run's user metadata (``batch_size``, ``seed``, ...).
        status: final status to mark.
        overwrite: replace an existing run.
        chunk_steps: rows per shard (None: chosen from the layout).
        **attrs: more root attributes.

    Returns:
        The path written.
    """
    if isinstance(probes, Mapping):
        probes = [ProbeInfo(name=k, module=k, type="synthetic", where="input", channel_dim=-1,
                            channels=int(c)) for k, c in probes.items()]
    stats = tuple(s for s in S.ALL_STATS if s in data)
    layout = Layout(probes=tuple(probes), stats=stats)
    t = len(next(iter(data.values())))
    steps = np.arange(t) if steps is None else np.asarray(steps)
    count = np.ones((t, len(layout.probes)), np.int64) if count is None else np.asarray(count)
    writer = RunWriter(path, layout, attrs={S.ATTR_META: dict(meta or {}), **attrs},
                       overwrite=overwrite, flush_seconds=float("inf"), chunk_steps=chunk_steps)
    try:
        writer.append(steps, count, {s: data[s] for s in stats}, scalars)
    except BaseException:
        writer.close(S.STATUS_FAILED, "write_run failed")
        raise
    writer.close(status)
    return os.fspath(path)
