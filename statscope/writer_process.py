"""A run writer in a process of its own, so that filing rows never takes the training's GIL.

A launch-bound training loop releases Python's GIL at every torch op and must take it back
before the next: any Python that another thread of the process runs meanwhile delays training by
its own length. The writer's zarr work (staging, the codecs' Python, the event loop that writes
the chunks, the window summaries) cost ~150 µs per step of the paper's FC net at batch size 4
(~10 % of its step) when it ran on a thread (``benchmarks/bench_models.py``, contender
``thread``). :class:`WriterProcess` runs a :class:`~statscope.writer.RunWriter` in a child
process instead and stands in for it on the writer thread, which then only gathers each block
into host arrays — its torch work — and sends them down a pipe; the child computes the rows in
numpy (:mod:`statscope.rows`) and writes them.

The child (:mod:`statscope.writer_child`) is a fresh interpreter started with :mod:`subprocess` (multiprocessing's ``spawn`` and
fork server would run an unguarded training script again), talking over a socket pair; it
imports no torch. It takes the run's lease itself (naming the training process as ``parent``),
flushes every ``flush_seconds`` and heartbeats on its own. It ends when the pipe closes: after a
``kill -9`` of training it finishes the write in progress and writes nothing more, and a writer
that finds its lease waits for it (:mod:`statscope.lease`). Errors in the child (a full disk)
come back as the same exception at the next call; a child that dies is a
:class:`~statscope.errors.StoreError`.

``memory://`` stores live in the memory of one process and keep the thread, as does Windows
(``subprocess`` cannot hand a pipe to a child there).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from multiprocessing.connection import Connection
from typing import Any, Mapping, Sequence

import numpy as np

from statscope import schema as S
from statscope.errors import StatscopeError, StatscopeWarning, StoreError
from statscope.lease import close_at_fork
from statscope.rows import Advice, Gathered
from statscope.store import Layout, ProbeInfo
from statscope.writer import RunWriter, count_nonfinite

__all__ = ["WriterProcess", "WriterStartError", "open_writer", "resolve_mode", "WRITER_MODES"]

WRITER_MODES = ("auto", "process", "thread")
_ENV = "STATSCOPE_WRITER"
_POLL = 0.5  # seconds between checks that the child lives, while waiting for it
_OUR_FDS: set[int] = set()
# A forked child (a DataLoader worker) must not keep a writer's pipe open: the writer process
# learns that training ended from the pipe closing.
close_at_fork(_OUR_FDS)


def open_writer(path: str, layout: Layout, mode: str = "auto", **kwargs: Any):
    """A :class:`RunWriter`, in this process (``"thread"``) or a child (``"process"``).

    Args:
        path, layout, kwargs: as for :class:`~statscope.writer.RunWriter`.
        mode: ``"auto"`` (the ``STATSCOPE_WRITER`` environment variable if set, else a process
            for every store but ``memory://``, and a thread on Windows), ``"process"`` or
            ``"thread"``.
    """
    chosen = resolve_mode(mode, path)
    if chosen == "thread":
        return RunWriter(path, layout, **kwargs)
    try:
        return WriterProcess(path, layout, **kwargs)
    except WriterStartError as exc:
        if mode != "auto" or os.environ.get(_ENV) == "process":
            raise
        warnings.warn(f"statscope: {exc}; the writer thread writes the store instead",
                      StatscopeWarning, stacklevel=3)
        return RunWriter(path, layout, **kwargs)


class WriterStartError(StoreError):
    """The writer process could not be started, or ended before it opened the run (with
    ``writer="auto"`` the writer thread then writes the store, with a warning)."""


def resolve_mode(mode: str, path: str) -> str:
    """``"process"`` or ``"thread"`` for ``mode`` and the store at ``path``."""
    if mode not in WRITER_MODES:
        raise StatscopeError(f"writer={mode!r}: expected one of {WRITER_MODES}")
    # memory:// lives in one process's memory: a child would write into its own and lose it all
    in_memory = str(path).startswith("memory://")
    if mode == "process" and in_memory:
        raise StatscopeError(f"writer='process' with path={str(path)!r}: a memory:// store "
                             f"lives in this process's memory, which a writer process cannot "
                             f"reach; use writer='thread' (or 'auto')")
    if mode == "auto":
        env = os.environ.get(_ENV, "auto")
        if env not in WRITER_MODES:
            raise StatscopeError(f"{_ENV}={env!r}: expected one of {WRITER_MODES}")
        mode = "auto" if in_memory else env  # the variable sets a default, not the impossible
    if mode == "auto":
        mode = "thread" if in_memory or os.name == "nt" else "process"  # Windows: no pipe to pass
    return mode


class WriterProcess:
    """Stands in for a :class:`~statscope.writer.RunWriter` that runs in a child process.

    The same arguments and the methods the recorder's writer thread calls. ``append``,
    ``append_gathered`` and ``set_attrs`` return at once (the pipe applies back-pressure when the child
    falls behind); ``add_probes`` and ``close`` wait for the child. Owned by one thread.

    Raises:
        StoreLockedError, StoreError, StatscopeError: as :class:`RunWriter` (from the child).
    """

    def __init__(self, path: str, layout: Layout, **kwargs: Any):
        from statscope import storage

        self.path = os.fspath(path)
        self.closed = False
        self._failure: BaseException | None = None
        self._opened = False  # the child opened the run
        self._advice: dict[int, Advice] = {}
        self._awaiting = 0  # gathered blocks sent whose advice has not come back
        self._bad = 0
        ours, theirs = socket.socketpair()
        self._conn = Connection(ours.detach())
        fd = theirs.detach()
        _OUR_FDS.add(self._conn.fileno())
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from statscope.writer_child import "
                 "serve; serve(int(sys.argv[1]))", str(fd)],
                pass_fds=(fd,), env=env, stdin=subprocess.DEVNULL)
        except OSError as exc:
            self._conn.close()
            raise WriterStartError(f"path={self.path!r}: cannot start the writer process "
                                   f"({exc}); pass writer='thread'") from exc
        finally:
            os.close(fd)
        setup = {"parent": os.getpid(), "options": dict(storage._OPTIONS),
                 "fsspec": _fsspec_config()}
        try:
            self._send(("open", setup, self.path, layout, kwargs))
            _, self.layout, self.next_step, self.nonfinite = self._wait("ready")
        except BaseException:
            self._end()
            raise
        self._opened = True

    @property
    def pid(self) -> int:
        """The writer process's pid."""
        return self._proc.pid

    # -- what the writer thread calls ----------------------------------------------------------

    def append(self, steps: np.ndarray, count: np.ndarray, stats: Mapping[str, np.ndarray],
               scalars: Mapping[str, np.ndarray] | None = None) -> int:
        """As :meth:`RunWriter.append`; the rows reach the store in the child."""
        self._check()
        if len(steps) == 0:
            return 0
        bad = count_nonfinite(self.layout, np.asarray(count), stats)
        for s, n in bad.items():
            self.nonfinite[s] = self.nonfinite.get(s, 0) + n
        self._send(("append", steps, count, dict(stats), dict(scalars or {})))
        self.next_step = int(steps[-1]) + 1
        return sum(bad.values())

    def append_gathered(self, gathered: Gathered, column: Mapping[int, int]) -> None:
        """Have the child compute the rows of a gathered block and append them
        (:func:`statscope.rows.compute_rows`, :func:`statscope.rows.file_columns`); what it
        finds comes back through :meth:`take_filed`.

        Args:
            gathered: the block's host arrays.
            column: recorder probe index -> the layout's probe index, for every probe that ran.
        """
        self._check()
        if len(gathered.steps) == 0:
            return
        self._send(("gathered", gathered, column))
        self._awaiting += 1
        self.next_step = int(gathered.steps[-1]) + 1

    @property
    def awaiting_advice(self) -> bool:
        """Whether a gathered block's advice is still to come (the child reports it as soon as
        it computed the rows, before writing them): the writer thread then polls for it
        (:meth:`take_filed`) rather than waiting for the next block."""
        return self._awaiting > 0 and self._failure is None and not self.closed

    def take_filed(self) -> tuple[dict[int, Advice], int]:
        """What the child reported of the gathered blocks it filed since the last call: advice
        for the BatchNorm fast path per probe index, and the new non-finite values."""
        self._check()
        advice, bad = self._advice, self._bad
        self._advice, self._bad = {}, 0
        return advice, bad

    def amend_scalars(self, values) -> None:
        """As :meth:`RunWriter.amend_scalars`, in the child."""
        self._check()
        self._send(("amend", values))

    def add_probes(self, probes: Sequence[ProbeInfo], running0=None) -> None:
        """As :meth:`RunWriter.add_probes`; waits for the child's new layout."""
        self._check()
        if probes:
            self._send(("add", list(probes), running0))
            _, self.layout = self._wait("added")

    def set_attrs(self, **attrs: Any) -> None:
        self._check()
        self._send(("attrs", attrs))

    def heartbeat(self) -> None:
        """The child renews the lease itself; this reports an error it met meanwhile."""
        self._check()

    def flush_due(self) -> bool:
        return False  # the child flushes on its own clock: the writer thread never asks it to

    def flush(self) -> None:
        """As :meth:`RunWriter.flush`: returns once the child committed every row it was sent."""
        self._check()
        self._send(("flush",))
        self._wait("flushed")

    def close(self, status: str = S.STATUS_COMPLETED, error: str | None = None) -> None:
        """As :meth:`RunWriter.close`: the child writes what it holds, marks the run and ends."""
        if self.closed:
            return
        self.closed = True
        try:
            self._send(("close", status, error))
            self._wait("closed")
        finally:
            self._end()

    # -- the pipe ----------------------------------------------------------------------------

    def _send(self, msg) -> None:
        try:
            self._conn.send(msg)
        except (OSError, EOFError) as exc:
            raise self._died() from exc

    def _check(self) -> None:
        """Raise the error the child reported, if any (without waiting)."""
        if self._failure is not None:
            raise self._failure
        if self.closed:
            return  # close() read every reply
        try:
            while self._conn.poll():
                self._take(self._conn.recv())
        except (OSError, EOFError) as exc:
            raise self._died() from exc

    def _wait(self, kind: str):
        """The child's next reply of ``kind``; raises what the child reports or its death."""
        while True:
            try:
                if not self._conn.poll(_POLL):
                    if self._proc.poll() is not None:
                        raise self._died()
                    continue
                msg = self._conn.recv()
            except (OSError, EOFError) as exc:
                raise self._died() from exc
            self._take(msg)
            if msg[0] == kind:
                return msg

    def _take(self, msg) -> None:
        if msg[0] == "warn":  # where a RunWriter on this thread would have warned
            warnings.warn(msg[1], msg[2], stacklevel=2)
        elif msg[0] == "advice":
            self._advice.update(msg[1])
            self._awaiting -= 1
        elif msg[0] == "filed":
            self._bad += msg[1]
            self.nonfinite = msg[2]
        elif msg[0] == "error":
            self._failure = _rebuild(msg[1])
            raise self._failure

    def _died(self) -> StoreError:
        try:
            code = self._proc.wait(timeout=_POLL)
        except subprocess.TimeoutExpired:
            code = None
        how = f"was killed by signal {-code}" if code is not None and code < 0 else \
            f"ended (exit code {code})"
        if not self._opened:
            self._failure = WriterStartError(f"path={self.path!r}: the writer process (pid "
                                             f"{self._proc.pid}) {how} before it opened the run")
        elif self._failure is None:
            self._failure = StoreError(f"path={self.path!r}: the writer process (pid "
                                       f"{self._proc.pid}) {how}; rows it had not written are "
                                       "lost")
            self._mark_failed(str(self._failure))
        return self._failure

    def _mark_failed(self, error: str) -> None:
        """Mark the run of a writer process that died while it held it failed, as the child
        would have on its way out: its lease died with it (a local lock; an object store's
        lease stays until its heartbeat is stale, and the run with it reads ``running`` until
        a resume). Only a run still marked running, and nothing but the status attrs."""
        from statscope.lease import Lease
        from statscope.storage import zarr_store
        from statscope.writer_arrays import now_iso

        try:
            lease = Lease.acquire(self.path)
        except StatscopeError:
            return  # held by someone (a live lease of the child on an object store): leave it
        try:
            import zarr

            group = zarr.open_group(zarr_store(self.path, read_only=False), mode="r+",
                                    zarr_format=3)
            if group.attrs.get(S.ATTR_STATUS) == S.STATUS_RUNNING:
                group.update_attributes({S.ATTR_STATUS: S.STATUS_FAILED,
                                         S.ATTR_ENDED: now_iso(), S.ATTR_ERROR: error})
        except Exception as exc:  # the store itself is gone or damaged: the error says enough
            warnings.warn(f"statscope: path={self.path!r}: could not mark the run failed after "
                          f"its writer process died: {exc!r}", StatscopeWarning, stacklevel=3)
        finally:
            lease.release()

    def _end(self) -> None:
        _OUR_FDS.discard(self._conn.fileno())
        self._conn.close()
        try:
            self._proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def _fsspec_config() -> dict:
    fsspec = sys.modules.get("fsspec")
    return dict(fsspec.config.conf) if fsspec is not None else {}


def _rebuild(payload) -> BaseException:
    if isinstance(payload, BaseException):
        return payload
    name, text = payload
    return StoreError(f"{name}: {text}")
