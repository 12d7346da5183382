"""The Hugging Face callback in depth: accumulation with a short last step, schedulers, bf16,
failures, resuming from a checkpoint into the same store, and the callback's arguments.

Every check compares the store with what the Trainer did, seen from outside statscope: the first
training-mode input each norm layer got in each optimizer step (forward pre-hooks, steps cut at
the Trainer's ``on_step_begin``), reduced in float64, and the learning rate the optimizer held
when it stepped.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback

import statscope
from statscope.errors import StatscopeError, StoreError
from statscope.integrations import LiveExport, StatscopeTrainerCallback
from statscope.integrations.session import loggable

from integrations_support import NormNet, RegressionData, check_step_values, hf_arguments

LAYERS = {"bn": 1, "ln": -1}  # layer: channel dim


class StepSpy(TrainerCallback):
    """Each optimizer step's first training input of ``bn`` and ``ln``, and the lr it used."""

    def __init__(self, model):
        self.steps: list[dict] = []
        self.lrs: list[float] = []
        for name in LAYERS:
            getattr(model, name).register_forward_pre_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, args):
            if module.training and self.steps and name not in self.steps[-1]:
                self.steps[-1][name] = args[0].detach().clone()
        return hook

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps.append({})

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))

    def inputs(self, layer):
        return [s[layer] for s in self.steps]


def arguments(out, **kwargs):
    """The shared test settings, at lr 0.05 and without a step limit unless given."""
    return hf_arguments(out, **{"learning_rate": 0.05, "max_steps": -1, **kwargs})


def check_values(ds, spy, rtol=2e-5, atol=2e-6):
    for layer, dim in LAYERS.items():
        check_step_values(ds, layer, spy.inputs(layer), channel_dim=dim, rtol=rtol, atol=atol)


def logged(trainer, name, n):
    """What the Trainer logged as ``name`` at global step g, at store step g - 1 (NaN else)."""
    at = {h["step"] - 1: h[name] for h in trainer.state.log_history if name in h}
    return np.array([at.get(k, np.nan) for k in range(n)])


def test_accumulation_with_a_short_last_step_eval_logging_and_a_cosine_schedule(tmp_path):
    # 10 batches an epoch, 3 per step: steps of 3, 3, 3 and 1 micro-batches, two epochs
    model = NormNet()
    spy = StepSpy(model)
    cb = StatscopeTrainerCallback(tmp_path / "run")
    args = arguments(tmp_path / "out", gradient_accumulation_steps=3, num_train_epochs=2,
                     logging_steps=3, eval_strategy="steps", eval_steps=3,
                     lr_scheduler_type="cosine", warmup_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=RegressionData(40),
                      eval_dataset=RegressionData(8, seed=1), callbacks=[cb, spy])
    with cb:
        trainer.train()
    ds = statscope.open_run(tmp_path / "run")
    assert trainer.state.global_step == len(spy.steps) == len(spy.lrs) == 8
    assert ds.sizes["step"] == 8 and ds.attrs["status"] == "completed"
    check_values(ds, spy)  # eval forwards left out, each step's first micro-batch
    lr = ds.learning_rate.values
    logged_at = np.isfinite(lr)
    # logged every 3 steps; the Trainer logs no per-step loss at the end (train_loss instead)
    assert logged_at.tolist() == [False, False, True, False, False, True, False, False]
    np.testing.assert_allclose(lr[logged_at], np.array(spy.lrs)[logged_at], rtol=1e-7)
    for name in ("loss", "eval_loss", "grad_norm"):
        np.testing.assert_allclose(ds[name].values, logged(trainer, name, 8), rtol=1e-6,
                                   err_msg=name)


def test_max_steps_mid_epoch_under_bf16_with_a_tensor_learning_rate(tmp_path):
    model = NormNet()
    spy = StepSpy(model)
    try:
        args = arguments(tmp_path / "out", bf16=True, max_steps=5, gradient_accumulation_steps=2,
                         warmup_steps=2)
    except (ValueError, ImportError) as exc:
        pytest.skip(f"bf16 on the CPU: {exc}")
    # the scheduler updates a tensor lr in place after the optimizer step
    optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.05))
    cb = StatscopeTrainerCallback(tmp_path / "run")
    trainer = Trainer(model=model, args=args, train_dataset=RegressionData(40),
                      callbacks=[cb, spy], optimizers=(optimizer, None))
    with cb:
        trainer.train()
    ds = statscope.open_run(tmp_path / "run")
    assert spy.steps[0]["bn"].dtype == torch.bfloat16  # the probes saw what the layers did
    assert trainer.state.global_step == ds.sizes["step"] == 5
    check_values(ds, spy)
    np.testing.assert_allclose(ds.learning_rate.values, spy.lrs, rtol=1e-6)
    assert spy.lrs[:3] == pytest.approx([0.0, 0.025, 0.05])


class FailingTrainer(Trainer):
    """Raises ``exc`` from ``compute_loss`` after the ``at``-th forward (1-based)."""

    def __init__(self, *args, at, exc, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.exc, self.calls = at, exc, 0

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        out = super().compute_loss(model, inputs, return_outputs, **kwargs)
        self.calls += 1
        if self.calls == self.at:
            raise self.exc("loss went wrong")
        return out


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_a_failure_in_compute_loss_keeps_the_steps_and_the_step_in_progress(tmp_path, exc):
    model = NormNet()
    spy = StepSpy(model)
    cb = StatscopeTrainerCallback(tmp_path / "run")
    # the 7th forward is the first micro-batch of the 4th step (2 per step)
    trainer = FailingTrainer(model=model, args=arguments(tmp_path / "out", max_steps=6,
                                                         gradient_accumulation_steps=2),
                             train_dataset=RegressionData(40), callbacks=[cb, spy], at=7,
                             exc=exc)
    with pytest.raises(exc, match="loss went wrong"), cb:
        trainer.train()
    ds = statscope.open_run(tmp_path / "run")
    assert ds.attrs["status"] == "failed"
    assert ds.attrs["error"] == f"{exc.__name__}: loss went wrong"
    assert trainer.state.global_step == 3 and ds.sizes["step"] == len(spy.steps) == 4
    check_values(ds, spy)
    np.testing.assert_allclose(ds.loss.values, logged(trainer, "loss", 4), rtol=1e-6)


def test_a_run_of_one_optimizer_step_has_its_offset_and_resumes_in_place(tmp_path):
    # the offset used to be written at the end of the second step only: a one-step run had
    # none, and resume=True then appended the next training after it (store step 1 for the
    # Trainer's step 1) and filed the one after that by the wrong offset
    cb = StatscopeTrainerCallback(tmp_path / "run")
    trainer = Trainer(model=NormNet(), args=arguments(tmp_path / "out", max_steps=1),
                      train_dataset=RegressionData(40), callbacks=[cb])
    with cb:
        trainer.train()
    ds = statscope.open_run(tmp_path / "run")
    assert ds.sizes["step"] == 1 and ds.attrs["trainer_step_offset"] == 1
    with pytest.raises(StoreError, match="already exists"):
        trainer.train()  # a second training without resume or overwrite is refused
    assert statscope.open_run(tmp_path / "run").attrs["status"] == "completed"
    model = NormNet(seed=1)
    spy = StepSpy(model)
    cb = StatscopeTrainerCallback(tmp_path / "run", resume=True)
    trainer = Trainer(model=model, args=arguments(tmp_path / "out", max_steps=2),
                      train_dataset=RegressionData(40), callbacks=[cb, spy])
    with cb:
        trainer.train()  # from global_step 0: replaces the run from store step 0
    ds = statscope.open_run(tmp_path / "run")
    assert ds.step.values.tolist() == [0, 1] and ds.attrs["trainer_step_offset"] == 1
    check_values(ds, spy)


class CrashAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


@pytest.mark.slow
def test_resuming_a_crashed_run_from_its_checkpoint_gives_the_uninterrupted_run(tmp_path):
    """Checkpoint at step 3 of 9, a crash at step 6, resumed from the checkpoint with
    ``eval_on_start``: the store equals an uninterrupted run's, and the evaluation at the
    resumed Trainer's start (global step 3, the state after store step 2) goes to the attrs,
    not into store step 3 (the Trainer's step 4)."""
    from export_reference import read_events
    from statscope.export import export_run

    settings = dict(gradient_accumulation_steps=2, num_train_epochs=3, save_strategy="steps",
                    save_steps=3, lr_scheduler_type="linear", warmup_steps=2)
    data = RegressionData(20)  # 5 batches: steps of 2, 2 and 1 micro-batches

    model = NormNet()
    spy = StepSpy(model)
    cb = StatscopeTrainerCallback(tmp_path / "full")
    with cb:
        Trainer(model=model, args=arguments(tmp_path / "o1", **settings), train_dataset=data,
                callbacks=[cb, spy]).train()
    full = statscope.open_run(tmp_path / "full").load()
    assert full.sizes["step"] == 9
    check_values(full, spy)

    def live():
        return LiveExport(str(tmp_path / "live"), every=2, window=2)

    cb = StatscopeTrainerCallback(tmp_path / "run", live=live(), block_steps=2)
    with pytest.raises(RuntimeError, match="crash at step 6"), cb:
        Trainer(model=NormNet(), args=arguments(tmp_path / "o2", **settings),
                train_dataset=data, callbacks=[cb, CrashAt(6)]).train()
    assert statscope.open_run(tmp_path / "run").sizes["step"] == 6
    checkpoint = str(tmp_path / "o2" / "checkpoint-3")

    resumed_args = arguments(tmp_path / "o2", eval_on_start=True, eval_strategy="steps",
                             eval_steps=100, **settings)
    refused = StatscopeTrainerCallback(tmp_path / "run")
    with pytest.raises(StoreError, match="already exists"):
        Trainer(model=NormNet(seed=1), args=resumed_args, train_dataset=data,
                eval_dataset=RegressionData(8, seed=1),
                callbacks=[refused]).train(resume_from_checkpoint=checkpoint)

    cb = StatscopeTrainerCallback(tmp_path / "run", resume=True, live=live(), block_steps=2)
    trainer = Trainer(model=NormNet(seed=1), args=resumed_args, train_dataset=data,
                      eval_dataset=RegressionData(8, seed=1), callbacks=[cb])
    with cb:
        trainer.train(resume_from_checkpoint=checkpoint)
    ds = statscope.open_run(tmp_path / "run").load()
    assert ds.step.values.tolist() == list(range(9)) and ds.attrs["status"] == "completed"
    assert ds.attrs["trainer_step_offset"] == 1
    for name in ("loss", "learning_rate", "grad_norm"):
        np.testing.assert_array_equal(ds[name].values, full[name].values, err_msg=name)
    for stat in ("bn_mean", "bn_std", "en_mean", "en_std"):
        # the same inputs; the reduction may differ in the last float32 bit with the block
        # boundaries the resumed run starts at
        np.testing.assert_allclose(ds[stat].values, full[stat].values, rtol=1e-6, atol=1e-7,
                                   err_msg=stat)
    evals = [(h["step"], h["eval_loss"]) for h in trainer.state.log_history if "eval_loss" in h]
    assert [g for g, _ in evals] == [3, 9]
    np.testing.assert_allclose(ds.eval_loss.values, [np.nan] * 8 + [evals[1][1]], rtol=1e-6)
    before = ds.attrs["scalars_before_training"]
    assert before["trainer_step"] == 3
    np.testing.assert_allclose(before["eval_loss"], evals[0][1], rtol=1e-6)

    # the live export over the crash and the resume holds what an export of the store does
    export_run(tmp_path / "run", "tensorboard", tmp_path / "after", window=2)
    live_scalars, _, _ = read_events(tmp_path / "live")
    after_scalars, _, _ = read_events(tmp_path / "after")
    assert live_scalars.keys() == after_scalars.keys() and "scalars/loss" in live_scalars
    for tag, points in after_scalars.items():
        assert live_scalars[tag] == pytest.approx(points), tag


def test_logged_values_numpy_scalars_tensors_and_odd_names_are_kept():
    # a Trainer subclass's self.log({...}) may hand numpy scalars or tensors; they used to be
    # dropped silently, and a name with a non-ASCII digit ("x²") reached the recorder as a
    # name it refuses, failing the training from on_log
    got = loggable({"acc": np.float32(0.5), "n": np.int64(3), "t": torch.tensor(2.0),
                    "x²": 1.0, "flag": np.bool_(True), "vec": torch.ones(2), "s": "text",
                    "done": True})
    assert got == {"acc": 0.5, "n": 3.0, "t": 2.0, "x_": 1.0}
    assert all(type(v) is float and k.isidentifier() for k, v in got.items())


@pytest.mark.parametrize("kwargs, named", [
    ({"live": "tb/statscope"}, "live='tb/statscope'"),
    ({"meta": "seed=0"}, "meta='seed=0'"),
    ({"meta": [1, 2]}, "meta=[1, 2]"),
])
def test_bad_arguments_are_refused_at_construction_naming_them(tmp_path, kwargs, named):
    with pytest.raises(StatscopeError) as info:
        StatscopeTrainerCallback(tmp_path / "run", **kwargs)
    assert named in str(info.value)


def test_a_path_that_is_not_one_is_refused_naming_it():
    with pytest.raises(StatscopeError, match=r"path=3"):
        StatscopeTrainerCallback(3)
