"""Per-set statistics (the pixel sets of LayerNorm, GroupNorm, InstanceNorm) and masks, against
numpy on the same tensors."""

import numpy as np
import pytest
import torch
from torch import nn

import statscope
from statscope import schema as S

SETS = list(S.SET_STATS)


def spread(values, weights=None):
    w = np.ones(len(values)) if weights is None else weights.astype(float)
    mean = (values * w[:, None]).sum(0) / w.sum()
    return mean, np.sqrt((((values - mean) ** 2) * w[:, None]).sum(0) / w.sum())


class Encoder(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.proj, self.norm = nn.Linear(4, c), nn.LayerNorm(c)

    def forward(self, x, attention_mask=None):
        return self.norm(self.proj(x))


@pytest.mark.parametrize("rule", ["forward", "manual"])  # under "manual" it was not applied
def test_layernorm_sets_are_tokens_and_a_mask_keeps_padding_out_of_every_statistic(tmp_path,
                                                                                   rule):
    torch.manual_seed(0)
    model = Encoder()
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 5, 4, generator=gen) for _ in range(6)]
    masks = [torch.rand(3, 5, generator=gen) > 0.3 for _ in range(6)]
    with statscope.record(model, tmp_path / "r", stats=[*S.DEFAULT_STATS, *SETS],
                          mask=lambda args, kwargs: kwargs["attention_mask"], step=rule) as rec:
        for x, m in zip(xs, masks):
            model(x, attention_mask=m)
            if rule == "manual":
                rec.step()
    ds = statscope.open_run(tmp_path / "r")
    for k, (x, m) in enumerate(zip(xs, masks)):
        with torch.no_grad():
            h = model.proj(x).double().numpy()
        real = h[m.numpy()]  # (tokens, C)
        np.testing.assert_allclose(ds.bn_mean.values[k], real.mean(0), atol=1e-6)
        np.testing.assert_allclose(ds.bn_std.values[k], real.std(0), rtol=1e-5)
        np.testing.assert_allclose(ds.en_std.values[k, 0], real.std(), rtol=1e-5)
        assert (ds["count"].values[k] == m.sum().item()).all()
        tm, ts = real.mean(1, keepdims=True), real.std(1, keepdims=True)
        want = [*spread(tm), *spread(ts)]
        got = [ds[name].values[k, 0] for name in SETS]
        np.testing.assert_allclose(got, np.ravel(want), rtol=1e-5, atol=1e-7)
    assert ds.set_std.attrs["long_name"]


def test_padding_holding_inf_does_not_poison_the_real_tokens(tmp_path):
    model = nn.Sequential(nn.LayerNorm(4))
    x = torch.randn(2, 3, 4)
    x[0, 2] = float("inf")
    m = torch.tensor([[True, True, False], [True, True, True]])
    with statscope.record(model, tmp_path / "r", stats=[*S.DEFAULT_STATS, *SETS]) as rec:
        rec.mask(m)
        model(x)
    ds = statscope.open_run(tmp_path / "r")
    real = x[m].double().numpy()
    np.testing.assert_allclose(ds.bn_mean.values[0], real.mean(0), atol=1e-6)
    assert np.isfinite(ds[SETS].to_array().values).all()


def test_groupnorm_sets_are_samples_by_group(tmp_path):
    model = nn.Sequential(nn.GroupNorm(2, 6))
    xs = [torch.randn(4, 6, 3, 3) * (1 + i) for i in range(3)]
    with statscope.record(model, tmp_path / "r", stats=[*S.DEFAULT_STATS, *SETS], en_groups=2):
        for x in xs:
            model(x)
    ds = statscope.open_run(tmp_path / "r")
    for k, x in enumerate(xs):
        sets = x.double().numpy().reshape(4, 2, -1)  # (sample, group, elements)
        for g in range(2):
            want = [*spread(sets[:, g].mean(1, keepdims=True)),
                    *spread(sets[:, g].std(1, keepdims=True))]
            got = [ds[name].values[k, 3 * g] for name in SETS]
            np.testing.assert_allclose(got, np.ravel(want), rtol=1e-5)


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's norm: each position of (N, C, H, W) over its channels."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_a_layernorm_of_channels_first_images_has_a_set_per_position(tmp_path):
    model = nn.Sequential(LayerNorm2d(6))
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 6, 3, 4, generator=gen) * (1 + i) + i for i in range(3)]
    masks = [torch.rand(2, 3, 4, generator=gen) > 0.3 for _ in range(3)]
    with statscope.record(model, tmp_path / "r", stats=[*S.DEFAULT_STATS, *SETS]) as rec:
        for x, m in zip(xs, masks):
            rec.mask(m)
            model(x)
    ds = statscope.open_run(tmp_path / "r")
    for k, (x, m) in enumerate(zip(xs, masks)):
        real = x.double().permute(0, 2, 3, 1).numpy()[m.numpy()]  # (positions, C)
        np.testing.assert_allclose(ds.bn_mean.values[k], real.mean(0), atol=1e-6)
        want = [*spread(real.mean(1, keepdims=True)), *spread(real.std(1, keepdims=True))]
        got = [ds[name].values[k, 0] for name in SETS]
        np.testing.assert_allclose(got, np.ravel(want), rtol=1e-5, atol=1e-7)


def test_a_mask_that_does_not_fit_leaves_the_tensor_whole(tmp_path):
    model = nn.Sequential(nn.BatchNorm2d(3))
    x = torch.randn(2, 3, 4, 4)
    with statscope.record(model, tmp_path / "r") as rec:
        rec.mask(torch.ones(2, 7, dtype=torch.bool))
        model(x)
    ds = statscope.open_run(tmp_path / "r")
    np.testing.assert_allclose(ds.bn_mean.values[0], x.double().mean((0, 2, 3)).numpy(), atol=1e-6)
    assert (ds["count"].values == 32).all()
    with pytest.raises(statscope.StatscopeError, match="mask="):
        statscope.record(model, tmp_path / "s", mask="attention_mask")


def test_the_mask_function_works_through_forward_hooks_too(tmp_path):
    torch.manual_seed(0)
    model = Encoder()
    x, m = torch.randn(2, 4, 4), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    with statscope.record(model, tmp_path / "r", mechanism="hooks",
                          mask=lambda args, kwargs: kwargs["attention_mask"]):
        model(x, attention_mask=m)
    with torch.no_grad():
        real = model.proj(x).double().numpy()[m.numpy().astype(bool)]
    ds = statscope.open_run(tmp_path / "r")
    np.testing.assert_allclose(ds.bn_std.values[0], real.std(0), rtol=1e-5)


def test_per_set_statistics_are_analysed_like_the_others(tmp_path):
    model = nn.Sequential(nn.LayerNorm(4))
    xs = [torch.randn(6, 4) * (1 + 0.1 * i) for i in range(30)]
    with statscope.record(model, tmp_path / "r", stats=[*S.DEFAULT_STATS, *SETS]):
        for x in xs:
            model(x)
    ds = statscope.open_run(tmp_path / "r")
    f = ds.statscope.fluctuation(window=20)
    want = np.std([x.double().std(1, correction=0).mean().item() for x in xs[-20:]], ddof=1)
    np.testing.assert_allclose(f.set_std.values[0], want, rtol=1e-5)


@pytest.mark.parametrize("step", ["auto", "forward", "optimizer"])
def test_a_mask_set_before_each_step_holds_for_that_step(tmp_path, step):
    # a step ends when the next one's first forward starts: the mask set in between is the
    # next step's (it was dropped with the old step's from the second step on)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5))
    seen = []
    model[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double().numpy()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(2)
    masks = [torch.rand(3, 7, generator=gen) > 0.4 for _ in range(4)]
    with statscope.record(model, tmp_path / "r", layers=["1"], step=step) as rec:
        for m in masks:
            rec.mask(m)
            model(torch.randn(3, 7, 4, generator=gen)).sum().backward()
            opt.step()
    ds = statscope.open_run(tmp_path / "r")
    assert ds["count"].values[:, 0].tolist() == [int(m.sum()) for m in masks]
    for k, (h, m) in enumerate(zip(seen, masks)):
        np.testing.assert_allclose(ds.bn_std.values[k], h[m.numpy()].std(0), rtol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_bn_kurt_of_a_masked_tensor_is_over_the_real_elements(tmp_path, compiled):
    # masked entries carried two moments only: bn_kurt came out NaN for every masked step
    from scipy import stats as sps
    torch.manual_seed(0)
    model = Encoder(c=6)
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 9, 4, generator=gen) * 3 + 1 for _ in range(3)]
    masks = [torch.rand(4, 9, generator=gen) > 0.35 for _ in range(3)]
    xs[1][~masks[1]] = 1e30  # padding far off: any leak shows in every moment
    run = torch.compile(model, backend="aot_eager") if compiled else model
    with statscope.record(model, tmp_path / "r", stats=[*S.DEFAULT_STATS, S.BN_KURT],
                          mask=lambda args, kwargs: kwargs["attention_mask"], step="forward"):
        for x, m in zip(xs, masks):
            run(x, attention_mask=m)
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes["step"] == 3
    for k, (x, m) in enumerate(zip(xs, masks)):
        with torch.no_grad():
            real = model.proj(x).double().numpy()[m.numpy()]  # (tokens, C)
        np.testing.assert_allclose(ds.bn_kurt.values[k], sps.kurtosis(real, axis=0, fisher=False),
                                   rtol=1e-4)
        np.testing.assert_allclose(ds.bn_std.values[k], real.std(0), rtol=1e-5)
