"""One training run's recorder, shared by the Lightning and Hugging Face callbacks.

The callbacks translate their trainer's events into four calls: :meth:`RecordingSession.start`
when training begins, :meth:`~RecordingSession.log` for scalars, :meth:`~RecordingSession.end_step`
after each optimizer step, and :meth:`~RecordingSession.close` when training ends or fails.
The recorder counts steps by hand (``step="manual"``), so a step is an optimizer step whatever
the gradient accumulation: the first micro-batch's forward of each step is what gets recorded.
"""

from __future__ import annotations

import os
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from statscope.errors import StatscopeError, StatscopeWarning

if TYPE_CHECKING:  # loaded with the live export only
    from statscope.export import Exporter

__all__ = ["ATTR_BEFORE_TRAINING", "LiveExport", "RecordingSession", "check_callback_args",
           "check_record_kwargs", "loggable"]


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


def check_callback_args(path: Any, meta: Any, live: Any) -> tuple[str, dict[str, Any]]:
    """The ``path`` and ``meta`` a callback was given, as a str and a dict, checked now with
    its ``live`` (not when training begins, inside the trainer).

    Raises:
        StatscopeError: ``path`` is not a str or path, ``meta`` not a mapping (or None),
            ``live`` not a :class:`LiveExport` (or None).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise StatscopeError(f"path={path!r}: expected a folder or URL (a str or os.PathLike)")
    if meta is not None and not isinstance(meta, Mapping):
        raise StatscopeError(f"meta={meta!r}: expected a mapping of names to values, e.g. "
                             "{'seed': 0}, or None")
    if live is not None and not isinstance(live, LiveExport):
        raise StatscopeError(f"live={live!r}: expected a statscope.integrations.LiveExport, "
                             "e.g. LiveExport('tb/statscope', every=500), or None")
    return os.fspath(path), dict(meta or {})


ATTR_BEFORE_TRAINING = "scalars_before_training"
"""The run attribute that holds what a trainer logged before its first optimizer step."""


def loggable(values: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a trainer's log dict under names a run can store.

    Numbers are Python or numpy scalars and one-element tensors (read to the host: a trainer
    logs at its logging steps only); booleans, strings and larger tensors are left out, as are
    names statscope reserves (``count``, ``step``, the statistics). A character no identifier
    may hold becomes ``_``, a leading digit gets a ``_`` before it.

    Example:
        >>> loggable({"loss": 0.5, "train/lr": 1e-3, "step": 3, "note": "x", "done": True})
        {'loss': 0.5, 'train_lr': 0.001}
    """
    from statscope import schema as S

    out = {}
    for name, value in values.items():
        value = _number(value)
        if value is None:
            continue
        name = "".join(c if ("a" + c).isidentifier() else "_" for c in str(name))
        if name[:1].isdigit():
            name = "_" + name
        if name and name not in S.RESERVED_NAMES:
            out[name] = value
    return out


def _number(value: Any) -> float | None:
    """``value`` as a float where it is one number (not a boolean), else None."""
    import numbers
    import sys

    import numpy as np

    torch = sys.modules.get("torch")  # a tensor exists only where torch is loaded already
    if torch is not None and isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value.detach().reshape(()).item())
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _abandoned(recorder, sinks: list) -> None:
    """Mark a run failed whose training never reported its end (an exception the trainer's
    callbacks are not told about, or a process exiting mid-training)."""
    recorder.close("training stopped without reporting its end (an exception in the training "
                   "loop, or the process exited)")
    for sink in sinks:
        sink.close()


def _stored_offset(path: str) -> int | None:
    """The ``trainer_step_offset`` of the run at ``path`` (this rank's store), None where there
    is no run or no offset yet."""
    from statscope.discovery import read_attrs
    from statscope.errors import StoreError
    from statscope.export.exporter import ATTR_STEP_OFFSET
    from statscope.probes.placement import rank_path

    try:
        offset = read_attrs(rank_path(path)[0]).get(ATTR_STEP_OFFSET)
    except StoreError:
        return None
    if isinstance(offset, bool) or not isinstance(offset, int):
        return None
    return offset


def _resume_at(offset: int | None, trainer_step: int) -> int | bool:
    """What ``resume=True`` means for a trainer resumed from its checkpoint at ``trainer_step``:
    the store step it maps to by the run's ``trainer_step_offset`` (``resume=STEP``), so that a
    store that ran past the checkpoint (a crash after it) has the steps the trainer replays
    replaced, not appended as new ones; True where the store has no offset yet (or none)."""
    if offset is None or trainer_step < offset:
        return True
    return trainer_step - offset


class RecordingSession:
    """A recorder on ``model`` for one training run, with an optional live export.

    Args:
        model: the module to record (the trainer's model; DDP wrappers are looked through).
        path: the run store; under ``torch.distributed`` each rank writes ``path/rank{r}``.
        record_kwargs: more arguments of :func:`statscope.record` (layers, stats, ...).
        meta: run metadata (the trainer's hyperparameters and settings).
        live: live export settings, or None.
        trainer_step: the step at which the trainer's loggers write the step about to begin
            (Lightning: ``global_step``; Hugging Face: ``global_step + 1``). Stored as the run's
            ``trainer_step_offset`` so that exports line up with the trainer's curves.
        store_step: the store step the trainer's checkpoint goes on at, as the callback saved
            it there; None where the checkpoint has none (or training starts afresh). With
            ``resume=True`` it says where a run written by a callback goes on, instead of
            ``trainer_step`` by the run's offset (which maps steps only while each store step
            is one trainer step).
    """

    def __init__(self, model, path, record_kwargs: Mapping[str, Any], meta: Mapping[str, Any],
                 live: LiveExport | None, trainer_step: int, store_step: int | None = None):
        import statscope

        # a run that goes on keeps its offset: where several optimizers step in one store step
        # (a manual Lightning module's), trainer_step - store step is not it
        stored = None if record_kwargs.get("resume", False) is False \
            else _stored_offset(os.fspath(path))
        if record_kwargs.get("resume") is True:
            at = _resume_at(stored, int(trainer_step)) if store_step is None or stored is None \
                else int(store_step)
            record_kwargs = {**record_kwargs, "resume": at}
        self.recorder = statscope.record(model, path, step="manual", meta=dict(meta),
                                         **record_kwargs)
        self.live = live
        self.steps = 0
        self._sinks: list = []
        self._before: dict[str, Any] = {}  # what the trainer logged before its first step
        self._exporter: Exporter | None = None
        self.recorder.start()
        self._finalizer = weakref.finalize(self, _abandoned, self.recorder, self._sinks)
        self.offset = int(trainer_step) - self.recorder.current_step if stored is None \
            else stored
        if live is not None:
            try:
                self._start_live(live)
            except BaseException as exc:
                self.close(f"live export: {exc}")
                raise

    def _start_live(self, live: LiveExport) -> None:
        import torch.distributed as dist

        from statscope.export import Exporter, open_sink

        target = live.target
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            target = os.path.join(target, f"rank{dist.get_rank()}")
        sink = open_sink(live.to, target)
        self._sinks.append(sink)
        self._exporter = Exporter(self.recorder.path, sink, window=live.window,
                                  offset=self.offset)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return not self._finalizer.alive

    def log(self, **scalars: Any) -> None:
        """Log scalars (numbers or one-element tensors, no host sync) into the current step."""
        self.recorder.log(**scalars)

    def log_before_training(self, trainer_step: int, scalars: Mapping[str, float]) -> None:
        """Keep scalars logged before the first optimizer step of this training (an evaluation
        at its start), which no store step describes, in the run's attrs:
        ``scalars_before_training = {"trainer_step": S, name: value, ...}`` (a name logged
        twice keeps the last value)."""
        self._before.update(scalars, trainer_step=trainer_step)
        self.recorder.set_attrs(**{ATTR_BEFORE_TRAINING: dict(self._before)})

    def flush(self) -> bool:
        """Commit every step that ended (:meth:`statscope.Recorder.flush`): before the trainer
        saves a checkpoint, so that a run resumed from it finds the steps before it stored."""
        return self.recorder.flush()

    def end_step(self) -> None:
        """End the current optimizer step; export live every ``live.every`` steps."""
        self.recorder.step()
        self.steps += 1
        if self.steps == 1:
            self._mark_offset()
        if self._exporter is not None and self.live is not None \
                and self.steps % self.live.every == 0:
            self._update_live()

    def _mark_offset(self) -> None:
        """Store ``trainer_step_offset`` in the run: after its first step, not at start (the
        store may wait for lazy layers' first forward to know them), or at close where no step
        ended (a run of one optimizer step, or one that failed in its first)."""
        from statscope.export.exporter import ATTR_STEP_OFFSET

        self.recorder.set_attrs(**{ATTR_STEP_OFFSET: self.offset})

    def _update_live(self) -> None:
        """Bring the live export up to the store. A failure of the export (a full disk, a
        target removed) never stops training or the recording: it is said once, as a warning
        naming the target, and the live export stops there."""
        assert self._exporter is not None and self.live is not None
        try:
            self._exporter.update()
        except Exception as exc:  # noqa: BLE001 - any failure of an optional side output
            self._exporter = None
            warnings.warn(f"statscope: LiveExport(to={self.live.to!r}, "
                          f"target={self.live.target!r}): the live export stopped ({exc}); the "
                          "run goes on recording, export it later with statscope export",
                          StatscopeWarning, stacklevel=3)

    def close(self, error: str | None = None) -> None:
        """Close the recorder (run ``completed``, or ``failed`` with ``error``) and finish the
        live export with what the store holds. Idempotent."""
        if self.closed:
            return
        self._finalizer.detach()
        try:
            try:
                if self.steps == 0:
                    self._mark_offset()
            finally:
                self.recorder.close(error)
            if self._exporter is not None:
                self._update_live()
        finally:
            for sink in self._sinks:
                sink.close()
