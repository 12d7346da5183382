"""The Hugging Face callback on real ``Trainer.train`` runs of a tiny BERT built from a config."""

import gc

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback

import statscope
from statscope.integrations import StatscopeTrainerCallback

from integrations_support import TokenData, check_step_values, hf_arguments, tiny_bert

LAYER = "bert.embeddings.LayerNorm"


def hook_training_inputs(module):
    """Every training-mode input of ``module``, in order."""
    inputs = []
    module.register_forward_pre_hook(
        lambda m, args: inputs.append(args[0].detach().clone()) if m.training else None)
    return inputs


def test_one_recorded_step_per_optimizer_step_with_values_and_logs(tmp_path):
    model = tiny_bert()
    inputs = hook_training_inputs(model.bert.embeddings.LayerNorm)
    cb = StatscopeTrainerCallback(tmp_path / "run", meta={"note": "tiny"})
    args = hf_arguments(tmp_path / "out", gradient_accumulation_steps=2, eval_strategy="steps",
                        eval_steps=3, per_device_eval_batch_size=4)
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(64),
                      eval_dataset=TokenData(8, seed=1), callbacks=[cb])
    with cb:
        trainer.train()
    ds = statscope.open_run(tmp_path / "run")
    assert trainer.state.global_step == 6 and len(inputs) == 12  # eval forwards not in inputs
    assert ds.sizes["step"] == 6 and ds.attrs["status"] == "completed"
    assert sorted(set(ds.layer.values)) == [
        LAYER, "bert.encoder.layer.0.attention.output.LayerNorm",
        "bert.encoder.layer.0.output.LayerNorm"]
    check_step_values(ds, LAYER, inputs[::2], channel_dim=-1)  # each step's first micro-batch
    # what the Trainer logged at global step g is in store step g - 1
    logged = {(h["step"] - 1, k): v for h in trainer.state.log_history for k, v in h.items()}
    for name in ("loss", "learning_rate", "grad_norm", "eval_loss"):
        got = ds[name].values
        want = [logged.get((k, name), np.nan) for k in range(6)]
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
    assert np.isfinite(ds.eval_loss.values).tolist() == [False, False, True] * 2
    meta = ds.attrs["meta"]
    assert (meta["integration"], meta["batch_size"], meta["gradient_accumulation_steps"],
            meta["model_type"], meta["note"]) == ("hf", 4, 2, "bert", "tiny")
    assert meta["training_arguments"]["eval_steps"] == 3
    assert ds.attrs["trainer_step_offset"] == 1  # exports write store step k at k + 1


def test_an_evaluation_before_the_first_step_goes_to_the_attrs_not_into_step_0(tmp_path):
    # eval_on_start logs at global_step 0, before the first optimizer step (store step 0 is
    # global_step 1); with eval_steps=1 step 1's evaluation would have overwritten it
    cb = StatscopeTrainerCallback(tmp_path / "run")
    args = hf_arguments(tmp_path / "out", max_steps=3, eval_strategy="steps", eval_steps=1,
                        eval_on_start=True, per_device_eval_batch_size=4)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=TokenData(16),
                      eval_dataset=TokenData(8, seed=1), callbacks=[cb])
    with cb:
        trainer.train()
    evals = [(h["step"], h["eval_loss"]) for h in trainer.state.log_history if "eval_loss" in h]
    assert [g for g, _ in evals] == [0, 1, 2, 3]
    ds = statscope.open_run(tmp_path / "run")
    np.testing.assert_allclose(ds.eval_loss.values, [v for _, v in evals[1:]], rtol=1e-6)
    before = ds.attrs["scalars_before_training"]
    assert before["trainer_step"] == 0
    np.testing.assert_allclose(before["eval_loss"], evals[0][1], rtol=1e-6)


class Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise RuntimeError("boom at step 3")


def test_a_failure_inside_the_context_marks_the_run_failed_and_propagates(tmp_path):
    cb = StatscopeTrainerCallback(tmp_path / "run")
    trainer = Trainer(model=tiny_bert(), args=hf_arguments(tmp_path / "out"),
                      train_dataset=TokenData(64), callbacks=[cb, Boom()])
    with pytest.raises(RuntimeError, match="boom at step 3"), cb:
        trainer.train()
    ds = statscope.open_run(tmp_path / "run")
    assert ds.attrs["status"] == "failed" and "RuntimeError: boom at step 3" in ds.attrs["error"]
    assert ds.sizes["step"] == 3


def test_a_failure_without_the_context_is_marked_when_the_callback_goes(tmp_path):
    cb = StatscopeTrainerCallback(tmp_path / "run")
    trainer = Trainer(model=tiny_bert(), args=hf_arguments(tmp_path / "out"),
                      train_dataset=TokenData(64), callbacks=[cb, Boom()])
    with pytest.raises(RuntimeError, match="boom at step 3"):
        trainer.train()
    assert statscope.open_run(tmp_path / "run").attrs["status"] == "running"
    del cb, trainer
    gc.collect()
    ds = statscope.open_run(tmp_path / "run")
    assert ds.attrs["status"] == "failed"
    assert "without reporting its end" in ds.attrs["error"]


def test_each_checkpoint_is_saved_once_the_store_committed_its_steps(tmp_path):
    """on_save commits the store up to the checkpoint's step, which ends (and reaches the store
    within flush_seconds) at the next step's begin, so that logs at an epoch's end join it."""
    from statscope.store import read_attrs

    seen = []

    class Spy(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            seen.append((state.global_step, read_attrs(tmp_path / "run").get("n_steps", 0)))

    cb = StatscopeTrainerCallback(tmp_path / "run")
    args = hf_arguments(tmp_path / "out", save_strategy="steps", save_steps=2)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=TokenData(64),
                      callbacks=[cb, Spy()])
    with cb:
        trainer.train()
    assert seen == [(2, 1), (4, 3), (6, 5)]  # store step k is the Trainer's step k + 1
    ds = statscope.open_run(tmp_path / "run")
    assert ds.sizes["step"] == 6 and np.isfinite(ds.loss.values).all()
