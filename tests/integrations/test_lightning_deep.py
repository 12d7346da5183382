"""The Lightning callback against its documented contract, in the corners of Lightning's loops:
manual optimization with several optimizers, accumulation with epoch ends, max_steps and
validation inside an epoch, resuming and fitting again, failures, interrupts, bf16 and DDP.
Every statistic is compared with a float64 reference of the input the layer saw, taken by a
hook of the test's own."""

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lightning")

import lightning.pytorch as L

import statscope
from statscope.errors import StatscopeError, StoreError
from statscope.integrations import StatscopeCallback

from integrations_support import check_step_values, regression_loader
from lightning_support import (BatchInputs, GanNet, TinyNet, lightning_trainer,
                               step_groups)

pytestmark = [
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated"
                               r":FutureWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"
                               ":UserWarning"),
    pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the "
                               "epoch"),
]


def gan_stepped(n, g_every=2, skip_d=()):
    """Per batch: which optimizers of GanNet step ('d', 'g')."""
    return [[o for o, did in (("d", b not in skip_d), ("g", b % g_every == 0)) if did]
            for b in range(n)]


def check_scalars(ds, model_losses, groups, lrs):
    np.testing.assert_allclose(ds.loss.values,
                               [np.mean([model_losses[b] for b in g]) for g in groups],
                               rtol=1e-6)
    np.testing.assert_allclose(ds.lr.values, lrs, rtol=1e-7)


# -- manual optimization ------------------------------------------------------------------------


def test_two_optimizers_at_different_frequencies_give_one_step_per_batch_that_stepped(tmp_path):
    # d steps every batch but 2 and 5, g every second: batch 2 steps g only (lr 0.01), batch 5
    # steps nothing and is a micro-batch of batch 6's step
    skip_d = (2, 5)
    torch.manual_seed(0)
    model, inputs = GanNet(skip_d=skip_d), BatchInputs("d.1", "g.1")
    trainer = lightning_trainer([StatscopeCallback(tmp_path / "run"), inputs],
                                limit_val_batches=0)
    trainer.fit(model, regression_loader())
    stepped = gan_stepped(16, skip_d=skip_d)
    groups = step_groups([bool(s) for s in stepped])
    assert trainer.global_step == sum(map(len, stepped)) == 22 and len(groups) == 15
    ds = statscope.open_run(tmp_path / "run")
    assert ds.attrs["status"] == "completed" and ds.step.values.tolist() == list(range(15))
    assert ds.attrs["trainer_step_offset"] == 0
    for layer in ("d.1", "g.1"):
        check_step_values(ds, layer, inputs.firsts(layer, groups), channel_dim=1)
    lrs = [{"d": 0.1, "g": 0.01}[stepped[g[-1]][0]] for g in groups]  # the first that stepped
    assert lrs.count(0.01) == 1
    check_scalars(ds, model.losses, groups, lrs)


def run_gan_until(tmp_path, save_after, crash_after):
    """A GanNet fit that saves a checkpoint after batch ``save_after`` and dies after batch
    ``crash_after`` (the store then holds the steps up to it)."""

    class SaveThenCrash(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == save_after:
                trainer.save_checkpoint(tmp_path / "at.ckpt")
            if batch_idx == crash_after:
                raise RuntimeError("the machine went away")

    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="went away"):
        lightning_trainer([StatscopeCallback(tmp_path / "run"), SaveThenCrash()],
                          limit_val_batches=0).fit(GanNet(), regression_loader())
    ds = statscope.open_run(tmp_path / "run")
    assert ds.attrs["status"] == "failed" and ds.sizes["step"] == crash_after + 1
    return tmp_path / "at.ckpt"


@pytest.mark.parametrize("crash_after", [7, 4])
def test_resuming_two_optimizers_files_the_replayed_batches_at_their_steps(tmp_path,
                                                                           crash_after):
    # every batch steps (d always, g every second): store step b is batch b. The checkpoint
    # after batch 3 is at global_step 6; the callback resumed the store at step 6 (what
    # global_step maps to under one optimizer), leaving the crashed run's steps 4-5 in place and
    # filing batch 4 as step 6 (crash_after=7), or a gap at step 5 (crash_after=4)
    ckpt = run_gan_until(tmp_path, save_after=3, crash_after=crash_after)
    torch.manual_seed(1)
    model, inputs = GanNet(), BatchInputs("d.1", "g.1")
    trainer = lightning_trainer([StatscopeCallback(tmp_path / "run", resume=True), inputs],
                                limit_val_batches=0)
    trainer.fit(model, regression_loader(), ckpt_path=ckpt)
    assert inputs.batch == 11  # batches 4-15
    ds = statscope.open_run(tmp_path / "run")
    assert ds.attrs["status"] == "completed"
    assert ds.step.values.tolist() == list(range(16))
    assert ds.attrs["trainer_step_offset"] == 0
    resumed = ds.isel(step=slice(4, None))
    groups = [[b] for b in range(12)]
    for layer in ("d.1", "g.1"):
        check_step_values(resumed, layer, inputs.firsts(layer, groups), channel_dim=1)
    check_scalars(resumed, model.losses, groups, [0.1] * 12)


# -- automatic optimization: accumulation against epoch ends, max_steps, validation ------------


def fit_tiny(tmp_path, callback=None, *, extra=(), **trainer_kwargs):
    torch.manual_seed(0)
    model, inputs = TinyNet(), BatchInputs("bn")
    callbacks = [callback or StatscopeCallback(tmp_path / "run"), inputs, *extra]
    trainer = lightning_trainer(callbacks, **trainer_kwargs)
    trainer.fit(model, regression_loader(), regression_loader())
    return trainer, model, inputs


def test_accumulation_with_short_epochs_and_validation_inside_them(tmp_path):
    # 5 batches per epoch by 2: steps of 2, 2, 1 per epoch; validation after batches 3 and 5 of
    # each epoch (in the middle of a step, and at the epoch's end) records nothing
    trainer, model, inputs = fit_tiny(tmp_path, accumulate_grad_batches=2, max_epochs=2,
                                      limit_train_batches=5, val_check_interval=3,
                                      limit_val_batches=2)
    groups = [[0, 1], [2, 3], [4], [5, 6], [7, 8], [9]]
    assert trainer.global_step == 6 and inputs.batch == 9
    ds = statscope.open_run(tmp_path / "run")
    assert ds.attrs["status"] == "completed" and ds.step.values.tolist() == list(range(6))
    check_step_values(ds, "bn", inputs.firsts("bn", groups), channel_dim=1)
    check_scalars(ds, model.losses, groups, 0.1 * 0.5 ** np.arange(6))


def test_max_steps_ending_an_epoch_early(tmp_path):
    trainer, model, inputs = fit_tiny(tmp_path, accumulate_grad_batches=3, max_steps=4,
                                      limit_val_batches=0)
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert trainer.global_step == 4 and inputs.batch == 11  # of 16 batches
    ds = statscope.open_run(tmp_path / "run")
    assert ds.attrs["status"] == "completed" and ds.sizes["step"] == 4
    check_step_values(ds, "bn", inputs.firsts("bn", groups), channel_dim=1)
    check_scalars(ds, model.losses, groups, 0.1 * 0.5 ** np.arange(4))


# -- fitting again -----------------------------------------------------------------------------


def test_a_second_fit_of_the_same_trainer_goes_on_with_resume(tmp_path):
    callback = StatscopeCallback(tmp_path / "run", resume=True)
    trainer, model, first = fit_tiny(tmp_path, callback, limit_val_batches=0,
                                     limit_train_batches=6)
    second = BatchInputs("bn")
    trainer.callbacks.append(second)
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model, regression_loader(), regression_loader())
    assert trainer.global_step == 12 and second.batch == 5
    ds = statscope.open_run(tmp_path / "run")
    assert ds.attrs["status"] == "completed" and ds.step.values.tolist() == list(range(12))
    assert ds.attrs["trainer_step_offset"] == 0
    groups = [[b] for b in range(6)]
    check_step_values(ds.isel(step=slice(0, 6)), "bn", first.firsts("bn", groups), channel_dim=1)
    check_step_values(ds.isel(step=slice(6, None)), "bn", second.firsts("bn", groups),
                      channel_dim=1)
    # a fit configures the optimizers anew: the lr starts over, as the step used it
    check_scalars(ds, model.losses, [[b] for b in range(12)], 0.1 * 0.5 ** (np.arange(12) % 6))


def test_a_second_fit_without_resume_or_overwrite_is_refused_and_keeps_the_run(tmp_path):
    callback = StatscopeCallback(tmp_path / "run")
    trainer, model, _ = fit_tiny(tmp_path, callback, limit_val_batches=0, limit_train_batches=4)
    trainer.fit_loop.max_epochs = 2
    with pytest.raises(StoreError, match="already exists"):
        trainer.fit(model, regression_loader(), regression_loader())
    ds = statscope.open_run(tmp_path / "run")
    assert ds.attrs["status"] == "completed" and ds.sizes["step"] == 4


# -- failures ----------------------------------------------------------------------------------


def test_a_failure_under_manual_optimization_keeps_the_steps_before_it(tmp_path):
    # the failure comes after d's forwards of batch 5: steps 0-4 whole, and step 5's first
    # forward (the run keeps what was recorded, as after any failure)
    torch.manual_seed(0)
    model, inputs = GanNet(fail_at_batch=5), BatchInputs("d.1", "g.1")
    with pytest.raises(RuntimeError, match="boom at batch 5"):
        lightning_trainer([StatscopeCallback(tmp_path / "run"), inputs],
                          limit_val_batches=0).fit(model, regression_loader())
    ds = statscope.open_run(tmp_path / "run")
    assert ds.attrs["status"] == "failed"
    assert ds.attrs["error"] == "RuntimeError: boom at batch 5"
    assert ds.step.values.tolist() == list(range(6))
    groups = [[b] for b in range(6)]
    for layer in ("d.1", "g.1"):
        check_step_values(ds, layer, inputs.firsts(layer, groups), channel_dim=1)
    check_scalars(ds.isel(step=slice(0, 5)), model.losses, groups[:5], [0.1] * 5)
    assert np.isnan(ds.loss.values[5]) and np.isnan(ds.lr.values[5])


def test_a_keyboard_interrupt_marks_the_run_failed(tmp_path):
    # Lightning's graceful shutdown: on_exception, then sys.exit(1), with SIGINT ignored after
    torch.manual_seed(0)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            lightning_trainer([StatscopeCallback(tmp_path / "run")], limit_val_batches=0).fit(
                GanNet(interrupt_at_batch=3), regression_loader())
    finally:
        signal.signal(signal.SIGINT, handler)
    ds = statscope.open_run(tmp_path / "run")
    assert ds.attrs["status"] == "failed" and ds.attrs["error"].startswith("KeyboardInterrupt")
    assert ds.sizes["step"] == 4


# -- precision ---------------------------------------------------------------------------------


def test_bf16_mixed_records_the_bf16_inputs_exactly(tmp_path):
    trainer, model, inputs = fit_tiny(tmp_path, accumulate_grad_batches=2, limit_val_batches=0,
                                      precision="bf16-mixed")
    groups = [[2 * k, 2 * k + 1] for k in range(8)]
    firsts = inputs.firsts("bn", groups)
    ds = statscope.open_run(tmp_path / "run")
    assert ds.attrs["meta"]["trainer"]["precision"] == "bf16-mixed"
    assert ds.attrs["status"] == "completed" and ds.sizes["step"] == 8
    check_step_values(ds, "bn", firsts, channel_dim=1)
    check_scalars(ds, model.losses, groups, 0.1 * 0.5 ** np.arange(8))


def test_trailing_batches_that_no_optimizer_step_ends_keep_their_forward_and_loss(tmp_path):
    # d steps in batches 0-13 only, g in batch 0: batches 14-15 are a step that never stepped.
    # The run keeps it (its first forward) as the last step; its losses were dropped
    torch.manual_seed(0)
    model, inputs = GanNet(skip_d=(14, 15), g_every=16), BatchInputs("d.1", "g.1")
    trainer = lightning_trainer([StatscopeCallback(tmp_path / "run"), inputs],
                                limit_val_batches=0)
    trainer.fit(model, regression_loader())
    assert trainer.global_step == 15
    groups = [[b] for b in range(14)] + [[14, 15]]
    ds = statscope.open_run(tmp_path / "run")
    assert ds.attrs["status"] == "completed" and ds.sizes["step"] == 15
    for layer in ("d.1", "g.1"):
        check_step_values(ds, layer, inputs.firsts(layer, groups), channel_dim=1)
    np.testing.assert_allclose(ds.loss.values, [np.mean([model.losses[b] for b in g])
                                                for g in groups], rtol=1e-6)
    assert np.isnan(ds.lr.values[14]) and (ds.lr.values[:14] == 0.1).all()


def test_a_failure_in_the_middle_of_a_step_keeps_the_loss_of_its_micro_batches(tmp_path):
    # accumulation 2, batch 5 raises: step 2 holds batch 4's forward, and now its loss
    torch.manual_seed(0)
    model, inputs = TinyNet(fail_at_batch=5), BatchInputs("bn")
    with pytest.raises(RuntimeError, match="boom at batch 5"):
        lightning_trainer([StatscopeCallback(tmp_path / "run"), inputs],
                          accumulate_grad_batches=2, limit_val_batches=0).fit(
            model, regression_loader(), regression_loader())
    groups = [[0, 1], [2, 3], [4]]
    ds = statscope.open_run(tmp_path / "run")
    assert ds.attrs["status"] == "failed" and ds.sizes["step"] == 3
    check_step_values(ds, "bn", inputs.firsts("bn", groups), channel_dim=1)
    np.testing.assert_allclose(ds.loss.values, [np.mean([model.losses[b] for b in g])
                                                for g in groups], rtol=1e-6)
    np.testing.assert_allclose(ds.lr.values[:2], [0.1, 0.05])
    assert np.isnan(ds.lr.values[2])


# -- DDP ---------------------------------------------------------------------------------------

DDP_FIT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import torch
    from integrations_support import regression_loader
    from lightning_support import ShardNet, lightning_trainer
    from statscope.integrations import StatscopeCallback

    if __name__ == "__main__":
        torch.manual_seed(0)
        trainer = lightning_trainer([StatscopeCallback(sys.argv[1])], devices=2,
                                    strategy=sys.argv[2], limit_val_batches=0)
        trainer.fit(ShardNet(), regression_loader())
""")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_ranks_under_manual_optimization_record_their_own_shards(tmp_path, strategy):
    # 64 samples, 2 ranks: Lightning's DistributedSampler (shuffled with seed 0 for training)
    # gives each rank 32; batches of 4, an optimizer step every second batch: 4 steps per
    # rank, step k's first forward is the rank's batch 2k (ShardNet's BatchNorm sees the batch)
    script = tmp_path / "fit_ddp.py"
    script.write_text(DDP_FIT.format(tests=str(Path(__file__).parent)))
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), strategy],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    dataset = regression_loader().dataset
    for rank in (0, 1):
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=rank,
                                                      shuffle=True, seed=0)
        shard = dataset.tensors[0][list(sampler)].double()
        ds = statscope.open_run(tmp_path / "run" / f"rank{rank}")
        assert ds.attrs["rank"] == rank and ds.attrs["world_size"] == 2
        assert ds.attrs["status"] == "completed" and ds.attrs["trainer_step_offset"] == 0
        assert ds.attrs["meta"]["trainer"]["world_size"] == 2
        check_step_values(ds, "bn", [shard[8 * k:8 * k + 4] for k in range(4)], channel_dim=1)
        assert np.isfinite(ds.loss.values).all() and (ds.lr.values == 0.1).all()


def test_a_tensor_lr_is_recorded_as_the_step_used_it(tmp_path):
    # torch's schedulers fill a tensor lr in place; Lightning steps them before
    # on_train_batch_end, where the callback read the lr it had kept by reference: the next
    # step's (0.05, 0.025, ... for 0.1, 0.05, ...)
    class TensorLr(TinyNet):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=torch.tensor(0.1), foreach=False)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return [opt], [{"scheduler": sched, "interval": "step"}]

    torch.manual_seed(0)
    model = TensorLr()
    lightning_trainer([StatscopeCallback(tmp_path / "run")], limit_val_batches=0,
                      max_steps=4).fit(model, regression_loader(), regression_loader())
    ds = statscope.open_run(tmp_path / "run")
    np.testing.assert_allclose(ds.lr.values, 0.1 * 0.5 ** np.arange(4), rtol=1e-6)
    np.testing.assert_allclose(ds.loss.values, model.losses, rtol=1e-6)


@pytest.mark.parametrize("kwargs, named", [
    ({"live": "tb"}, "live='tb'"), ({"meta": "x"}, "meta='x'"), ({"meta": [1, 2]}, "meta=[1, 2]")])
def test_bad_arguments_are_refused_at_construction_naming_them(tmp_path, kwargs, named):
    # live="tb" used to fail inside fit() with an AttributeError, meta="x" with a ValueError
    with pytest.raises(StatscopeError) as info:
        StatscopeCallback(tmp_path / "run", **kwargs)
    assert named in str(info.value)
    with pytest.raises(StatscopeError, match=r"path=3"):
        StatscopeCallback(3)
