"""Where summaries go: writers by name, each loaded only when used.

A sink takes :class:`~statscope.export.summaries.Scalar` and
:class:`~statscope.export.summaries.Histogram` items and writes them in the format of a tool
people already watch training in. Every sink has ``write(items)``, ``layout(layers)`` (once,
when the run's layers are known), ``flush()`` and ``close()``.
"""

from __future__ import annotations

import os
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

    Its event files end in :data:`SUFFIX`, and opening it removes those of an earlier export
    into the same folder: every export writes the run from its first window, and TensorBoard
    shows the points of every event file in a folder, so a second export (after the run grew)
    drew each window twice. Other event files there (the trainer's own) are left alone.

    Args:
        log_dir: folder for the event files (created if missing); point ``tensorboard --logdir``
            at it or at a folder above it.

    Raises:
        StatscopeError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: str | os.PathLike):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch raises ImportError naming the missing tensorboard
            raise StatscopeError(f"--to tensorboard {os.fspath(log_dir)!r}: needs the tensorboard "
                                 f"package ({exc}); pip install 'statscope[tensorboard]'") from None
        self.log_dir = os.fspath(log_dir)
        if os.path.isdir(self.log_dir):
            for name in os.listdir(self.log_dir):
                if name.startswith("events.out.tfevents.") and name.endswith(SUFFIX):
                    os.remove(os.path.join(self.log_dir, name))
        self._writer = SummaryWriter(log_dir=self.log_dir, filename_suffix=SUFFIX)

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
        """Flush and close the event file."""
        self._writer.close()


SINKS = {"tensorboard": TensorBoardSink}
"""Sink classes by the name ``statscope export --to NAME`` takes."""


def open_sink(kind: str, target: str | os.PathLike):
    """A sink of ``kind`` (a key of :data:`SINKS`) writing to ``target``.

    Raises:
        StatscopeError: unknown ``kind``, or its package is missing.
    """
    if kind not in SINKS:
        raise StatscopeError(f"--to {kind!r}: unknown export format; expected one of "
                             f"{', '.join(SINKS)}")
    return SINKS[kind](target)
