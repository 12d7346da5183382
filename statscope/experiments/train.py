"""The training loop every built-in experiment shares, recorded by the probes.

Batches are rows of tensors held in memory, picked by a seeded permutation each epoch (no
``DataLoader``: at batch size 4 its per-sample overhead would cost more than the step). The last
incomplete batch of an epoch is dropped, so every recorded step has the same batch size. All
randomness comes from ``torch.manual_seed(seed)`` (weights) and two generators seeded from
``seed`` (shuffling, augmentation), so on the CPU two runs with one seed record the same bytes.

A Ctrl-C (SIGINT, where the loop runs on the main thread with Python's own handler) stops the
loop at the end of the step it lands in, so that the run's last row holds that step's ``loss``
and ``lr`` and a checkpoint is saved at it. One that lands after the last step lets the run close
(completed, every step being recorded) and then raises ``KeyboardInterrupt`` all the same: the
caller (a command, a sweep) stops. A second Ctrl-C stops at once; the row of the step it cut short
is taken out of the store, so that ``--resume`` records that step whole. At the end of every
epoch, at the end of the run and when it is interrupted between two steps, the loop saves a
:class:`~statscope.experiments.checkpoint.Checkpoint` beside the store.
``resume=True`` continues a store after its last recorded step: from the newest checkpoint at or
before that step, training the steps between the checkpoint and the store's end again without
recording them, then recording on; without a usable checkpoint, from step 0 (identical on the CPU,
close on CUDA). A store whose steps are all recorded but that is not marked completed (the run
died while closing) is finished: marked completed, with the test accuracy of every epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable

from statscope import schema as S
from statscope.errors import StatscopeError, StatscopeWarning, StoreError
from statscope.experiments.base import RunConfig, RunResult
from statscope.experiments.interrupts import sigint_at_step_end
from statscope.experiments.preflight import (RESUMABLE, check_out, check_recorded, check_resume,
                                             check_shapes, resolve_device)

__all__ = ["Progress", "run_experiment"]

_EVAL_BATCH = 1000


@dataclass(frozen=True)
class Progress:
    """Where a run is, for a progress bar.

    Attributes:
        epoch: the current epoch, 1-based.
        epochs: epochs in all.
        step: steps done.
        total_steps: steps the run will take.
        loss: training loss of the latest step.
        test_accuracy: the latest test accuracy in [0, 1], None before the first evaluation.
        recording: False while a resumed run trains again steps already recorded.
    """

    epoch: int
    epochs: int
    step: int
    total_steps: int
    loss: float
    test_accuracy: float | None
    recording: bool


def run_experiment(config: RunConfig, *, progress: Callable[[Progress], None] | None = None,
                   progress_seconds: float = 0.2, record: bool = True) -> RunResult:
    """Train one built-in experiment and record its normalization statistics at every step.

    Everything that can be checked is checked before anything is written: the settings, the
    device, the output path, the data, the batch size against the data and the norm against the
    model's shapes.

    Args:
        config: the run; ``None`` settings take the experiment's defaults.
        progress: called every ``progress_seconds`` and at the end with a :class:`Progress`
            (the loss is read from the device only then).
        progress_seconds: seconds between ``progress`` calls.
        record: False trains the same loop without probes and writes nothing (the baseline of
            ``benchmarks/bench_experiment.py``).

    Returns:
        RunResult with the store's path, the test accuracy after each epoch (and at the last step
        when ``max_steps`` stops mid-epoch), the steps, the wall time, the probe overhead and,
        for a resumed run, where it resumed and from which checkpoint.

    Raises:
        StatscopeError: bad settings, CUDA asked for but unavailable, a norm that cannot
            normalize the model's shapes, a batch larger than the training set, bad data files;
            StoreError: ``out`` exists and neither ``overwrite`` nor ``resume`` is set, or it
            holds something that is not a run, or a run with other settings, or a checkpoint
            that cannot be read or belongs to other settings (the message names the file);
            KeyboardInterrupt: Ctrl-C (see the module's docstring), also one that came after the
            last step, once the run is closed.

    Example:
        >>> import tempfile
        >>> from statscope.experiments import RunConfig, run_experiment
        >>> out = tempfile.mkdtemp() + "/run"
        >>> result = run_experiment(RunConfig("mnist-fc", batch_size=4, max_steps=20,
        ...                                   dataset="mnist-5k-subset", out=out))
        >>> result.steps, result.dataset
        (20, 'mnist-5k-subset')
    """
    import torch

    from statscope.experiments.datasets import load_dataset

    cfg = config.resolved()
    exp = cfg.spec
    device = resolve_device(cfg.device)
    start_step = check_out(cfg) if record else None
    data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, quiet=progress is None)
    cfg = dataclasses.replace(cfg, dataset=data.name, device=device.type)
    n_train = len(data.train_y)
    if cfg.batch_size > n_train:
        raise StatscopeError(f"batch_size={cfg.batch_size}: larger than the training set of "
                             f"{data.name} ({n_train} images)")
    steps_per_epoch = n_train // cfg.batch_size
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    if cfg.resume and record:
        check_resume(cfg, start_step, total)

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        model = exp.build_model(cfg.norm, data.num_classes).to(device)
        train_x = exp.prepare(data.train_x.to(device), data.normalize, True)
        train_y = data.train_y.to(device)
        test_x = exp.prepare(data.test_x.to(device), data.normalize, False)
        test_y = data.test_y.to(device)
        check_shapes(cfg, exp, model, train_x, data.normalize, device)
        shuffle = torch.Generator().manual_seed(cfg.seed)
        augment = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        optimizer = _sgd(model, cfg)
        loop = _Loop(cfg, model, optimizer, progress, progress_seconds, total, steps_per_epoch,
                     shuffle, augment, record)
        if record:
            loop.restore(start_step)
        return loop.run(train_x, train_y, test_x, test_y, data.normalize, start_step)
    finally:
        torch.set_num_threads(threads)


class _Loop:
    """One run's training loop; the recorder starts at ``start_step`` (None: never)."""

    def __init__(self, cfg: RunConfig, model, optimizer, progress, progress_seconds, total,
                 steps_per_epoch, shuffle, augment, record: bool):
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.progress = progress
        self.progress_seconds = progress_seconds
        self.total = total
        self.steps_per_epoch = steps_per_epoch
        self.shuffle = shuffle
        self.augment = augment
        self.checkpoints = record
        self.accuracy: list[float] = []
        self.step = 0  # where the loop starts: 0, or a checkpoint's step and epoch
        self.epoch = 0
        self.checkpoint_step: int | None = None
        # (step, epoch, shuffle state at that epoch's start) while the model, optimizer and
        # generators are those after ``step`` steps; None inside a step.
        self._at = None
        self._saved = 0

    def restore(self, start_step: int) -> None:
        """Continue from the newest usable checkpoint (resuming), or drop stale ones (new run)."""
        import torch

        from statscope.experiments.checkpoint import load_checkpoint

        if not (self.cfg.resume and start_step > 0):
            return  # stale checkpoints go once this run holds the store (see run)
        ckpt, why = load_checkpoint(self.cfg.out, self._config(), start_step)
        if ckpt is None:
            if why != "no checkpoint":
                warnings.warn(f"out={self.cfg.out!r}: no usable checkpoint, the checkpoints are "
                              f"{why}; replaying from step 0", StatscopeWarning, stacklevel=3)
            return
        try:
            self.model.load_state_dict(ckpt.model)
            self.optimizer.load_state_dict(ckpt.optimizer)
            self.augment.set_state(ckpt.augment)
            self.shuffle.set_state(ckpt.shuffle)
            torch.set_rng_state(ckpt.torch_rng)
            if ckpt.cuda_rng is not None:
                torch.cuda.set_rng_state(ckpt.cuda_rng)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"checkpoint {ckpt.path!r}: does not fit this run ("
                             f"{(str(exc).splitlines() or [''])[0]}); delete it to resume by "
                             "replaying the run from step 0") from None
        self.step, self.epoch = ckpt.step, ckpt.epoch
        self.accuracy = list(ckpt.test_accuracy)
        self.checkpoint_step = self._saved = ckpt.step

    def run(self, train_x, train_y, test_x, test_y, normalize, start_step) -> RunResult:
        """Train from ``self.step`` to the end, recording from ``start_step`` on.

        Raises:
            KeyboardInterrupt: Ctrl-C, also one that came after the last step (the run is then
                closed first: completed when every step was recorded).
        """
        import torch
        import torch.nn.functional as F

        from statscope.experiments.checkpoint import remove_checkpoints, remove_stale_temps
        from statscope.probes import record

        cfg, exp, model, opt = self.cfg, self.cfg.spec, self.model, self.optimizer
        bs, per_epoch = cfg.batch_size, self.steps_per_epoch
        step, rec, loss, replayed = self.step, None, None, 0
        epoch = self.epoch
        self._at = (step, epoch, self.shuffle.get_state())
        last_report = time.monotonic()
        t0 = time.perf_counter()
        with sigint_at_step_end() as ctrl_c:
            try:
                with contextlib.ExitStack() as stack:
                    try:
                        for epoch in range(self.epoch, cfg.epochs):
                            if step == self.total:
                                break
                            lr = exp.lr_at(epoch, cfg.epochs, cfg.lr)
                            for group in opt.param_groups:
                                group["lr"] = lr
                            epoch_shuffle = self.shuffle.get_state()
                            perm = torch.randperm(len(train_y), generator=self.shuffle).to(
                                train_y.device)
                            model.train()
                            for i in range(step - epoch * per_epoch, per_epoch):
                                if rec is None and step == start_step:
                                    # Resuming: at the step this loop planned from the
                                    # store (another process may have recorded more since),
                                    # and never a run that process completed meanwhile.
                                    rec = stack.enter_context(record(
                                        model, cfg.out, meta=cfg.meta(),
                                        overwrite=cfg.overwrite,
                                        resume=cfg.resume and start_step,
                                        resume_completed=False, en_groups=cfg.en_groups))
                                    # Only now that this run holds the store: the checkpoints
                                    # of a writer that still holds it are never touched.
                                    if start_step == 0:
                                        remove_checkpoints(cfg.out)
                                    else:
                                        remove_stale_temps(cfg.out)
                                self._at = None
                                idx = perm[i * bs:(i + 1) * bs]
                                xb = exp.batch(train_x.index_select(0, idx), normalize,
                                               self.augment)
                                loss = F.cross_entropy(model(xb), train_y.index_select(0, idx))
                                opt.zero_grad(set_to_none=True)
                                loss.backward()
                                opt.step()
                                if rec is not None:
                                    rec.log(loss=loss.detach(), lr=lr)
                                else:
                                    replayed += 1
                                step += 1
                                self._at = (step, epoch, epoch_shuffle)
                                if ctrl_c.asked:
                                    raise KeyboardInterrupt  # the Ctrl-C that came in the step
                                if self.progress is not None and time.monotonic() - last_report \
                                        >= self.progress_seconds:
                                    last_report = time.monotonic()
                                    self._report(epoch, step, loss, rec is not None)
                                if step == self.total:
                                    ctrl_c.closing = True
                                    break
                            if step < (epoch + 1) * per_epoch:
                                break  # max_steps stops inside this epoch
                            self._evaluate(test_x, test_y, rec)
                            self._at = (step, epoch + 1, self.shuffle.get_state())
                            self._save(*self._at, rec=rec)
                        ctrl_c.closing = True
                        if step % per_epoch and len(self.accuracy) == step // per_epoch:
                            self._evaluate(test_x, test_y, rec)
                        if self._at[0] > self._saved:
                            self._save(*self._at, rec=rec)
                    except BaseException:
                        if self._at is not None and self._at[0] > self._saved:
                            with contextlib.suppress(Exception):  # never hide why it stopped
                                self._save(*self._at, rec=rec)
                        raise
                    if self.progress is not None:
                        self._report(min(epoch, cfg.epochs - 1), step, loss, rec is not None)
            except BaseException as exc:
                if rec is not None and self._at is None:
                    self._drop_step(step, exc)
                raise
            wall = time.perf_counter() - t0
            from statscope.store import read_attrs

            overhead = None
            if start_step is not None:
                if rec is None and step == start_step:
                    self._finish()
                attrs = read_attrs(cfg.out)
                overhead = attrs.get(S.ATTR_PROBE_OVERHEAD)
                check_recorded(cfg.out, attrs, step)
                remove_checkpoints(cfg.out)  # a completed run is never resumed
        if ctrl_c.asked:  # it came after the last step: the run is closed, and now stops
            raise KeyboardInterrupt
        resumed = cfg.resume and bool(start_step)
        return RunResult(path=cfg.out if start_step is not None else None, dataset=cfg.dataset,
                         test_accuracy=tuple(self.accuracy), steps=step, wall_seconds=wall,
                         probe_overhead=overhead, resumed_at=start_step if resumed else None,
                         checkpoint_step=self.checkpoint_step,
                         replayed_steps=replayed if start_step is not None else 0,
                         steps_per_epoch=per_epoch)

    def _evaluate(self, test_x, test_y, rec) -> None:
        self.accuracy.append(_accuracy(self.model, test_x, test_y))
        if rec is not None:
            rec.log(test_acc=self.accuracy[-1])
            rec.set_attrs(test_accuracy=list(self.accuracy))

    def _config(self) -> dict:
        """The settings a checkpoint must share with this run to be continued by it."""
        config = {k: v for k, v in self.cfg.meta().items() if k not in RESUMABLE}
        return {**config, "device": self.cfg.device, "steps_per_epoch": self.steps_per_epoch}

    def _save(self, step: int, epoch: int, shuffle_state, rec=None) -> None:
        import torch

        from statscope.experiments.checkpoint import Checkpoint

        if not self.checkpoints:
            return
        if rec is not None:
            rec.flush()  # the store first: a checkpoint is never ahead of it, nor fills its disk
        cuda = self.cfg.device == "cuda"
        Checkpoint(step=step, epoch=epoch,
                   lr=self.cfg.spec.lr_at(epoch, self.cfg.epochs, self.cfg.lr),
                   test_accuracy=tuple(self.accuracy[:epoch]), config=self._config(),
                   model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                   shuffle=shuffle_state, augment=self.augment.get_state(),
                   torch_rng=torch.get_rng_state(),
                   cuda_rng=torch.cuda.get_rng_state() if cuda else None).save(self.cfg.out)
        self._saved = step

    def _drop_step(self, step: int, exc: BaseException) -> None:
        """Take out of the store the row of ``step``, in which ``exc`` stopped training (a
        second Ctrl-C, an error): the recorder, closed by ``exc``, committed that step half
        recorded (its ``loss`` and ``lr`` never logged, maybe part of its forward). No
        checkpoint is at that step, so ``--resume`` continues from one before it, replays up
        to it and records it whole. The run stays ``failed`` with the recorder's reason."""
        from statscope.store import Layout, read_attrs
        from statscope.writer import RunWriter

        try:
            attrs = read_attrs(self.cfg.out)
            last = attrs.get(S.ATTR_LAST_STEP)
            if last is None or int(last) < step:
                return  # the step ended before its first forward: nothing of it was committed
            writer = RunWriter(self.cfg.out, Layout.from_attrs(attrs), resume=step)
            writer.close(S.STATUS_FAILED,
                         attrs.get(S.ATTR_ERROR) or f"{type(exc).__name__}: {exc}")
        except Exception as err:  # never hide why the run stopped
            exc.add_note(f"statscope: the half-recorded step {step} of {self.cfg.out!r} stays "
                         f"in the store ({err!r}): its loss and lr are NaN")

    def _finish(self) -> None:
        """Mark completed a store whose steps were all recorded by a run that died closing it."""
        from statscope.store import Layout, read_attrs
        from statscope.writer import RunWriter

        writer = RunWriter(self.cfg.out, Layout.from_attrs(read_attrs(self.cfg.out)), resume=True)
        writer.set_attrs(test_accuracy=list(self.accuracy))
        writer.close(S.STATUS_COMPLETED)

    def _report(self, epoch: int, step: int, loss, recording: bool) -> None:
        self.progress(Progress(epoch=epoch + 1, epochs=self.cfg.epochs, step=step,
                               total_steps=self.total,
                               loss=math.nan if loss is None else float(loss.detach()),
                               test_accuracy=self.accuracy[-1] if self.accuracy else None,
                               recording=recording))


def _sgd(model, cfg: RunConfig):
    """torch's SGD, fused where this torch and device have it (a fifth faster per step at batch
    size 4 on the CPU: one kernel instead of a Python loop over parameters)."""
    import torch

    kwargs = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
    try:
        return torch.optim.SGD(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.SGD(model.parameters(), **kwargs)


def _accuracy(model, x, y) -> float:
    """Fraction of ``x`` classified as ``y``, in eval mode (the probes do not record it)."""
    import torch

    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=y.device)
    with torch.no_grad():
        for i in range(0, len(y), _EVAL_BATCH):
            correct += (model(x[i:i + _EVAL_BATCH]).argmax(1) == y[i:i + _EVAL_BATCH]).sum()
    model.train()
    return int(correct) / len(y)
