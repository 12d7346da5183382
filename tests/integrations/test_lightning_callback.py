"""The Lightning callback on real ``Trainer.fit`` runs of a tiny model."""

import re
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("lightning")

import statscope
from statscope.errors import StatscopeError
from statscope.integrations import LiveExport, StatscopeCallback

from integrations_support import check_step_values, regression_loader
from lightning_support import TinyNet, lightning_trainer

pytestmark = [
    # lightning 2.6 on torch 2.13 calls a torch.utils._pytree API that torch deprecated
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated"
                               r":FutureWarning:lightning"),
    # depends on the machine's CPU count, not on anything the callback does
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning:lightning"),
]


def hook_first_inputs(module, trainer_box):
    """Record, per optimizer step, the input of ``module``'s first training forward in it."""
    firsts: dict[int, object] = {}
    forwards = []

    def hook(m, args):
        if m.training:
            forwards.append(1)
            firsts.setdefault(trainer_box[0].global_step, args[0].detach().clone())

    module.register_forward_pre_hook(hook)
    return firsts, forwards


def fit(tmp_path, callback, *, accumulate=2, val=True, **hparams):
    torch.manual_seed(0)  # the weights: from some, LBFGS diverges to a NaN loss (said)
    model = TinyNet(**hparams)
    box = []
    firsts, forwards = hook_first_inputs(model.bn, box)
    trainer = lightning_trainer([callback], accumulate_grad_batches=accumulate,
                                limit_val_batches=2 if val else 0, val_check_interval=4)
    box.append(trainer)
    loader = regression_loader()
    trainer.fit(model, loader, loader)
    return trainer, model, [firsts[k] for k in sorted(firsts)], forwards


def test_one_recorded_step_per_optimizer_step_with_values_losses_and_lrs(tmp_path):
    trainer, model, firsts, forwards = fit(tmp_path, StatscopeCallback(tmp_path / "run"))
    ds = statscope.open_run(tmp_path / "run")
    assert trainer.global_step == 8 and len(forwards) == 16  # 16 micro-batches, 2 per step
    assert ds.sizes["step"] == 8 and ds.attrs["status"] == "completed"
    check_step_values(ds, "bn", firsts, channel_dim=1)
    # loss: the mean of the step's two micro-batch losses; lr: as StepLR set it for the step
    np.testing.assert_allclose(ds.loss.values, np.mean(np.reshape(model.losses, (8, 2)), 1),
                               rtol=1e-6)
    np.testing.assert_allclose(ds.lr.values, 0.1 * 0.5 ** np.arange(8))
    meta = ds.attrs["meta"]
    assert meta["integration"] == "lightning" and meta["lr"] == 0.1 and meta["batch_size"] == 4
    assert meta["trainer"]["accumulate_grad_batches"] == 2


def test_the_loss_is_the_mean_of_the_steps_micro_batches_also_when_fewer(tmp_path):
    # 16 micro-batches by 3: the last step has 1. Lightning divides each micro-batch's loss by
    # accumulate_grad_batches also there, and the callback summed them: that step read a third
    # of its loss (an outside check found it)
    trainer, model, _, _ = fit(tmp_path, StatscopeCallback(tmp_path / "run"), accumulate=3,
                               val=False)
    ds = statscope.open_run(tmp_path / "run")
    groups = [model.losses[i:i + 3] for i in range(0, 16, 3)]
    assert trainer.global_step == 6 and [len(g) for g in groups] == [3, 3, 3, 3, 3, 1]
    np.testing.assert_allclose(ds.loss.values, [np.mean(g) for g in groups], rtol=1e-6)


class HandAccumulated(TinyNet):
    """Manual optimization, an optimizer step every second batch (no normalization by
    Lightning: the loss reaches the callback as training_step returns it)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        if batch_idx % 2 == 1:
            opt.step()
            opt.zero_grad()
        return loss


def test_the_loss_under_manual_optimization_is_the_mean_not_the_sum(tmp_path):
    torch.manual_seed(0)
    model = HandAccumulated()
    trainer = lightning_trainer([StatscopeCallback(tmp_path / "run")], limit_val_batches=0)
    loader = regression_loader()
    trainer.fit(model, loader, loader)
    ds = statscope.open_run(tmp_path / "run")
    assert trainer.global_step == 8 and ds.sizes["step"] == 8
    np.testing.assert_allclose(ds.loss.values, np.mean(np.reshape(model.losses, (8, 2)), 1),
                               rtol=1e-6)


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty:UserWarning")
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch")
def test_resuming_from_an_earlier_checkpoint_replaces_the_steps_replayed(tmp_path):
    # A crash after the last checkpoint: the store holds steps past it. resume=True appended the
    # steps the trainer replays as new rows (7-11 for trainer steps 4-8, offset -3: an outside
    # check); the callback now resumes the store at the checkpoint's step
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    model = TinyNet()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    lightning_trainer([StatscopeCallback(tmp_path / "run"), saver], max_steps=7,
                      limit_val_batches=0, enable_checkpointing=True).fit(
        model, regression_loader(), regression_loader())
    assert statscope.open_run(tmp_path / "run").sizes["step"] == 7
    (ckpt,) = [p for p in (tmp_path / "ckpt").iterdir() if "step=4" in p.name]
    model = TinyNet()
    box = []
    firsts, _ = hook_first_inputs(model.bn, box)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer = lightning_trainer([StatscopeCallback(tmp_path / "run", resume=True), saver],
                                max_steps=10, limit_val_batches=0, enable_checkpointing=True)
    box.append(trainer)
    trainer.fit(model, regression_loader(), regression_loader(), ckpt_path=ckpt)
    ds = statscope.open_run(tmp_path / "run")
    assert ds.step.values.tolist() == list(range(10))
    assert ds.attrs["trainer_step_offset"] == 0
    check_step_values(ds.isel(step=slice(4, None)), "bn", [firsts[k] for k in sorted(firsts)],
                      channel_dim=1)


def test_forwards_inside_an_lbfgs_closure_record_the_first_of_each_step(tmp_path):
    trainer, _, firsts, forwards = fit(tmp_path, StatscopeCallback(tmp_path / "run"),
                                       accumulate=1, val=False, optimizer="lbfgs", lr=0.05)
    ds = statscope.open_run(tmp_path / "run")
    assert len(forwards) > trainer.global_step == ds.sizes["step"] == 16
    check_step_values(ds, "bn", firsts, channel_dim=1)


def test_a_failure_in_training_marks_the_run_failed_and_propagates(tmp_path):
    with pytest.raises(RuntimeError, match="boom at batch 5"):
        fit(tmp_path, StatscopeCallback(tmp_path / "run"), fail_at_batch=5)
    ds = statscope.open_run(tmp_path / "run")
    assert ds.attrs["status"] == "failed"
    assert "RuntimeError: boom at batch 5" in ds.attrs["error"]
    assert ds.sizes["step"] == 3  # two whole steps and the first micro-batch of the third


def test_live_export_writes_what_an_export_of_the_store_writes(tmp_path):
    from export_reference import read_events
    from statscope.export import export_run, Exporter

    updates = []
    original = Exporter.update

    def counting(self):
        updates.append(1)
        return original(self)

    live = LiveExport(str(tmp_path / "live"), every=2, window=2)
    cb = StatscopeCallback(tmp_path / "run", live=live, block_steps=2, flush_seconds=0.01)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Exporter, "update", counting)
        fit(tmp_path, cb)
    assert len(updates) == 8 // 2 + 1  # every 2 steps, and once after the end
    export_run(tmp_path / "run", "tensorboard", tmp_path / "after", window=2)
    live_events, live_hists, _ = read_events(tmp_path / "live")
    after_events, after_hists, _ = read_events(tmp_path / "after")
    assert live_events.keys() == after_events.keys() and "scalars/loss" in live_events
    for tag, points in after_events.items():
        assert live_events[tag] == pytest.approx(points)
    assert {t: sorted(h) for t, h in live_hists.items()} == \
        {t: sorted(h) for t, h in after_hists.items()}


def test_a_failing_live_export_warns_once_and_training_and_recording_go_on(tmp_path):
    # an update that raised (a full disk, the target removed) used to leave end_step with the
    # error: Lightning then failed the whole fit over an optional side output
    from statscope.errors import StatscopeWarning
    from statscope.export import Exporter

    calls = []

    def failing(self):
        calls.append(1)
        raise OSError(28, "No space left on device")

    live = LiveExport(str(tmp_path / "live"), every=2, window=2)
    cb = StatscopeCallback(tmp_path / "run", live=live)
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        mp.setattr(Exporter, "update", failing)
        trainer, _, firsts, _ = fit(tmp_path, cb)
    said = [str(x.message) for x in w if issubclass(x.category, StatscopeWarning)]
    assert len(calls) == 1 and len(said) == 1, said
    assert re.match(r"statscope: LiveExport\(to='tensorboard', target='.*live'\): the live "
                    r"export stopped \(\[Errno 28\] No space left", said[0]), said
    ds = statscope.open_run(tmp_path / "run")
    assert trainer.global_step == 8 and ds.sizes["step"] == 8
    assert ds.attrs["status"] == "completed"
    check_step_values(ds, "bn", firsts, channel_dim=1)


def test_exports_line_up_with_the_steps_lightning_logs_at(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from export_reference import read_events
    from statscope.export import export_run

    class Logged(TinyNet):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

    trainer = lightning_trainer([StatscopeCallback(tmp_path / "run")], accumulate_grad_batches=2,
                                logger=CSVLogger(tmp_path / "csv"), log_every_n_steps=1,
                                limit_val_batches=0)
    trainer.fit(Logged(), regression_loader(), regression_loader())
    with open(tmp_path / "csv" / "lightning_logs" / "version_0" / "metrics.csv") as fh:
        lightning_steps = sorted(int(row["step"]) for row in csv.DictReader(fh))
    assert statscope.open_run(tmp_path / "run").attrs["trainer_step_offset"] == 0
    export_run(tmp_path / "run", "tensorboard", tmp_path / "tb", window=2)
    scalars, _, _ = read_events(tmp_path / "tb")
    assert sorted(scalars["scalars/loss"]) == lightning_steps == list(range(8))


def test_step_is_not_an_argument():
    with pytest.raises(StatscopeError, match="step='auto'"):
        StatscopeCallback("x", step="auto")


@pytest.mark.slow
def test_two_ddp_ranks_write_one_store_each(tmp_path):
    model = TinyNet()
    trainer = lightning_trainer([StatscopeCallback(tmp_path / "run")], devices=2,
                                strategy="ddp_spawn", accumulate_grad_batches=2,
                                limit_val_batches=0)
    trainer.fit(model, regression_loader(), regression_loader())
    runs = [statscope.open_run(tmp_path / "run" / f"rank{r}") for r in (0, 1)]
    for r, ds in enumerate(runs):
        assert ds.attrs["rank"] == r and ds.attrs["world_size"] == 2
        assert ds.attrs["status"] == "completed"
        assert ds.sizes["step"] == 4  # 32 samples per rank, batch 4, 2 micro-batches per step
    assert not np.allclose(runs[0].bn_mean.values, runs[1].bn_mean.values)  # own shards


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty:UserWarning")
def test_each_checkpoint_is_saved_once_the_store_committed_its_steps(tmp_path):
    """on_save_checkpoint commits the store: a checkpoint is never ahead of it (a resume from it
    then finds every step before it stored)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from statscope.store import read_attrs

    seen = []

    class Saver(ModelCheckpoint):
        def _save_checkpoint(self, trainer, filepath):
            super()._save_checkpoint(trainer, filepath)
            seen.append((trainer.global_step, read_attrs(tmp_path / "run").get("n_steps", 0)))

    torch.manual_seed(0)
    saver = Saver(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    lightning_trainer([StatscopeCallback(tmp_path / "run"), saver], max_steps=7,
                      limit_val_batches=0, enable_checkpointing=True).fit(
        TinyNet(), regression_loader(), regression_loader())
    assert seen[:2] == [(3, 3), (6, 6)]
