import numpy as np
import pytest
import xarray as xr

from statscope import schema as S
from statscope.analyses import batch_vs_running, running_stats
from statscope.errors import StatscopeError

torch = pytest.importorskip("torch")


def _torch_run(momentum, n_steps=120, n=6, c=5, nbt0=0, idle=(), seed=0):
    """Train-mode BatchNorm1d on random batches; return the run Dataset and torch's buffers."""
    g = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm1d(c, momentum=momentum)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1, generator=g)
        bn.running_var.uniform_(0.5, 2, generator=g)
        bn.num_batches_tracked.fill_(nbt0)
    rm0, rv0 = bn.running_mean.clone().numpy(), bn.running_var.clone().numpy()
    bn.train()
    means, stds, counts, rms, rvs = [], [], [], [], []
    for t in range(n_steps):
        if t in idle:
            means.append(np.full(c, np.nan)), stds.append(np.full(c, np.nan))
            counts.append(0)
        else:
            x = torch.randn(n, c, generator=g) * (1 + t / 50) + t / 30
            bn(x)
            means.append(x.mean(0).numpy()), stds.append(x.std(0, unbiased=False).numpy())
            counts.append(n)
        rms.append(bn.running_mean.clone().numpy()), rvs.append(bn.running_var.clone().numpy())
    dims = (S.STEP, S.NEURON)
    norm = {"momentum": momentum, "eps": bn.eps, "track_running_stats": True,
            "num_batches_tracked": nbt0}
    ds = xr.Dataset(
        {S.BN_MEAN: (dims, np.array(means, np.float32)),
         S.BN_STD: (dims, np.array(stds, np.float32)),
         S.COUNT: (dims, np.repeat(np.array(counts)[:, None], c, 1)),
         S.RUNNING_MEAN0: ((S.NEURON,), rm0), S.RUNNING_VAR0: ((S.NEURON,), rv0)},
        coords={S.STEP: np.arange(n_steps) + 1000, S.LAYER: (S.NEURON, ["bn"] * c),
                S.UNIT: (S.NEURON, np.arange(c)), S.GROUP: (S.NEURON, np.zeros(c, int))},
        attrs={S.ATTR_PROBES: [{"name": "bn", "module": "bn", "type": "BatchNorm1d",
                                "where": "input", "channel_dim": 1, "channels": c, "groups": 1,
                                "norm": norm}]})
    return ds, np.array(rms), np.array(rvs)


@pytest.mark.parametrize("momentum, nbt0", [(0.1, 0), (0.01, 7), (None, 0), (None, 5)])
@pytest.mark.parametrize("idle", [(), (0, 3, 4, 60)])
def test_replay_matches_torch_batchnorm(momentum, nbt0, idle, monkeypatch):
    import statscope.analyses.running as running

    monkeypatch.setattr(running, "_CHUNK", 32)  # exercise the state carried across chunks
    ds, rm, rv = _torch_run(momentum, nbt0=nbt0, idle=idle)
    out = running_stats(ds, "all") if 0 not in idle else running_stats(ds, (1001, 1120))
    skip = 1 if 0 in idle else 0
    np.testing.assert_allclose(out.running_mean.values, rm[skip:], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(out.running_var.values, rv[skip:], rtol=2e-5, atol=2e-6)


def test_batch_vs_running_uses_buffers_before_each_update():
    ds, rm, rv = _torch_run(0.1)
    out = batch_vs_running(ds, 20)
    eps = 1e-5
    bm = ds[S.BN_MEAN].values[-20:].astype(np.float64)
    bs = ds[S.BN_STD].values[-20:].astype(np.float64)
    ref = (bm - rm[-21:-1]) / np.sqrt(rv[-21:-1] + eps)
    np.testing.assert_allclose(out.mean_shift.values, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.std_ratio.values,
                               np.sqrt(bs ** 2 + eps) / np.sqrt(rv[-21:-1] + eps), rtol=1e-4)
    np.testing.assert_allclose(out.rms_mean_shift.values, np.sqrt((ref ** 2).mean(0)), rtol=1e-4)


def test_batch_vs_running_from_first_step_uses_initial_buffers():
    ds, rm, rv = _torch_run(0.1, n_steps=10)
    out = batch_vs_running(ds, "all")
    np.testing.assert_allclose(out.running_mean.values[0], ds[S.RUNNING_MEAN0].values)


def test_needs_initial_buffers_and_norm_records():
    ds, _, _ = _torch_run(0.1, n_steps=10)
    with pytest.raises(StatscopeError, match="no running_mean0"):
        running_stats(ds.drop_vars(S.RUNNING_MEAN0))
    ds.attrs[S.ATTR_PROBES][0]["norm"] = None
    with pytest.raises(StatscopeError, match="no probe is the input of a torch BatchNorm"):
        running_stats(ds)


@pytest.mark.parametrize("kind", ["HeteroNorm", "InstanceNorm1d", "SwitchableNorm"])
def test_layers_with_another_update_rule_are_not_replayed_and_say_so(kind):
    bn, rm, rv = _torch_run(0.1, n_steps=30)
    other, _, _ = _torch_run(0.1, n_steps=30, seed=1)
    c = bn.sizes[S.NEURON]
    ds = xr.Dataset(
        {k: (v.dims, np.concatenate([v.values, other[k].values], axis=v.dims.index(S.NEURON)))
         for k, v in bn.data_vars.items()},
        coords={S.STEP: bn[S.STEP].values, S.LAYER: (S.NEURON, ["bn"] * c + ["hn"] * c),
                S.UNIT: (S.NEURON, np.tile(np.arange(c), 2)),
                S.GROUP: (S.NEURON, np.zeros(2 * c, int))})
    record = dict(bn.attrs[S.ATTR_PROBES][0], name="hn", module="hn", type=kind)
    ds.attrs[S.ATTR_PROBES] = [bn.attrs[S.ATTR_PROBES][0], record]
    out = running_stats(ds, "all")
    hn = (out[S.LAYER] == "hn").values
    np.testing.assert_allclose(out.running_mean.values[:, ~hn], rm, rtol=2e-5, atol=2e-6)
    assert np.isnan(out.running_mean.values[:, hn]).all()
    [note] = out.attrs["notes"]
    assert "hn" in note and kind in note and "only torch BatchNorm" in note
    ds.attrs[S.ATTR_PROBES] = [dict(record, name="bn", module="bn"), record]
    with pytest.raises(StatscopeError, match=f"bn: {kind} keeps its running statistics"):
        running_stats(ds)
