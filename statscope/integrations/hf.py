"""A Hugging Face ``TrainerCallback`` that records the trainer's model into a statscope run.

>>> from statscope.integrations.hf import StatscopeTrainerCallback  # doctest: +SKIP
>>> cb = StatscopeTrainerCallback("runs/bert")  # doctest: +SKIP
>>> with cb:  # doctest: +SKIP
...     Trainer(model, args, train_dataset=data, callbacks=[cb]).train()

Needs ``transformers`` (and ``accelerate`` for its Trainer): ``pip install 'statscope[hf]'``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

try:
    from transformers import TrainerCallback
except ImportError as exc:
    raise ImportError("statscope.integrations.hf needs the transformers package: "
                      "pip install 'statscope[hf]'") from exc

from statscope.integrations.session import (LiveExport, RecordingSession, check_callback_args,
                                            check_record_kwargs, loggable)

__all__ = ["StatscopeTrainerCallback"]

_NEW_TRAINING = "a new training began before the previous one reported its end"


class StatscopeTrainerCallback(TrainerCallback):
    """Record normalization statistics of the Trainer's model at every optimizer step.

    One recorded step per optimizer step, whatever ``gradient_accumulation_steps`` (the first
    micro-batch's forward of each step is recorded); evaluation and prediction run in eval mode
    and are not recorded. What the Trainer logs (``loss``, ``learning_rate``, ``grad_norm``,
    ``eval_loss``, ...; every ``logging_steps``) goes into the run at the step it describes; what it
    logs before a training's first optimizer step (``eval_on_start``, also when resumed from a
    checkpoint) goes into the run's attrs under ``scalars_before_training``, beside the
    Trainer's ``global_step`` it was logged at. Numbers are Python or numpy scalars and
    one-element tensors; other values are left out. The
    run's meta holds ``batch_size`` (per device), ``lr``, ``epochs``, ``seed``, the model type and
    the sanitized ``TrainingArguments``; ``meta`` adds to them.

    Under ``torch.distributed`` each rank records its own micro-batches into ``path/rank{r}``.
    The recorder starts at ``on_train_begin`` and closes at ``on_train_end`` (run ``completed``).
    The Trainer tells its callbacks nothing when training raises: use the callback as a context
    manager around ``trainer.train()`` so a failure marks the run ``failed`` with the error
    (and still propagates). Without it, such a run is marked failed when the callback is
    garbage-collected, the process exits, or the next ``train()`` begins. Store step k is the
    Trainer's ``global_step`` k + 1, the step its loggers write the (k+1)-th optimizer step at.

    Args:
        path: the run store (folder or fsspec URL).
        layers: which modules, as :func:`statscope.record` takes them (default: every norm layer).
        meta: extra run metadata, merged over what the Trainer provides.
        overwrite: replace an existing run at ``path``.
        live: a :class:`~statscope.integrations.LiveExport` to write TensorBoard summaries every
            N steps while training; None (default) for none.
        **record_kwargs: more arguments of :func:`statscope.record`, except ``step``.

    Raises:
        StatscopeError: ``path`` not a str or path, ``meta`` not a mapping, ``live`` not a
            :class:`~statscope.integrations.LiveExport`, ``step`` among ``record_kwargs``; at
            ``on_train_begin``, what :func:`statscope.record` raises for bad arguments or an
            existing store.

    Example:
        >>> cb = StatscopeTrainerCallback("runs/bert", overwrite=True)  # doctest: +SKIP
        >>> with cb:  # doctest: +SKIP
        ...     Trainer(model, args, train_dataset=data, callbacks=[cb]).train()
    """

    def __init__(self, path: str | os.PathLike, *, layers: Any = None,
                 meta: Mapping[str, Any] | None = None, overwrite: bool = False,
                 live: LiveExport | None = None, **record_kwargs: Any):
        self.path, self.meta = check_callback_args(path, meta, live)
        self.live = live
        self.record_kwargs = {"layers": layers, "overwrite": overwrite,
                              **check_record_kwargs(record_kwargs)}
        self.session: RecordingSession | None = None
        self._pending = False
        self._begin_step = 0  # the Trainer's global_step when this training began

    def __enter__(self) -> "StatscopeTrainerCallback":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and self.session is not None:
            self.session.close(f"{exc_type.__name__}: {exc}")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.session is not None:
            self.session.close(_NEW_TRAINING)
        self.session = RecordingSession(model, self.path, self.record_kwargs,
                                        {**_meta(args, model), **self.meta}, self.live,
                                        trainer_step=state.global_step + 1)
        self._pending = False
        self._begin_step = state.global_step

    def on_step_begin(self, args, state, control, **kwargs):
        # The previous step ends only now, so that what the Trainer logs after it (loss,
        # evaluation) lands in it.
        if self._pending and self._open():
            self.session.end_step()
        self._pending = False

    def on_step_end(self, args, state, control, **kwargs):
        self._pending = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and self._open():
            scalars = loggable(logs)
            if state.global_step <= self._begin_step:
                # before this training's first optimizer step (eval_on_start): the store step
                # in progress is that step, and the step the log describes is none (a new
                # run) or one a resumed run has stored already (its checkpoint's)
                self.session.log_before_training(state.global_step, scalars)
            else:
                self.session.log(**scalars)

    def on_save(self, args, state, control, **kwargs):
        # Commit the steps before the checkpoint's. Its own step ends at the next step's
        # begin (what the Trainer logs at an epoch's end may still come), reaching the store
        # within flush_seconds: a run killed before that and resumed lacks that one step.
        if self._open():
            self.session.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.session is not None:
            self.session.close()
        self._pending = False

    def _open(self) -> bool:
        return self.session is not None and not self.session.closed


def _meta(args, model) -> dict[str, Any]:
    """What the TrainingArguments and the model's config say about the run."""
    config = getattr(model, "config", None)
    return {
        "integration": "hf",
        "batch_size": args.per_device_train_batch_size,
        "lr": args.learning_rate,
        "epochs": args.num_train_epochs,
        "seed": args.seed,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "model_type": getattr(config, "model_type", type(model).__name__),
        "training_arguments": args.to_sanitized_dict(),
    }
