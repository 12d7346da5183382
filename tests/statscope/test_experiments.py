"""The built-in experiments through the Python API: settings, recording, reproducibility, resume."""

import dataclasses
import doctest
import itertools
import os
import re
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import statscope
from statscope import schema as S
from statscope.errors import StatscopeError, StoreError
from statscope.experiments import EXPERIMENTS, RunConfig, run_experiment, run_name
from statscope.experiments.cifar_resnet import random_crop_flip, resnet18
from statscope.experiments.datasets import load_dataset

import statscope.experiments as experiments_pkg
from statscope.experiments import (base, checkpoint, cifar_resnet, mnist_fc, preflight, sweep,
                                   train)

from test_experiments_support import raw_arrays, write_cifar

pytestmark = pytest.mark.usefixtures("offline")


def test_registry_and_defaults_follow_the_paper():
    assert set(EXPERIMENTS) == {"mnist-fc", "cifar-resnet18"}
    cfg = RunConfig("mnist-fc", batch_size=4).resolved()
    assert (cfg.epochs, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.dataset) == \
        (20, 0.1 * 4 / 128, 0.9, 5e-4, "mnist")
    assert RunConfig("mnist-fc", batch_size=128).resolved().lr == 0.1
    assert RunConfig("mnist-fc", batch_size=4, lr=0.05).resolved().lr == 0.05
    cifar = EXPERIMENTS["cifar-resnet18"]
    assert cifar.epochs == 200
    assert [cifar.lr_at(e, 200, 0.1) for e in (0, 99, 100, 149, 150, 199)] == \
        pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_run_name_from_settings():
    assert run_name(RunConfig("mnist-fc", batch_size=4)) == "mnist-fc_bs4_seed0_bn"
    assert run_name(RunConfig("mnist-fc", batch_size=128, seed=2, norm="HN", lr=0.05,
                              dataset="fashion-mnist")) == \
        "mnist-fc_bs128_seed2_hn_lr0.05_fashion-mnist"
    assert RunConfig("mnist-fc", batch_size=4).resolved().out.endswith("runs/mnist-fc_bs4_seed0_bn")


@pytest.mark.parametrize("kwargs, match", [
    ({"experiment": "mnist-conv"}, r"experiment='mnist-conv': unknown experiment; known: "
                                   r"mnist-fc, cifar-resnet18"),
    ({"batch_size": 0}, r"batch_size=0: expected a positive int"),
    ({"batch_size": 2.5}, r"batch_size=2.5"),
    ({"epochs": -1}, r"epochs=-1"),
    ({"device": "tpu"}, r"device='tpu': expected one of auto, cpu, cuda"),
    ({"lr": 0.0}, r"lr=0.0"),
    ({"dataset": "cifar10"}, r"dataset='cifar10': mnist-fc takes mnist, fashion-mnist"),
    ({"overwrite": True, "resume": True}, r"choose one"),
    ({"lr": float("inf")}, r"lr=inf: expected a finite positive number"),
    ({"momentum": float("nan")}, r"momentum=nan: expected a finite non-negative number"),
    ({"seed": 2**63 - 1}, r"seed=9223372036854775807: expected an int in 0..9223372036854775806"),
    ({"seed": -1}, r"seed=-1"),
    ({"threads": 100_000}, r"threads=100000: expected an int in 0..1024"),
    ({"out": ""}, r"out='': expected a path or URL"),
])
def test_bad_settings_name_the_value(kwargs, match):
    kwargs = {"experiment": "mnist-fc", **kwargs}
    with pytest.raises(StatscopeError, match=match):
        RunConfig(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_unavailable_cuda_is_an_error(tmp_path, mnist_dir):
    with pytest.raises(StatscopeError, match=r"device='cuda': CUDA is not available"):
        run_experiment(RunConfig("mnist-fc", batch_size=4, device="cuda", data_dir=mnist_dir,
                                 out=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()


def _reference_statistics(cfg, steps):
    """Replay the documented procedure independently, capturing each norm's input in float64."""
    data = load_dataset("mnist", cfg.data_dir)
    torch.manual_seed(cfg.seed)
    model = EXPERIMENTS["mnist-fc"].build_model("bn", 10)
    x = data.normalize(data.train_x).reshape(len(data.train_x), -1)
    captured = []
    for i in range(1, 5):
        getattr(model, f"norm{i}").register_forward_pre_hook(
            lambda m, args: captured.append(args[0].detach().double().numpy()))
    lr = 0.1 * cfg.batch_size / 128
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    per_epoch = len(x) // cfg.batch_size
    losses, rows = [], []
    for _ in range(-(-steps // per_epoch)):
        perm = torch.randperm(len(x), generator=shuffle)
        for i in range(per_epoch):
            if len(losses) == steps:
                break
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            captured.clear()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), data.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            rows.append([a.copy() for a in captured])
    ref = {}
    ref[S.BN_MEAN] = np.array([np.concatenate([a.mean(0) for a in r]) for r in rows])
    ref[S.BN_STD] = np.array([np.concatenate([a.std(0) for a in r]) for r in rows])
    ref[S.EN_MEAN] = np.array([np.concatenate([np.full(128, a.mean()) for a in r]) for r in rows])
    ref[S.EN_STD] = np.array([np.concatenate([np.full(128, a.std()) for a in r]) for r in rows])
    return ref, np.array(losses), data


def test_recorded_statistics_equal_a_recomputation_on_the_same_batches(tmp_path, mnist_dir):
    cfg = RunConfig("mnist-fc", batch_size=8, epochs=3, seed=3, data_dir=mnist_dir,
                    out=str(tmp_path / "run"))
    result = run_experiment(cfg)
    assert result.steps == 24 and len(result.test_accuracy) == 3 and result.dataset == "mnist"
    ds = statscope.open_run(result.path)
    ref, losses, data = _reference_statistics(cfg, 24)
    # the training set's global pixel mean and std, computed here independently
    pixels = data.train_x.numpy().astype(np.float64) / 255
    assert data.mean == pytest.approx((pixels.mean(),))
    assert data.std == pytest.approx((pixels.std(),))
    assert list(np.unique(ds[S.LAYER].values)) == ["norm1", "norm2", "norm3", "norm4"]
    for name, expected in ref.items():
        np.testing.assert_allclose(ds[name].values, expected, rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(ds["loss"].values, losses, rtol=1e-5)
    assert np.all(ds["lr"].values == pytest.approx(0.1 * 8 / 128))
    acc = ds["test_acc"].values
    assert list(np.flatnonzero(np.isfinite(acc))) == [7, 15, 23]
    assert tuple(acc[[7, 15, 23]]) == result.test_accuracy
    meta = ds.attrs[S.ATTR_META]
    assert {meta[k] for k in (S.META_BATCH_SIZE, S.META_SEED, S.META_EPOCHS)} == {8, 3}
    assert (meta[S.META_DATASET], meta[S.META_NORM], meta["experiment"]) == ("mnist", "bn",
                                                                            "mnist-fc")
    assert ds.attrs[S.ATTR_VERSIONS]["torch"] == torch.__version__
    assert ds.attrs[S.ATTR_STATUS] == S.STATUS_COMPLETED
    assert result.probe_overhead == ds.attrs[S.ATTR_PROBE_OVERHEAD] > 0


def test_same_seed_gives_identical_stores_and_another_seed_does_not(tmp_path):
    def run(name, seed):
        return run_experiment(RunConfig("mnist-fc", batch_size=4, max_steps=300, seed=seed,
                                        dataset="mnist-5k-subset", out=str(tmp_path / name))).path

    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    ra, rb, rc = raw_arrays(a), raw_arrays(b), raw_arrays(c)
    assert ra.keys() == rb.keys() and all(ra[k] == rb[k] for k in ra)
    assert ra[S.BN_STD] != rc[S.BN_STD]


def test_fallback_to_the_shipped_subset_is_recorded(tmp_path):
    with pytest.warns(statscope.StatscopeWarning, match="mnist-5k-subset"):
        result = run_experiment(RunConfig("mnist-fc", batch_size=4, max_steps=5,
                                          out=str(tmp_path / "r")))
    assert result.dataset == "mnist-5k-subset"
    assert statscope.open_run(result.path).attrs[S.ATTR_META][S.META_DATASET] == "mnist-5k-subset"


class Crash(Exception):
    pass


_BASE = dict(experiment="mnist-fc", batch_size=4, epochs=3)  # 16 steps an epoch on mnist_dir


def _cut(tmp_path, mnist_dir, name, at=25, **kwargs):
    """A run stopped by an exception in its progress callback after ``at`` steps."""
    def crash(p):
        if p.step >= at:
            raise Crash

    out = str(tmp_path / name)
    with pytest.raises(Crash):
        run_experiment(RunConfig(**_BASE, data_dir=mnist_dir, out=out, **kwargs), progress=crash,
                       progress_seconds=0)
    return out


def _resume(out, mnist_dir, max_steps=40, **kwargs):
    seen = []
    result = run_experiment(RunConfig(**_BASE, data_dir=mnist_dir, out=out, resume=True,
                                      max_steps=max_steps, **kwargs),
                            progress=seen.append, progress_seconds=0)
    return result, seen


def _checkpoint_step(path):
    return torch.load(path, weights_only=True)["step"]


@pytest.fixture
def straight(tmp_path, mnist_dir):
    """The uninterrupted run the resumed ones must equal."""
    return run_experiment(RunConfig(**_BASE, data_dir=mnist_dir, max_steps=40,
                                    out=str(tmp_path / "straight")))


def _assert_same_run(result, straight):
    assert result.steps == straight.steps == 40
    assert result.test_accuracy == straight.test_accuracy
    ra, rb = raw_arrays(result.path), raw_arrays(straight.path)
    assert ra.keys() == rb.keys() and all(ra[k] == rb[k] for k in rb)
    attrs = statscope.store.read_attrs(result.path)
    assert attrs[S.ATTR_STATUS] == S.STATUS_COMPLETED and attrs[S.ATTR_N_STEPS] == 40
    assert attrs["test_accuracy"] == list(straight.test_accuracy)


def test_an_interrupted_run_leaves_checkpoints_beside_its_store(tmp_path, mnist_dir):
    out = _cut(tmp_path, mnist_dir, "cut")
    cut = statscope.store.read_attrs(out)
    assert cut[S.ATTR_STATUS] == S.STATUS_FAILED and cut[S.ATTR_LAST_STEP] == 24
    current, previous = checkpoint.checkpoint_paths(out)
    assert current == out + ".checkpoint.pt" and previous == out + ".checkpoint.prev.pt"
    # the interrupted step, and the end of epoch 1 before it
    assert (_checkpoint_step(current), _checkpoint_step(previous)) == (25, 16)
    assert not any(name.startswith("checkpoint") for name in os.listdir(out))


def test_resume_continues_from_the_interrupted_step(tmp_path, mnist_dir, straight):
    out = _cut(tmp_path, mnist_dir, "cut")
    result, seen = _resume(out, mnist_dir)
    assert (result.resumed_at, result.checkpoint_step, result.replayed_steps) == (25, 25, 0)
    assert [p.step for p in seen][0] == 26 and all(p.recording for p in seen)
    _assert_same_run(result, straight)
    assert not any(os.path.exists(p) for p in checkpoint.checkpoint_paths(out))  # completed


def test_resume_replays_only_the_steps_after_an_older_checkpoint(tmp_path, mnist_dir, straight,
                                                                  monkeypatch):
    out = _cut(tmp_path, mnist_dir, "cut")
    os.remove(out + ".checkpoint.pt")
    steps = []
    sgd_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step",
                        lambda self, *a, **k: (steps.append(1), sgd_step(self, *a, **k))[1])
    result, seen = _resume(out, mnist_dir)
    assert (result.resumed_at, result.checkpoint_step, result.replayed_steps) == (25, 16, 9)
    assert len(steps) == 40 - 16  # the optimizer ran only from the checkpoint on
    assert [(p.step, p.recording) for p in seen][:10] == \
        [(s, False) for s in range(17, 26)] + [(26, True)]
    _assert_same_run(result, straight)


def test_a_checkpoint_ahead_of_the_store_is_passed_over(tmp_path, mnist_dir, straight):
    # after a hard kill the newest checkpoint can be ahead of the steps the store committed
    out = _cut(tmp_path, mnist_dir, "cut")
    later = _cut(tmp_path, mnist_dir, "later", at=36)
    shutil.copy(later + ".checkpoint.pt", out + ".checkpoint.pt")
    assert _checkpoint_step(out + ".checkpoint.pt") == 36
    result, _ = _resume(out, mnist_dir)
    assert (result.checkpoint_step, result.replayed_steps) == (16, 9)
    _assert_same_run(result, straight)


def test_resume_without_a_checkpoint_replays_from_step_0(tmp_path, mnist_dir, straight):
    out = _cut(tmp_path, mnist_dir, "cut")
    for path in checkpoint.checkpoint_paths(out):
        os.remove(path)
    with pytest.raises(StoreError, match="seed: stored 0, now 1"):
        _resume(out, mnist_dir, max_steps=44, seed=1)
    result, seen = _resume(out, mnist_dir)
    assert (result.resumed_at, result.checkpoint_step, result.replayed_steps) == (25, None, 25)
    assert [p.recording for p in seen][24:26] == [False, True]
    _assert_same_run(result, straight)
    with pytest.raises(StoreError, match="already completed"):
        _resume(straight.path, mnist_dir)
    # checkpoints only ahead of the store: replay from 0, with a warning saying why
    out = _cut(tmp_path, mnist_dir, "cut2", at=10)
    later = _cut(tmp_path, mnist_dir, "later", at=36)
    shutil.copy(later + ".checkpoint.pt", out + ".checkpoint.pt")
    assert not os.path.exists(out + ".checkpoint.prev.pt")  # stopped inside epoch 1
    with pytest.warns(statscope.StatscopeWarning, match=r"no usable checkpoint.*ahead of the "
                                                         r"store's next step 10.*step 36"):
        result, _ = _resume(out, mnist_dir)
    assert (result.checkpoint_step, result.replayed_steps) == (None, 10)
    _assert_same_run(result, straight)


def _garble(path, other):
    with open(path, "wb") as handle:
        handle.write(b"not a checkpoint")


def _truncate(path, other):
    os.truncate(path, 300)


@pytest.mark.parametrize("damage, match", [
    (_garble, r"cannot be read"),
    (_truncate, r"cannot be read"),
    (lambda path, other: torch.save({"format": 99}, path), r"format 99, expected 1"),
    (lambda path, other: shutil.copy(other, path),
     r"made with other settings than this run \(seed: checkpoint 1, now 0\)"),
])
def test_a_damaged_or_foreign_checkpoint_is_an_error_naming_the_file(tmp_path, mnist_dir, damage,
                                                                      match):
    out = _cut(tmp_path, mnist_dir, "cut")
    other = _cut(tmp_path, mnist_dir, "other", seed=1) + ".checkpoint.pt"
    damage(out + ".checkpoint.pt", other)
    before = statscope.store.read_attrs(out)
    with pytest.raises(StoreError, match=rf"checkpoint '{re.escape(out)}.checkpoint.pt': {match}"
                                         r".*delete it to resume by replaying the run from step 0"):
        _resume(out, mnist_dir)
    assert statscope.store.read_attrs(out) == before  # nothing written


@pytest.mark.parametrize("keep_checkpoint", [True, False])
def test_a_failed_run_with_every_step_recorded_is_finished(tmp_path, mnist_dir, keep_checkpoint):
    # it died after its last step, in the final report: failed, but every step is in the store
    def crash(p):
        calls.extend([1] if p.step == 20 else [])
        if len(calls) == 2:  # the report after the final evaluation
            raise Crash

    calls = []
    config = RunConfig(**_BASE, data_dir=mnist_dir, max_steps=20, out=str(tmp_path / "cut"))
    with pytest.raises(Crash):
        run_experiment(config, progress=crash, progress_seconds=0)
    cut = statscope.store.read_attrs(config.out)
    assert cut[S.ATTR_STATUS] == S.STATUS_FAILED and cut[S.ATTR_N_STEPS] == 20
    with pytest.raises(StoreError, match=r"holds steps 0..19, more than the 10 steps"):
        run_experiment(dataclasses.replace(config, resume=True, max_steps=10))
    if not keep_checkpoint:
        for path in checkpoint.checkpoint_paths(config.out):
            os.remove(path)
    result = run_experiment(dataclasses.replace(config, resume=True))
    straight = run_experiment(dataclasses.replace(config, out=str(tmp_path / "straight")))
    assert result.replayed_steps == (0 if keep_checkpoint else 20)
    assert result.checkpoint_step == (20 if keep_checkpoint else None)
    assert result.test_accuracy == straight.test_accuracy and len(result.test_accuracy) == 2
    attrs = statscope.store.read_attrs(config.out)
    assert attrs[S.ATTR_STATUS] == S.STATUS_COMPLETED and attrs[S.ATTR_ERROR] is None
    assert attrs["test_accuracy"] == list(straight.test_accuracy)
    ra, rb = raw_arrays(result.path), raw_arrays(straight.path)
    assert ra.keys() == rb.keys() and all(ra[k] == rb[k] for k in rb)


def test_stores_with_checkpoints_beside_them_read_as_before(tmp_path, mnist_dir):
    import warnings

    import zarr

    from statscope.dashboards.data import RunCatalog

    out = _cut(tmp_path / "runs", mnist_dir, "cut")
    assert os.path.exists(out + ".checkpoint.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert statscope.store.find_runs(tmp_path / "runs") == [out]
        assert statscope.open_run(out).sizes["step"] == 25
        assert statscope.open_runs(str(tmp_path / "runs")).sizes["run"] == 1
        assert S.BN_MEAN in zarr.open_group(out, mode="r").array_keys()
        assert RunCatalog(tmp_path / "runs").names() == ["cut"]


def test_norm_choice_is_used_and_probed(tmp_path, mnist_dir):
    result = run_experiment(RunConfig("mnist-fc", batch_size=4, norm="hn_g8", max_steps=3,
                                      en_groups=8, data_dir=mnist_dir, out=str(tmp_path / "r")))
    attrs = statscope.store.read_attrs(result.path)
    assert [(p["type"], p["groups"]) for p in attrs[S.ATTR_PROBES]] == [("HeteroNorm", 8)] * 4
    assert attrs[S.ATTR_META][S.META_NORM] == "hn_g8"


@pytest.mark.parametrize("norm, bs, match", [
    ("in", 4, r"norm='in' with batch_size=4: input shape \(4, 128\): norm in needs pixel set "
              r"'instance'"),
    ("bn", 1, r"norm='bn' with batch_size=1: Expected more than 1 value per channel"),
    ("nope", 4, r"norm='nope': unknown norm; known: bn, in"),
])
def test_a_norm_that_cannot_work_is_an_error_before_anything_is_written(tmp_path, mnist_dir,
                                                                        norm, bs, match):
    with pytest.raises(StatscopeError, match=match):
        run_experiment(RunConfig("mnist-fc", batch_size=bs, norm=norm, data_dir=mnist_dir,
                                 out=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()


def test_batch_larger_than_the_dataset_is_an_error(tmp_path, mnist_dir):
    with pytest.raises(StatscopeError, match=r"batch_size=65: larger than the training set of "
                                             r"mnist \(64 images\)"):
        run_experiment(RunConfig("mnist-fc", batch_size=65, data_dir=mnist_dir,
                                 out=str(tmp_path / "r")))


def test_cifar_resnet18_trains_and_records_every_norm(tmp_path):
    folder = tmp_path / "cifar"
    write_cifar(folder, per_batch=8)
    result = run_experiment(RunConfig("cifar-resnet18", batch_size=4, norm="hn", max_steps=2,
                                      data_dir=str(folder), out=str(tmp_path / "r")))
    attrs = statscope.store.read_attrs(result.path)
    probes = attrs[S.ATTR_PROBES]
    assert len(probes) == 20 and {p["type"] for p in probes} == {"HeteroNorm"}
    assert [p["channels"] for p in probes][:3] == [64, 64, 64]
    assert attrs[S.ATTR_N_STEPS] == 2 and result.dataset == "cifar10"
    assert attrs[S.ATTR_META]["lr_milestones"] == [100, 150]


def test_resnet18_has_the_cifar_shape():
    model = resnet18("bn")
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_random_crop_flip_takes_a_padded_crop_flipped_or_not():
    x = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)
    y = random_crop_flip(x, torch.Generator().manual_seed(0), padding=2)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)))
    found = []
    for b in range(len(x)):
        matches = [(dy, dx, flip) for dy, dx, flip in itertools.product(range(5), range(5), (0, 1))
                   if np.array_equal(y[b].numpy(), (lambda c: c[..., ::-1] if flip else c)(
                       padded[b, :, dy:dy + 8, dx:dx + 8]))]
        assert matches, b
        found.append(matches[0])
    offsets = {(dy, dx) for dy, dx, _ in found}
    flips = sum(f for _, _, f in found)
    assert len(offsets) > 10 and 16 < flips < 48


def test_the_largest_seed_trains(tmp_path, mnist_dir):
    result = run_experiment(RunConfig(**_BASE, seed=base.MAX_SEED, max_steps=2, data_dir=mnist_dir,
                                      out=str(tmp_path / "r")))
    assert result.steps == 2


@pytest.mark.parametrize("module", [experiments_pkg, base, checkpoint, mnist_fc, cifar_resnet,
                                    preflight, sweep, train])
def test_docstring_examples_run(module):
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failures == 0 and tried > 0


def test_registry_and_run_commands_parser_do_not_import_torch():
    import subprocess
    import sys

    code = ("import argparse, sys; from statscope.commands import run; "
            "run.register(argparse.ArgumentParser().add_subparsers()); "
            "import statscope.experiments.sweep; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 6), c=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6),
       padding=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
def test_random_crop_flip_is_always_a_crop_of_the_padded_image(b, c, h, w, padding, seed):
    x = torch.randint(1, 256, (b, c, h, w), dtype=torch.uint8)
    y = random_crop_flip(x, torch.Generator().manual_seed(seed), padding=padding)
    assert y.shape == x.shape and y.dtype == x.dtype
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    for i in range(b):
        crops = [padded[i, :, dy:dy + h, dx:dx + w] for dy in range(2 * padding + 1)
                 for dx in range(2 * padding + 1)]
        assert any(np.array_equal(y[i].numpy(), crop) or
                   np.array_equal(y[i].numpy(), crop[..., ::-1]) for crop in crops)
