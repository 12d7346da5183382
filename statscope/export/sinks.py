"""Where summaries go: writers by name, each loaded only when used.

A sink takes :class:`~statscope.export.summaries.Scalar` and
:class:`~statscope.export.summaries.Histogram` items and writes them in the format of a tool
people already watch training in. Every sink has ``write(items)``, ``layout(layers)`` (once,
when the run's layers are known), ``flush()``, ``close()`` and ``discard()`` (close and leave
the target as it was, for an export that failed), and takes ``staged=``: a staged sink shows
nothing in its target until ``close()``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable

from statscope.errors import StatscopeError
from statscope.export.summaries import Histogram, Scalar, custom_layout

__all__ = ["TensorBoardSink", "SINKS", "SUFFIX", "open_sink"]

SUFFIX = ".statscope"
"""The end of the name of the event files statscope's exports write."""


class TensorBoardSink:
    """Writes TensorBoard event files into ``log_dir`` with ``torch.utils.tensorboard``.

    Scalars become scalar summaries, histograms histogram summaries, and :meth:`layout` adds a
    custom-scalars layout (BN beside EN, mean beside std, per layer). Needs the ``tensorboard``
    package (``pip install 'statscope[tensorboard]'``).

    Its event files end in :data:`SUFFIX`, and an export replaces those of an earlier export
    into the same folder: every export writes the run from its first window, and TensorBoard
    shows the points of every event file in a folder, so a second export (after the run grew)
    drew each window twice. Other event files there (the trainer's own) are left alone.

    Unstaged (the live export), the event file is written in ``log_dir`` as summaries come and
    the earlier export's files are removed when the sink opens. Staged (``statscope export``),
    the event file is written in a hidden folder beside ``log_dir`` and moved into it by
    :meth:`close`, which only then removes the earlier export's files: an export that fails, or
    is killed, leaves ``log_dir`` as it was, never a partial event file.

    Args:
        log_dir: folder for the event files (created if missing); point ``tensorboard --logdir``
            at it or at a folder above it.
        staged: write where TensorBoard does not look until :meth:`close`.

    Raises:
        StatscopeError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: str | os.PathLike, *, staged: bool = False):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch raises ImportError naming the missing tensorboard
            raise StatscopeError(f"--to tensorboard {os.fspath(log_dir)!r}: needs the tensorboard "
                                 f"package ({exc}); pip install 'statscope[tensorboard]'") from None
        self.log_dir = os.fspath(log_dir)
        self._stage = None
        if staged:
            # beside log_dir, so that close() moves the file with a rename on one file system
            parent = os.path.dirname(os.path.abspath(self.log_dir))
            os.makedirs(parent, exist_ok=True)
            self._stage = tempfile.mkdtemp(prefix=".statscope-export-", dir=parent)
        else:
            self._remove_earlier()
        self._writer = SummaryWriter(log_dir=self._stage or self.log_dir, filename_suffix=SUFFIX)

    def write(self, items: Iterable[Scalar | Histogram]) -> None:
        """Write scalars and histograms (in the order given)."""
        w = self._writer
        for item in items:
            if isinstance(item, Histogram):
                w.add_histogram(item.tag, item.values, item.step)
            else:
                w.add_scalar(item.tag, item.value, item.step)

    def layout(self, layers: list[str]) -> None:
        """Add the custom-scalars layout for ``layers`` (see :func:`custom_layout`)."""
        self._writer.add_custom_scalars(custom_layout(layers))

    def flush(self) -> None:
        """Write what is buffered to disk."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file; a staged sink then replaces the earlier export's
        event files in ``log_dir`` with its own."""
        self._writer.close()
        if self._stage is None:
            return
        try:
            os.makedirs(self.log_dir, exist_ok=True)
            self._remove_earlier()
            for name in os.listdir(self._stage):
                os.replace(os.path.join(self._stage, name), os.path.join(self.log_dir, name))
        finally:
            self._drop_stage()

    def discard(self) -> None:
        """Close without publishing: a staged sink removes what it wrote and leaves ``log_dir``
        as it was; an unstaged one keeps what it has written."""
        self._writer.close()
        self._drop_stage()

    def _drop_stage(self) -> None:
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
            self._stage = None

    def _remove_earlier(self) -> None:
        """Remove the event files of an earlier export into ``log_dir``."""
        if os.path.isdir(self.log_dir):
            for name in os.listdir(self.log_dir):
                if name.startswith("events.out.tfevents.") and name.endswith(SUFFIX):
                    os.remove(os.path.join(self.log_dir, name))


SINKS = {"tensorboard": TensorBoardSink}
"""Sink classes by the name ``statscope export --to NAME`` takes."""


def open_sink(kind: str, target: str | os.PathLike, *, staged: bool = False):
    """A sink of ``kind`` (a key of :data:`SINKS`) writing to ``target``; ``staged``: shown
    there only once closed (see :class:`TensorBoardSink`).

    Raises:
        StatscopeError: unknown ``kind``, or its package is missing.
    """
    if kind not in SINKS:
        raise StatscopeError(f"--to {kind!r}: unknown export format; expected one of "
                             f"{', '.join(SINKS)}")
    return SINKS[kind](target, staged=staged)
