"""Where summaries go: writers by name, each loaded only when used.

A sink takes :class:`~statscope.export.summaries.Scalar` and
:class:`~statscope.export.summaries.Histogram` items and writes them in the format of a tool
people already watch training in. Every sink has ``write(items)``, ``layout(layers)`` (once,
when the run's layers are known), ``flush()``, ``close()``, ``discard()`` (close and leave
the target as it was, for an export that failed) and ``restart()`` (drop what it wrote and
begin again, for a run whose rows changed under a live export), and takes ``staged=``: a
staged sink shows nothing in its target until ``close()``.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import IO, Iterable

import numpy as np

from statscope.errors import StatscopeError
from statscope.export.summaries import Histogram, Scalar, custom_layout

__all__ = ["TensorBoardSink", "SINKS", "SUFFIX", "open_sink", "bucket_edges"]

SUFFIX = ".statscope"
"""The end of the name of the event files statscope's exports write."""

_PART = ".statscope-export."
"""Start of the name of a staged event file while it is written: no ``tfevents`` in it, so that
TensorBoard, which reads every file whose name holds ``tfevents`` in every folder below its
``--logdir``, never shows a partial export."""

_FIRST_EDGE, _GROWTH, _DEFAULT_TOP = 1e-12, 1.1, 1e20


def bucket_edges(values: np.ndarray) -> np.ndarray:
    """Histogram bucket edges for ``values`` ((n,) finite): TensorBoard's own (0 and
    ±1e-12·1.1^k below 1e20), continued up to the largest ``|value|`` beyond that, so that
    every value lands in a bucket (TensorBoard's edges drop larger ones, and a histogram of
    only such values cannot be written at all).

    Returns:
        (m,) float64, increasing, from -max|values| or less to max|values| or more.

    Example:
        >>> edges = bucket_edges(np.array([3e25, -1.0]))
        >>> bool(edges[0] <= -3e25 and edges[-1] >= 3e25), bool(np.all(np.diff(edges) > 0))
        (True, True)
    """
    top = float(np.max(np.abs(values))) if values.size else 0.0
    n = int(np.ceil((np.log(max(top, _DEFAULT_TOP)) - np.log(_FIRST_EDGE)) / np.log(_GROWTH))) + 1
    with np.errstate(over="ignore"):
        pos = _FIRST_EDGE * np.power(_GROWTH, np.arange(n, dtype=np.float64))
    pos = pos[pos < max(top, _DEFAULT_TOP)]
    if top >= _DEFAULT_TOP:
        pos = np.append(pos, top)  # numpy's last bucket is closed: it holds the largest value
    return np.concatenate([-pos[::-1], [0.0], pos])


class TensorBoardSink:
    """Writes a TensorBoard event file into ``log_dir``.

    Scalars become scalar summaries, histograms histogram summaries (buckets that hold every
    value: :func:`bucket_edges`), and :meth:`layout` adds a custom-scalars layout (BN beside
    EN, mean beside std, per layer). Needs the ``tensorboard`` package
    (``pip install 'statscope[tensorboard]'``).

    Its event files end in :data:`SUFFIX`, and an export replaces those of an earlier export
    into the same folder: every export writes the run from its first window, and TensorBoard
    shows the points of every event file in a folder, so a second export (after the run grew)
    drew each window twice. Other event files there (the trainer's own) are left alone.

    Unstaged (the live export), the event file is written in ``log_dir`` as summaries come and
    the earlier export's files are removed when the sink opens. Staged (``statscope export``),
    it is written in ``log_dir`` under a name TensorBoard does not read (``.statscope-export.*``)
    and renamed by :meth:`close`, which only then removes the earlier export's files: an export
    that fails leaves ``log_dir`` as it was; one that is killed leaves at most that hidden file,
    which the next export into the folder removes, and never a partial event file.

    Args:
        log_dir: folder for the event files (created if missing); point ``tensorboard --logdir``
            at it or at a folder above it.
        staged: write where TensorBoard does not look until :meth:`close`.

    Raises:
        StatscopeError: the ``tensorboard`` package is not installed, or ``log_dir`` cannot be
            written (naming it and why).
    """

    def __init__(self, log_dir: str | os.PathLike, *, staged: bool = False):
        try:
            from tensorboard.compat.proto import event_pb2  # noqa: F401
            from torch.utils.tensorboard import summary  # noqa: F401
        except ImportError as exc:  # torch raises ImportError naming the missing tensorboard
            raise StatscopeError(f"--to tensorboard {os.fspath(log_dir)!r}: needs the tensorboard "
                                 f"package ({exc}); pip install 'statscope[tensorboard]'") from None
        self.log_dir = os.fspath(log_dir)
        if not self.log_dir:
            raise StatscopeError("--to tensorboard '': expected a folder")
        self.staged = staged
        self._file: IO[bytes] | None = None
        self._created = not os.path.isdir(self.log_dir)
        try:
            os.makedirs(self.log_dir, exist_ok=True)
            self._remove_stale_parts()
            if not staged:
                self._remove_earlier()
            self._open()
        except OSError as exc:
            self._drop_created()
            raise self._error(exc) from None

    def _open(self) -> None:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        # the name TensorBoard's own writer gives, unique per process and file
        self.name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                     f"{os.getpid()}.{uuid.uuid4().hex[:8]}{SUFFIX}")
        self._part = (f"{_PART}{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
                      if self.staged else None)
        self.path = os.path.join(self.log_dir, self._part or self.name)
        self._file = open(self.path, "wb")
        self._records = RecordWriter(self._file)
        self._event(event_pb2.Event(file_version="brain.Event:2"))

    def _event(self, event) -> None:
        event.wall_time = time.time()
        self._records.write(event.SerializeToString())

    def _summary(self, summary, step: int | None = None) -> None:
        from tensorboard.compat.proto import event_pb2

        event = event_pb2.Event(summary=summary)
        if step is not None:
            event.step = int(step)
        self._event(event)

    def write(self, items: Iterable[Scalar | Histogram]) -> None:
        """Write scalars and histograms (in the order given)."""
        from torch.utils.tensorboard.summary import histogram, scalar

        for item in items:
            if isinstance(item, Histogram):
                values = np.asarray(item.values, np.float64)
                self._summary(histogram(item.tag, values, bucket_edges(values)), item.step)
            else:
                self._summary(scalar(item.tag, item.value), item.step)

    def layout(self, layers: list[str]) -> None:
        """Add the custom-scalars layout for ``layers`` (see :func:`custom_layout`)."""
        from torch.utils.tensorboard.summary import custom_scalars

        self._summary(custom_scalars(custom_layout(layers)))

    def flush(self) -> None:
        """Write what is buffered to disk."""
        assert self._file is not None, "the sink is closed"
        self._file.flush()

    def restart(self) -> None:
        """Remove what this sink wrote and begin a new event file."""
        assert self._file is not None, "the sink is closed"
        self._file.close()
        os.remove(self.path)
        self._open()

    def close(self) -> None:
        """Flush and close the event file; a staged sink then gives it its event-file name and
        removes the earlier export's event files in ``log_dir``."""
        if self._file is None or self._file.closed:
            return
        self._file.close()
        if not self.staged:
            return
        try:
            os.replace(self.path, os.path.join(self.log_dir, self.name))
        except OSError as exc:
            self._remove_part()
            raise self._error(exc) from None
        self._remove_earlier(keep=self.name)

    def discard(self) -> None:
        """Close without publishing: a staged sink removes what it wrote and leaves ``log_dir``
        as it was; an unstaged one keeps what it has written."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self.staged:
            self._remove_part()
            self._drop_created()

    def _remove_part(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def _drop_created(self) -> None:
        if self._created:
            try:
                os.rmdir(self.log_dir)  # only if still empty
            except OSError:
                pass

    def _error(self, exc: OSError) -> StatscopeError:
        return StatscopeError(f"--to tensorboard {self.log_dir!r}: cannot write there "
                              f"({exc.strerror or exc}"
                              + (f": {exc.filename!r}" if exc.filename else "") + ")")

    def _remove_earlier(self, keep: str | None = None) -> None:
        """Remove the event files of an earlier export into ``log_dir``."""
        for name in os.listdir(self.log_dir):
            if name.startswith("events.out.tfevents.") and name.endswith(SUFFIX) and name != keep:
                os.remove(os.path.join(self.log_dir, name))

    def _remove_stale_parts(self) -> None:
        """Remove the staged files of exports into ``log_dir`` that were killed (their process
        on this host is gone)."""
        from statscope.lease import pid_alive  # the lease's own test of a writer's life

        host = socket.gethostname()
        for name in os.listdir(self.log_dir):
            if not name.startswith(_PART):
                continue
            parts = name[len(_PART):].rsplit(".", 2)
            if len(parts) == 3 and parts[0] == host and parts[1].isdigit() \
                    and not pid_alive(int(parts[1])):
                try:
                    os.remove(os.path.join(self.log_dir, name))
                except FileNotFoundError:
                    pass


SINKS = {"tensorboard": TensorBoardSink}
"""Sink classes by the name ``statscope export --to NAME`` takes."""


def open_sink(kind: str, target: str | os.PathLike, *, staged: bool = False):
    """A sink of ``kind`` (a key of :data:`SINKS`) writing to ``target``; ``staged``: shown
    there only once closed (see :class:`TensorBoardSink`).

    Raises:
        StatscopeError: unknown ``kind``, its package is missing, or ``target`` cannot be
            written.
    """
    if kind not in SINKS:
        raise StatscopeError(f"--to {kind!r}: unknown export format; expected one of "
                             f"{', '.join(SINKS)}")
    return SINKS[kind](target, staged=staged)
