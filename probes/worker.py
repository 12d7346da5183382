"""The writer thread: typed messages in, rows in the store out, notices back.

The training thread talks to the writer thread only through :class:`Worker.put` with the
messages below, and hears back through :attr:`Worker.notices` (warnings to emit on the training
thread, where ``warnings`` filters apply as the user set them) and :attr:`Worker.failure`. A put
never blocks on a dead or failed writer: it returns False and the message is dropped. After a
failure the thread keeps draining its queue until :class:`Close`, so the training thread never
waits on it. When no message comes for a while the thread hands itself the steps that ended
since the last block (``idle``), so rows reach the store within ``flush_seconds`` even while
training is idle.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from statscope import schema as S
from statscope.errors import NonFiniteWarning, StatscopeWarning
from statscope.probes.block import Block, gather_block
from statscope.probes.capture import Capture
from statscope.probes.neurons import choose_units
from statscope.probes.pool import BufferPool
from statscope.probes.statistics import Statistic, computes
from statscope.rows import BUILTIN, Advice, Gathered, compute_rows, file_columns
from statscope.probes.streams import StreamOrder
from statscope.store import ProbeInfo
from statscope.writer import RunWriter
from statscope.writer_process import WriterProcess

_ADVICE_POLL = 0.005  # seconds between the writer thread's looks for the writer process's advice

__all__ = ["Attrs", "Close", "Flush", "Notice", "Worker", "Filer", "ProbeStatic"]


@dataclass(frozen=True)
class Attrs:
    """Root attributes to set, in order with the data."""

    attrs: Mapping[str, Any]


@dataclass(frozen=True)
class Flush:
    """File the steps that ended (and one whose ``optimizer.step()`` ran), commit the store, then
    set ``done``: set also when the writer failed, before or during it."""

    done: threading.Event


@dataclass(frozen=True)
class Close:
    """Write what is left, set ``attrs``, mark the run ``status`` (with ``error``), stop."""

    status: str
    error: str | None
    attrs: Mapping[str, Any]


@dataclass(frozen=True)
class Notice:
    """A warning for the training thread to emit."""

    message: str
    category: type[Warning]


@dataclass(frozen=True)
class ProbeStatic:
    """What the store needs to know of a probe besides its channels, fixed before training.

    Attributes:
        info: the probe's record with ``channels=0`` until they are known.
        running0: (running_mean, running_var) at the start, ``"lazy"`` for buffers a lazy module
            creates at its first forward (zeros and ones), or None.
        neurons: which channels keep per-step columns (see :mod:`statscope.probes.neurons`).
    """

    info: ProbeInfo
    running0: Any
    neurons: Any = None

    def record(self, channels: int) -> ProbeInfo:
        """The probe's record once its channels are known."""
        units = choose_units(self.neurons, channels, self.info.name)
        return ProbeInfo(**{**self.info.to_json(), "channels": channels, "units": units})


class Filer:
    """Files blocks into the store: maps captures to columns, adds probes that join late.

    Owned by the writer thread.
    """

    def __init__(self, writer: RunWriter | WriterProcess, captures: Sequence[Capture],
                 static: Sequence[ProbeStatic], statistics: Sequence[Statistic], order: int,
                 pool: BufferPool, streams: StreamOrder):
        self.writer, self.captures, self.static = writer, captures, static
        self.statistics, self.order, self.pool, self.streams = statistics, order, pool, streams
        names = {p.name: i for i, p in enumerate(writer.layout.probes)}
        self.column = {i: names[s.info.name] for i, s in enumerate(static) if s.info.name in names}
        self.warned_nonfinite = False
        self.said_nonfinite: set[str] = set()  # scalar names said to be logged non-finite
        self.bad = 0  # non-finite values filed
        self.steps = 0  # steps filed
        self.ran: set[int] = set()  # probes with a value in a filed step
        self._computes = computes(s.name for s in statistics)
        # the writer process computes the rows itself when it knows every statistic (a user's
        # register_statistic lives in this process only)
        self.remote = isinstance(writer, WriterProcess) and set(self._computes) <= set(BUILTIN)

    def file(self, block: Block) -> list[Notice]:
        """Append ``block``'s rows that the store does not hold yet; return notices."""
        notices: list[Notice] = []
        # Rows an idle flush wrote already; their scalars went with it (see Recorder._take_idle).
        skip = min(block.n, max(0, -(-(self.writer.next_step - block.first_step) // block.stride)))
        try:
            self._amend(block, skip)
            if skip < block.n:
                self.streams.wait(block.ready)
                with self.streams.writer_context():
                    gathered = gather_block(block, self.captures, self.statistics, self.order,
                                            skip)
                notices.extend(self._nonfinite_scalars(block, gathered, skip))
                self._append(gathered)
        finally:
            if block.owned:
                for pair in block.buffers():
                    self.pool.give(pair)
        return self.settle(notices)

    def _amend(self, block: Block, skip: int) -> None:
        """File the scalars logged for rows an idle flush filed already: under the optimizer
        rule the last step is filed while training is idle after its ``optimizer.step()``, and
        what is logged after that (an evaluation's accuracy) still belongs to it."""
        late = {name: [(row, v) for row, v in values if row < skip]
                for name, values in block.scalars.items()}
        late = {name: pairs for name, pairs in late.items() if pairs}
        if not late:
            return
        self.streams.wait(block.ready)
        with self.streams.writer_context():
            values = {name: [(block.first_step + block.stride * row, float(v)) for row, v in pairs]
                      for name, pairs in late.items()}
        self.writer.amend_scalars(values)

    def _nonfinite_scalars(self, block: Block, gathered: Gathered, skip: int) -> list[Notice]:
        """A notice, once per name, that a logged scalar was NaN or infinite (a diverged loss):
        stored as it is, where NaN also marks the steps it was not logged at."""
        notices = []
        for name, values in block.scalars.items():
            if name in self.said_nonfinite:
                continue
            rows = np.array(sorted({row - skip for row, _ in values if row >= skip}), np.int64)
            if not len(rows):
                continue
            logged = gathered.scalars[name][rows]
            bad = ~np.isfinite(logged)
            if bad.any():
                self.said_nonfinite.add(name)
                first = int(np.argmax(bad))
                notices.append(Notice(
                    f"statscope: {name}={logged[first]} logged at step "
                    f"{int(gathered.steps[rows[first]])} ({int(bad.sum())} non-finite of the "
                    f"{len(rows)} logged in that block); stored as it is, but in the store NaN "
                    f"also marks the steps where {name} was not logged", NonFiniteWarning))
        return notices

    def _append(self, gathered: Gathered) -> None:
        self.steps += len(gathered.steps)
        self.ran.update(i for i, part in enumerate(gathered.parts) if part is not None)
        new = [i for i, part in enumerate(gathered.parts)
               if part is not None and i not in self.column]
        if new:
            self._add(new)
        if self.remote:  # the rows follow in the writer process
            self.writer.append_gathered(gathered, dict(self.column))
            return
        rows = compute_rows(gathered, self._computes)
        self._advise(rows.advice)
        steps, count, stats = file_columns(rows, self.column, self.writer.layout)
        self.bad += self.writer.append(steps, count, stats, rows.scalars)

    def awaiting_advice(self) -> bool:
        """Whether the writer process is computing the rows of a block filed here, whose
        advice for the BatchNorm fast path (:func:`statscope.rows.near_eps`) is to come."""
        return self.remote and self.writer.awaiting_advice  # type: ignore[union-attr]

    def settle(self, notices: list[Notice] | None = None) -> list[Notice]:
        """Take what the writer process reported of the blocks it filed (advice for the probes,
        non-finite values) and turn it into notices; also at close, after the last block."""
        notices = [] if notices is None else notices
        if self.remote:
            advice, bad = self.writer.take_filed()
            self._advise(advice)
            self.bad += bad
        if self.bad and not self.warned_nonfinite:
            self.warned_nonfinite = True
            notices.append(Notice(
                f"statscope: non-finite statistics recorded ({self.writer.nonfinite}); they are "
                "stored as they are and counted in the run's attrs", NonFiniteWarning))
        return notices

    def unrecorded(self) -> list[Notice]:
        """At the end of a run: that it recorded no step, or which probes never ran (a model
        left in eval mode, a layer the forward never calls), rather than NaN columns alone."""
        if not self.steps:
            return [Notice(
                "statscope: no training step was recorded: the model ran no forward in training "
                "mode with autograd on while recording (eval-mode forwards and forwards under "
                "torch.no_grad() are not recorded; record_eval=True records them)",
                StatscopeWarning)]
        never = [i for i in range(len(self.static)) if i not in self.ran]
        frozen = [i for i in never if self.captures[i].ran_eval]
        called = [i for i in never if not self.captures[i].ran_eval]
        notices = []
        if frozen:
            notices.append(Notice(
                f"statscope: {len(frozen)} of {len(self.static)} probed layers ran only in "
                f"eval mode in the {self.steps} recorded steps: {self._names(frozen)}; their "
                "columns hold NaN with count 0 (a frozen layer normalizes with its running "
                "statistics, not the batch's; record_eval=True records its input too)",
                StatscopeWarning))
        if called:
            notices.append(Notice(
                f"statscope: {len(called)} of {len(self.static)} probed layers never ran in the "
                f"{self.steps} recorded steps: {self._names(called)}; their columns hold NaN "
                "with count 0 (a module the forward does not call; layers= leaves it out)",
                StatscopeWarning))
        return notices

    def _names(self, probes: list[int]) -> str:
        names = [self.static[i].info.name for i in probes]
        return ", ".join(repr(n) for n in names[:8]) + (
            f" and {len(names) - 8} more" if len(names) > 8 else "")

    def _advise(self, advice: Mapping[int, Advice]) -> None:
        for i, (sum_mean, reduce) in advice.items():
            cap = self.captures[i]
            # taken at the next hand-over (Capture.take_block), not at whatever step this
            # reaches the training thread: the extra sum and BatchNorm's own mean differ in
            # their last bits, and two runs of one seed would differ where the switch fell
            cap.mean_advice = sum_mean
            cap.reduce_bn = reduce
            cap.advised = True

    def _add(self, new: list[int]) -> None:
        probes, mean, var = [], [], []
        for i in new:
            static, channels = self.static[i], self.captures[i].channels
            probes.append(static.record(channels))
            r0 = static.running0
            if r0 == "lazy":
                r0 = (np.zeros(channels, np.float32), np.ones(channels, np.float32))
            if r0 is None or len(r0[0]) != channels:
                r0 = (np.full(channels, np.nan, np.float32),) * 2
            mean.append(r0[0])
            var.append(r0[1])
        has_running = any(self.static[i].running0 is not None for i in new)
        running = {S.RUNNING_MEAN0: np.concatenate(mean), S.RUNNING_VAR0: np.concatenate(var)} \
            if has_running else None
        first = len(self.writer.layout.probes)
        self.writer.add_probes(probes, running)
        for offset, i in enumerate(new):
            self.column[i] = first + offset


class Worker:
    """The writer thread.

    Args:
        filer: files blocks (owned by this thread once started).
        idle: called on this thread after ``flush_seconds`` without a block; returns the steps
            that ended since the last block (or None).
        flush_seconds: the longest time a step that ended waits before reaching the store.
    """

    def __init__(self, filer: Filer, idle: Callable[[], Block | None], flush_seconds: float):
        self.filer = filer
        self._idle_take = idle
        self.flush_seconds = flush_seconds
        self._tick = min(1.0, max(0.01, flush_seconds / 4)) if flush_seconds < float("inf") \
            else 1.0
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.notices: collections.deque[Notice] = collections.deque()
        self.failure: BaseException | None = None
        self.last_block = self._last_idle = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="statscope-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def put(self, msg, force: bool = False) -> bool:
        """Queue ``msg``; False (msg dropped) when the writer failed (unless ``force``: a failed
        writer still takes :class:`Close`) or its thread is gone. Never hangs on a dead writer;
        waits while a live one is two blocks behind."""
        while (force or self.failure is None) and self._thread.is_alive():
            try:
                self.queue.put(msg, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; False when it still runs after ``timeout``."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        with np.errstate(all="ignore"):
            while True:
                # While the writer process computes a block's rows, poll for their advice: a
                # BatchNorm probe near eps then reduces its input from the next few steps on,
                # not from the block after the next
                awaiting = self.failure is None and self.filer.awaiting_advice()
                try:
                    msg = self.queue.get(timeout=_ADVICE_POLL if awaiting else self._tick)
                except queue.Empty:
                    if not awaiting or time.monotonic() - self._last_idle >= self._tick:
                        self._last_idle = time.monotonic()
                        self._safely(self._on_idle)
                    else:
                        self._safely(lambda: self.notices.extend(self.filer.settle()))
                    continue
                if isinstance(msg, Close):
                    self._close(msg)
                    return
                if isinstance(msg, Flush):
                    if self.failure is None:
                        self._safely(self._flush)
                    msg.done.set()
                    continue
                if self.failure is not None:
                    if isinstance(msg, Block) and msg.owned:
                        for pair in msg.buffers():
                            self.filer.pool.give(pair)
                    continue
                self._safely(lambda: self._handle(msg))

    def _handle(self, msg) -> None:
        if isinstance(msg, Block):
            self.last_block = time.monotonic()
            self.notices.extend(self.filer.file(msg))
        elif isinstance(msg, Attrs):
            self.filer.writer.set_attrs(**msg.attrs)
        else:
            raise TypeError(f"writer thread: unknown message {msg!r}")

    def _on_idle(self) -> None:
        writer = self.filer.writer
        writer.heartbeat()
        now = time.monotonic()
        if now - self.last_block >= self.flush_seconds and self.queue.empty():
            self.last_block = now
            self._file_idle()
        if writer.flush_due():
            writer.flush()
        self.notices.extend(self.filer.settle())

    def _flush(self) -> None:
        if self._file_idle():
            self.last_block = time.monotonic()
        self.filer.writer.flush()
        self.notices.extend(self.filer.settle())

    def _file_idle(self) -> bool:
        """File the steps that ended since the last block, read in place; whether there were."""
        block = self._idle_take()
        if block is not None:
            self.notices.extend(self.filer.file(block))
        return block is not None

    def _safely(self, fn) -> None:
        try:
            fn()
        except BaseException as exc:  # the training thread warns at its next put, close raises
            self.failure = exc

    def _close(self, msg: Close) -> None:
        writer = self.filer.writer
        status, error = msg.status, msg.error
        if self.failure is not None:
            status = S.STATUS_FAILED
            error = error or f"writer: {self.failure!r}"
        try:
            if msg.attrs:
                writer.set_attrs(**msg.attrs)
        except BaseException as exc:
            self.failure = self.failure or exc
            status, error = S.STATUS_FAILED, error or f"writer: {exc!r}"
        try:
            writer.close(status, error)
            self.notices.extend(self.filer.settle())
        except BaseException as exc:
            self.failure = self.failure or exc
        if status == S.STATUS_COMPLETED and self.failure is None:
            self.notices.extend(self.filer.unrecorded())
