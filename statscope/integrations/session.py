"""One training run's recorder, shared by the Lightning and Hugging Face callbacks.

The callbacks translate their trainer's events into four calls: :meth:`RecordingSession.start`
when training begins, :meth:`~RecordingSession.log` for scalars, :meth:`~RecordingSession.end_step`
after each optimizer step, and :meth:`~RecordingSession.close` when training ends or fails.
The recorder counts steps by hand (``step="manual"``), so a step is an optimizer step whatever
the gradient accumulation: the first micro-batch's forward of each step is what gets recorded.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any, Mapping

from statscope.errors import StatscopeError

__all__ = ["LiveExport", "RecordingSession", "check_record_kwargs", "loggable"]


@dataclass(frozen=True)
class LiveExport:
    """Export the run while it trains (off unless given to a callback).

    Every ``every`` optimizer steps the callback writes the windows and scalars the store has
    committed since its last export; a last export follows the end of training. Under
    ``torch.distributed`` with several ranks each rank writes ``target/rank{r}``.

    Args:
        target: where to write (TensorBoard: a log folder).
        every: optimizer steps between exports (each costs one read of the store's new rows).
        window: steps per fluctuation window.
        to: the format, a key of :data:`statscope.export.SINKS`.

    Example:
        >>> LiveExport("tb/statscope", every=1000)
        LiveExport(target='tb/statscope', every=1000, window=200, to='tensorboard')
    """

    target: str
    every: int = 500
    window: int = 200
    to: str = "tensorboard"

    def __post_init__(self):
        for name, least in (("every", 1), ("window", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise StatscopeError(f"LiveExport({name}={value!r}): expected an int of at least "
                                     f"{least}")
        object.__setattr__(self, "target", os.fspath(self.target))
        from statscope.export.sinks import SINKS

        if self.to not in SINKS:
            raise StatscopeError(f"LiveExport(to={self.to!r}): expected one of {', '.join(SINKS)}")


def check_record_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments a callback passes on to :func:`statscope.record`, checked now.

    Raises:
        StatscopeError: ``step`` is given: the callbacks end each step after the optimizer step.
    """
    if "step" in kwargs:
        raise StatscopeError(f"step={kwargs['step']!r}: the callbacks end a step after each "
                             "optimizer step themselves (step='manual'); leave step out")
    return dict(kwargs)


def loggable(values: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a trainer's log dict under names a run can store.

    Non-identifier characters become ``_``; names statscope reserves (``count``, ``step``, the
    statistics) and non-numbers are left out.

    Example:
        >>> loggable({"loss": 0.5, "train/lr": 1e-3, "step": 3, "note": "x", "done": True})
        {'loss': 0.5, 'train_lr': 0.001}
    """
    import re

    from statscope import schema as S

    out = {}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = re.sub(r"\W", "_", str(name))
        if name[:1].isdigit():
            name = "_" + name
        if name and name not in S.RESERVED_NAMES:
            out[name] = float(value)
    return out


def _abandoned(recorder, sink) -> None:
    """Mark a run failed whose training never reported its end (an exception the trainer's
    callbacks are not told about, or a process exiting mid-training)."""
    recorder.close("training stopped without reporting its end (an exception in the training "
                   "loop, or the process exited)")
    if sink is not None:
        sink.close()


class RecordingSession:
    """A recorder on ``model`` for one training run, with an optional live export.

    Args:
        model: the module to record (the trainer's model; DDP wrappers are looked through).
        path: the run store; under ``torch.distributed`` each rank writes ``path/rank{r}``.
        record_kwargs: more arguments of :func:`statscope.record` (layers, stats, ...).
        meta: run metadata (the trainer's hyperparameters and settings).
        live: live export settings, or None.
        offset: added to the steps of the live export: the trainer's global step of store step 0.
    """

    def __init__(self, model, path, record_kwargs: Mapping[str, Any], meta: Mapping[str, Any],
                 live: LiveExport | None, offset: int):
        import statscope

        self.recorder = statscope.record(model, path, step="manual", meta=dict(meta),
                                         **record_kwargs)
        self.live = live
        self.offset = offset
        self.steps = 0
        self._sink = None
        self._exporter = None
        self.recorder.start()
        if live is not None:
            self._start_live(live)
        self._finalizer = weakref.finalize(self, _abandoned, self.recorder, self._sink)

    def _start_live(self, live: LiveExport) -> None:
        import torch.distributed as dist

        from statscope.export import Exporter, open_sink

        target = live.target
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            target = os.path.join(target, f"rank{dist.get_rank()}")
        self._sink = open_sink(live.to, target)
        self._exporter = Exporter(self.recorder.path, self._sink, window=live.window,
                                  offset=self.offset)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return not self._finalizer.alive

    def log(self, **scalars: Any) -> None:
        """Log scalars (numbers or one-element tensors, no host sync) into the current step."""
        self.recorder.log(**scalars)

    def end_step(self) -> None:
        """End the current optimizer step; export live every ``live.every`` steps."""
        self.recorder.step()
        self.steps += 1
        if self._exporter is not None and self.steps % self.live.every == 0:
            self._exporter.update()

    def close(self, error: str | None = None) -> None:
        """Close the recorder (run ``completed``, or ``failed`` with ``error``) and finish the
        live export with what the store holds. Idempotent."""
        if self.closed:
            return
        self._finalizer.detach()
        try:
            self.recorder.close(error)
            if self._exporter is not None:
                self._exporter.update()
        finally:
            if self._sink is not None:
                self._sink.close()
