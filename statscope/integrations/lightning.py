"""A Lightning callback that records the trainer's model into a statscope run.

>>> from statscope.integrations.lightning import StatscopeCallback  # doctest: +SKIP
>>> trainer = lightning.Trainer(callbacks=[StatscopeCallback("runs/lit")])  # doctest: +SKIP

Needs the ``lightning`` package: ``pip install 'statscope[lightning]'``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

try:
    from lightning.pytorch import Callback
except ImportError as exc:
    raise ImportError("statscope.integrations.lightning needs the lightning package: "
                      "pip install 'statscope[lightning]'") from exc

import torch

from statscope.integrations.session import (LiveExport, RecordingSession, check_callback_args,
                                            check_record_kwargs)

__all__ = ["StatscopeCallback"]


class StatscopeCallback(Callback):
    """Record normalization statistics of the ``LightningModule`` at every optimizer step.

    One recorded step per optimizer step, whatever ``accumulate_grad_batches`` (the first
    micro-batch's forward of each step is recorded, also when Lightning runs the forward inside
    ``optimizer.step``'s closure); validation, test and sanity-check forwards run in eval mode and
    are not recorded. Per step the run also gets ``loss`` (the mean of the step's micro-batch
    losses, from ``training_step``'s output) and ``lr`` (of the first parameter group of the
    first optimizer that stepped, as the step used it). The run's meta holds the module's (and datamodule's)
    ``hparams`` and the trainer's settings; ``meta`` adds to them.

    Under manual optimization a step is a batch in which at least one optimizer stepped:
    several optimizers stepping in one batch (a GAN's) are one step, and batches in which none
    stepped are micro-batches of the next step. A last step that no optimizer step ended (a
    manual module's trailing batches, or a failure) stays in the run with its forwards and
    loss, without ``lr``.

    Under DDP each rank records its own micro-batches into ``path/rank{r}``. The recorder starts
    at ``on_train_start`` and closes at ``on_train_end`` (run ``completed``) or on an exception
    (run ``failed``, with the error; Lightning re-raises it). Store step k is the trainer's
    ``global_step`` k, the step Lightning's loggers write the (k+1)-th optimizer step at, where
    each step is one optimizer step (with several optimizers per batch: the k-th batch that
    stepped). Lightning checkpoints hold the store step training goes on at: ``resume=True``
    with ``fit(ckpt_path=...)`` continues the run there, replacing steps recorded after the
    checkpoint (a checkpoint without it: the step ``global_step`` maps to).

    Args:
        path: the run store (folder or fsspec URL).
        layers: which modules, as :func:`statscope.record` takes them (default: every norm layer).
        meta: extra run metadata, merged over what the trainer provides.
        overwrite: replace an existing run at ``path``.
        live: a :class:`~statscope.integrations.LiveExport` to write TensorBoard summaries every
            N steps while training; None (default) for none.
        **record_kwargs: more arguments of :func:`statscope.record` (``stats``, ``en_groups``,
            ``channel_dim``, ...), except ``step``.

    Raises:
        StatscopeError: ``step`` among ``record_kwargs``, ``path``, ``meta`` or ``live`` of
            the wrong kind (at construction); at ``on_train_start``, what
            :func:`statscope.record` raises for bad arguments or an existing store.

    Example:
        >>> cb = StatscopeCallback("runs/lit", layers=["bn1"], meta={"seed": 0})  # doctest: +SKIP
        >>> lightning.Trainer(max_steps=100, accumulate_grad_batches=2,
        ...                   callbacks=[cb]).fit(module, loader)  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, *, layers: Any = None,
                 meta: Mapping[str, Any] | None = None, overwrite: bool = False,
                 live: LiveExport | None = None, **record_kwargs: Any):
        self.path, self.meta = check_callback_args(path, meta, live)
        self.live = live
        self.record_kwargs = {"layers": layers, "overwrite": overwrite,
                              **check_record_kwargs(record_kwargs)}
        self.session: RecordingSession | None = None
        self._seen_step = 0
        self._loss: torch.Tensor | None = None  # the sum of the step's micro-batch losses
        self._batches = 0  # and how many they are
        self._lr: Any = None
        self._restored_step: int | None = None  # the store step a loaded checkpoint is at

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._restored_step = None  # what a checkpoint loaded after this says is this run's

    def state_dict(self) -> dict[str, Any]:
        # the store step the training goes on at: global_step says it only when every step is
        # one optimizer's (several optimizers of a manual module step in one store step)
        if self.session is None:
            return {}
        return {"store_step": self.session.recorder.current_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        step = state_dict.get("store_step")
        self._restored_step = step if isinstance(step, int) and not isinstance(step, bool) \
            and step >= 0 else None

    def on_train_start(self, trainer, pl_module) -> None:
        restored, self._restored_step = self._restored_step, None  # one fit's
        self.session = RecordingSession(pl_module, self.path, self.record_kwargs,
                                        {**_meta(trainer, pl_module), **self.meta}, self.live,
                                        trainer_step=trainer.global_step, store_step=restored)
        self._seen_step = trainer.global_step
        self._loss, self._batches, self._lr = None, 0, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._lr is None:
            lr = optimizer.param_groups[0].get("lr")
            # a tensor lr is updated in place by its scheduler before the step ends: keep this
            # step's (a copy on its device, no sync)
            self._lr = lr.detach().clone() if isinstance(lr, torch.Tensor) else lr

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.session is None or self.session.closed:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            # automatic optimization hands over each micro-batch's loss divided by
            # accumulate_grad_batches (what its backward uses), also in an epoch's last, shorter
            # step; manual optimization hands it over as training_step returned it
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            loss = loss.detach() * scale
            self._loss = loss if self._loss is None else self._loss + loss
            self._batches += 1
        if trainer.global_step == self._seen_step:
            return  # accumulating: the optimizer has not stepped yet
        self._seen_step = trainer.global_step
        self._log_scalars()
        self.session.end_step()

    def _log_scalars(self) -> None:
        """Log the step's loss and lr (those it has) and start the next step's."""
        assert self.session is not None
        mean = None if self._loss is None else self._loss / self._batches
        scalars = {"loss": mean, "lr": self._lr}
        self.session.log(**{k: v for k, v in scalars.items() if v is not None})
        self._loss, self._batches, self._lr = None, 0, None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # Lightning runs checkpoint callbacks after the others: the step ended here already
        if self.session is not None and not self.session.closed:
            self.session.flush()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close(f"{type(exception).__name__}: {exception}")

    def _close(self, error: str | None = None) -> None:
        if self.session is None or self.session.closed:
            return
        # the step in progress (micro-batches no optimizer step ended: a manual module's last
        # batches, or a failure) stays in the run with its forwards; so do their losses
        if self._batches or self._lr is not None:
            self._log_scalars()
        self.session.close(error)


def _meta(trainer, pl_module) -> dict[str, Any]:
    """The module's and datamodule's hyperparameters and the trainer's settings."""
    meta: dict[str, Any] = {"integration": "lightning"}
    datamodule = getattr(trainer, "datamodule", None)
    for owner in (datamodule, pl_module):
        hparams = getattr(owner, "hparams", None)
        if isinstance(hparams, Mapping):
            meta.update(hparams)
    meta["trainer"] = {
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
        "precision": str(trainer.precision), "world_size": trainer.world_size,
        "num_devices": trainer.num_devices, "strategy": type(trainer.strategy).__name__,
    }
    return meta
