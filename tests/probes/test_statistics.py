"""Recorded statistics against a float64 numpy reference, for every layout the probes accept."""

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import statscope
from statscope import native
from statscope.errors import StatscopeError
from statscope.probes import reduce
from statscope.probes.reduce import entry_moments, step_entry
from statscope.probes.statistics import block_moments, register_statistic


def reference(x: np.ndarray, channel_dim: int, groups: int = 1) -> dict[str, np.ndarray]:
    """Per-channel and per-group statistics of one step, float64 brute force."""
    c = np.moveaxis(x.astype(np.float64), channel_dim, -1).reshape(-1, x.shape[channel_dim])
    per = c.shape[1] // groups
    en = [c[:, g * per:(g + 1) * per].ravel() for g in range(groups)]
    d = c - c.mean(0)
    with np.errstate(all="ignore"):  # constant channels: 0/0, as the probes store it
        kurt = (d ** 4).mean(0) / (d ** 2).mean(0) ** 2
    return {
        "bn_mean": c.mean(0), "bn_std": c.std(0), "bn_kurt": kurt,
        "en_mean": np.repeat([e.mean() for e in en], per), "en_std": np.repeat([e.std() for e in en], per),
    }


def assert_close(got, want, scale, what):
    # 1e-5 of the channel's std, plus the rounding of the float32 value itself
    tol = 1e-5 * scale + 2 * np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    bad = np.abs(got - want) > tol
    assert not bad.any(), f"{what}: max error {np.max(np.abs(got - want)):.3g}"


def record_tensors(tensors, module, tmp_path, **kw):
    """Feed tensors through an identity-like probe on ``module``'s input and open the run."""
    model = torch.nn.Sequential(module)
    model.train()
    with statscope.record(model, tmp_path / "run", stats=statscope.probes.STATISTICS.keys()
                          - {"bn_skew_demo"}, block_steps=kw.pop("block_steps", 7), **kw):
        for x in tensors:
            model(x)
    return statscope.open_run(tmp_path / "run").load()


class LayerNorm2d(torch.nn.LayerNorm):
    """torchvision's and timm's ConvNeXt norm: LayerNorm over the channels of (N, C, H, W)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LayerNorm2dNoBias(LayerNorm2d):
    """timm's MetaFormer norm: LayerNorm2d's forward under a name that does not end in 2d."""


class LayerNormFp32(torch.nn.LayerNorm):
    """CLIP's LayerNorm: a forward of its own that keeps the channels last."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


LAYOUTS = [
    # (module factory, shape, channel dim)
    (lambda c: torch.nn.BatchNorm1d(c), (5, 6), 1),
    (lambda c: torch.nn.BatchNorm1d(c), (4, 6, 7), 1),
    (lambda c: torch.nn.LayerNorm(c), (3, 9, 6), -1),
    (lambda c: torch.nn.BatchNorm2d(c), (2, 6, 3, 5), 1),
    (lambda c: torch.nn.GroupNorm(2, c), (2, 6, 4, 4), 1),
    (lambda c: torch.nn.BatchNorm3d(c), (2, 6, 2, 3, 2), 1),
    (lambda c: torch.nn.RMSNorm(c), (4, 6), -1),
    (lambda c: LayerNorm2d(c), (2, 6, 3, 5), 1),
    (lambda c: LayerNorm2dNoBias(c), (2, 6, 3, 5), 1),
    (lambda c: LayerNormFp32(c), (3, 5, 6), -1),
]


@pytest.mark.parametrize("make, shape, cdim", LAYOUTS)
@pytest.mark.parametrize("raw_bytes, grad", [(16 << 20, True), (16 << 20, False), (0, True)],
                         ids=["raw-block", "raw-block-no-grad", "per-step"])
def test_layouts_match_numpy(tmp_path, make, shape, cdim, raw_bytes, grad):
    gen = torch.Generator().manual_seed(1)
    xs = [(torch.randn(shape, generator=gen) * 2 + 3).requires_grad_(grad) for _ in range(10)]
    ds = record_tensors(xs, make(6), tmp_path, en_groups=2, raw_bytes=raw_bytes)
    assert ds.sizes["step"] == 10
    for i, x in enumerate(xs):
        ref = reference(x.detach().numpy(), cdim, groups=2)
        for name in ("bn_mean", "bn_std", "en_mean", "en_std"):
            assert_close(ds[name].values[i], ref[name], ref["bn_std"], f"{name} step {i}")
        np.testing.assert_allclose(ds["bn_kurt"].values[i], ref["bn_kurt"], rtol=1e-4)
        assert (ds["count"].values[i] == x.numel() // 6).all()
    assert ds.group.values.tolist() == [0, 0, 0, 1, 1, 1]


def test_a_channel_count_along_another_dim_is_refused_with_the_dim_that_fits(tmp_path):
    class Permuting(torch.nn.LayerNorm):  # a name that does not say 2d: channels last assumed
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    with pytest.raises(StatscopeError, match=r"has 5 channels along dim -1 .*expected 6; its "
                                             r"dim 1 has 6: pass channel_dim=\{'0': 1\}"):
        record_tensors([torch.randn(2, 6, 3, 5)], Permuting(6), tmp_path)


def test_channels_last_input(tmp_path):
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(2, 5, 4, 3, generator=gen).to(memory_format=torch.channels_last)
          for _ in range(3)]
    ds = record_tensors(xs, torch.nn.BatchNorm2d(5), tmp_path)
    for i, x in enumerate(xs):
        ref = reference(x.numpy(), 1)
        assert_close(ds.bn_std.values[i], ref["bn_std"], ref["bn_std"], "bn_std")


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 9), c=st.sampled_from([2, 4, 6, 8]), groups=st.sampled_from([1, 2]),
       offset=st.sampled_from([0.0, 50.0, -1e3]), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_block_and_step_moments_match_numpy(n, c, groups, offset, scale, dtype, seed):
    x = (torch.randn(3, n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
         * scale + offset).to(dtype)
    xs = x.to(torch.float64).numpy()
    mean, var, m3, m4 = block_moments(x.float() if dtype != torch.float64 else x, 4)
    for i in range(3):
        ref = reference(xs[i], -1)
        sd = ref["bn_std"]
        assert np.all(np.abs(mean[i].numpy() - ref["bn_mean"]) <= 1e-5 * sd + 1e-12)
        assert np.all(np.abs(np.sqrt(var[i].numpy()) - sd) <= 1e-5 * sd + 1e-12)
        step = entry_moments([step_entry(x[i], -1, 2)], c, 2)
        assert np.all(np.abs(step[0][0] - ref["bn_mean"])
                      <= 1e-5 * sd + 2 * np.spacing(np.float32(abs(offset) + 4 * scale)))
        assert np.all(np.abs(np.sqrt(step[1][0]) - sd) <= 1e-5 * sd + 1e-12)


# (shape, channel dim, memory format): every layout a probe meets
STEP_LAYOUTS = [
    ((7, 5), 1, None),
    ((3, 5, 4), 1, None),  # BatchNorm1d over sequences: (N, C, L)
    ((3, 4, 5), -1, None),  # LayerNorm inputs: (N, L, C)
    ((2, 5, 3, 4), 1, None),
    ((2, 5, 3, 4), 1, torch.channels_last),
    ((2, 5, 2, 3, 2), 1, None),
    ((2, 5, 2, 3, 2), 1, torch.channels_last_3d),
    ((4, 3, 5), 2, None),  # a channel dim in the middle
]


@settings(max_examples=60, deadline=None)
@given(layout=st.sampled_from(STEP_LAYOUTS), order=st.sampled_from([2, 4]),
       offset=st.sampled_from([0.0, 50.0, -1e3, 3e5]), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       outlier=st.booleans(), path=st.sampled_from(["kernel", "torch"]),
       seed=st.integers(0, 2**16))
def test_per_step_reduction_matches_numpy_for_every_layout_and_dtype(layout, order, offset, scale,
                                                                      dtype, outlier, path, seed):
    """Both CPU paths: statscope's C++ kernel (one read) and torch's ops."""
    if path == "kernel" and native.kernels() is None:
        pytest.skip(native.status())
    shape, cdim, fmt = layout
    assume(dtype != torch.float16 or abs(offset) + 200 * scale < 6e4)  # float16's range
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x * scale + offset
    if outlier:  # the first element, the shift's neighbourhood, far out in every channel
        x.view(-1)[0] += 100 * scale
    x = x.to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    ref = reference(x.double().numpy(), cdim)
    c = x.shape[cdim]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reduce, "kernels",
                      native.kernels if path == "kernel" else lambda wait=True: None)
        entry = step_entry(x, cdim, order)
    assert entry[0] == ("psums" if path == "kernel" else "sums")
    assert entry[1].dtype == torch.float64 or path == "torch"
    got = entry_moments([entry], c, order)
    sd = ref["bn_std"]
    rounding = 2 * np.spacing(np.float32(abs(offset) + 4 * scale + 100 * scale))
    assert np.all(np.abs(got[0][0] - ref["bn_mean"]) <= 1e-5 * sd + rounding)
    assert np.all(np.abs(np.sqrt(got[1][0]) - sd) <= 1e-5 * sd + 1e-300)
    if order == 4:
        with np.errstate(all="ignore"):
            kurt = got[3][0] / got[1][0] ** 2
        ok = sd > 1e-6 * (abs(offset) + scale)  # kurtosis of a channel quantized to one value
        np.testing.assert_allclose(kurt[ok], ref["bn_kurt"][ok], rtol=1e-4)


@pytest.mark.parametrize("raw_bytes", [16 << 20, 0], ids=["raw-block", "per-step"])
@pytest.mark.parametrize("make, shape", [(lambda: torch.nn.LayerNorm(3), (4, 5, 3)),
                                         (lambda: torch.nn.GroupNorm(1, 3), (8, 3))])
def test_float32_activations_near_1e19_keep_a_finite_std(tmp_path, make, shape, raw_bytes):
    # issue 10, item 7: the std (~7.8e18) fits float32, the squares of the deviations do not
    gen = torch.Generator().manual_seed(0)
    xs = [(torch.randn(shape, generator=gen, dtype=torch.float64) * 7.8e18 + 1e19).float()
          for _ in range(3)]
    cdim = -1 if len(shape) == 3 else 1
    ds = record_tensors(xs, make(), tmp_path, raw_bytes=raw_bytes)
    for i, x in enumerate(xs):
        ref = reference(x.double().numpy(), cdim)
        assert np.isfinite(ds.bn_std.values[i]).all() and np.isfinite(ds.en_std.values[i]).all()
        np.testing.assert_allclose(ds.bn_std.values[i], ref["bn_std"], rtol=1e-5)
        np.testing.assert_allclose(ds.bn_mean.values[i], ref["bn_mean"], rtol=1e-6)
        np.testing.assert_allclose(ds.en_std.values[i], ref["en_std"], rtol=1e-5)
        np.testing.assert_allclose(ds.bn_kurt.values[i], ref["bn_kurt"], rtol=1e-4)


def test_float32_large_offset_beats_naive_formula():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 16, generator=gen) + 1e4  # N=4: E[x^2]-E[x]^2 fails here in float32
    mean, var = block_moments(x, 2)
    ref = x[0].double().var(0, correction=0)
    naive = (x[0] * x[0]).mean(0) - x[0].mean(0) ** 2
    assert torch.all((var[0].sqrt() - ref.sqrt()).abs() <= 1e-5 * ref.sqrt())
    assert torch.any((naive.double().clamp_min(0).sqrt() - ref.sqrt()).abs() > 1e-2 * ref.sqrt())


def test_registered_statistic_is_recorded(tmp_path):
    register_statistic("bn_skew_demo", lambda m: m.m3 / m.var ** 1.5, order=4)
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(7, 3, generator=gen).exp() for _ in range(4)]
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    with statscope.record(model, tmp_path / "run", stats=["bn_mean", "bn_std", "bn_skew_demo"]):
        for x in xs:
            model(x)
    ds = statscope.open_run(tmp_path / "run")
    want = np.stack([scipy.stats.skew(x.double().numpy(), axis=0) for x in xs])
    np.testing.assert_allclose(ds.bn_skew_demo.values, want, rtol=1e-4)
    with pytest.raises(StatscopeError, match="bn_skew_demo"):
        register_statistic("bn_skew_demo", lambda m: m.mean)
    with pytest.raises(StatscopeError, match="stats: 'nope' is not a known statistic"):
        statscope.record(model, tmp_path / "other", stats=["nope"])
