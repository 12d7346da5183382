"""The built-in experiments through the Python API: settings, recording, reproducibility, resume."""

import dataclasses
import doctest
import itertools

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
from statscope.experiments import base, cifar_resnet, mnist_fc, sweep, train

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


def test_resume_replays_to_the_last_step_and_matches_an_uninterrupted_run(tmp_path, mnist_dir):
    class Crash(Exception):
        pass

    def crash(p):
        if p.step >= 25:
            raise Crash

    base = RunConfig("mnist-fc", batch_size=4, epochs=3, data_dir=mnist_dir)
    with pytest.raises(Crash):
        run_experiment(dataclasses.replace(base, out=str(tmp_path / "cut")), progress=crash,
                       progress_seconds=0)
    cut = statscope.store.read_attrs(tmp_path / "cut")
    assert cut[S.ATTR_STATUS] == S.STATUS_FAILED and cut[S.ATTR_LAST_STEP] == 24
    with pytest.raises(StoreError, match="seed: stored 0, now 1"):
        run_experiment(dataclasses.replace(base, seed=1, out=str(tmp_path / "cut"), resume=True,
                                           max_steps=44))
    seen = []
    result = run_experiment(dataclasses.replace(base, out=str(tmp_path / "cut"), resume=True,
                                                max_steps=40), progress=seen.append,
                            progress_seconds=0)
    assert [p.recording for p in seen][24:26] == [False, True]
    straight = run_experiment(dataclasses.replace(base, out=str(tmp_path / "straight"),
                                                  max_steps=40))
    assert result.steps == straight.steps == 40
    assert result.test_accuracy == straight.test_accuracy
    ra, rb = raw_arrays(result.path), raw_arrays(straight.path)
    assert all(ra[k] == rb[k] for k in rb)
    with pytest.raises(StoreError, match="already completed"):
        run_experiment(dataclasses.replace(base, out=str(tmp_path / "straight"), resume=True))


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


@pytest.mark.parametrize("module", [experiments_pkg, base, mnist_fc, cifar_resnet, sweep, train])
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
