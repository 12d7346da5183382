"""Distributed training: ranks started by torchrun (gloo on 127.0.0.1) each record their own batch
statistics; open_run stacks them along ``rank`` and merge_ranks gives SyncBatchNorm's global
statistics exactly."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import statscope
from statscope.ranks import merge_ranks
from statscope.store import ProbeInfo
from statscope.writer import write_run

TRAIN = textwrap.dedent("""
    import json, os, sys
    import numpy as np, torch, torch.distributed as dist
    from torch import nn
    import statscope

    out, wrap, die_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    if wrap == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard
        fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs = {}
    bn = (model.module if wrap == "ddp" else model)[1]

    def keep(module, args):
        inputs[len(inputs)] = args[0].detach().double().tolist()

    bn.register_forward_pre_hook(keep)
    with statscope.record(model, out, flush_seconds=0.05, block_steps=2):
        for step in range(6):
            gen = torch.Generator().manual_seed(100 * rank + step)
            x = torch.randn(2 + rank, 3, generator=gen) * (1 + rank) + rank
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            if rank == 1 and step == die_at:
                import time; time.sleep(0.5)  # the writer commits what ended, then the rank dies
                os._exit(1)
    with open(f"{out}.inputs{rank}.json", "w") as f:
        json.dump(inputs, f)
    dist.destroy_process_group()
""")


def torchrun(tmp_path, wrap, die_at=-1, timeout=180):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    out = tmp_path / wrap
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), str(out), wrap, str(die_at)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return out, proc


def inputs(out, rank):
    with open(f"{out}.inputs{rank}.json") as f:
        seen = json.load(f)
    return [np.array(v) for _, v in sorted(seen.items(), key=lambda kv: int(kv[0]))]


def test_torchrun_ddp_records_each_rank_and_merges_exactly(tmp_path):
    out, proc = torchrun(tmp_path, "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = statscope.open_run(out)
    assert ds.sizes == {"rank": 2, "step": 6, "neuron": 4}
    assert ds.layer.values.tolist() == ["1"] * 4  # no "module." prefix from DDP
    assert ds.attrs["ranks"]["1"]["rank"] == 1 and ds.attrs["world_size"] == 2
    xs = [inputs(out, r) for r in (0, 1)]
    for r in (0, 1):
        want = np.stack([x.mean(0) for x in xs[r]])
        np.testing.assert_allclose(ds.bn_mean.sel(rank=r).values, want, atol=1e-6)
        assert (ds["count"].sel(rank=r).values == 2 + r).all()
    merged = ds.statscope.merge_ranks() if hasattr(ds.statscope, "merge_ranks") else merge_ranks(ds)
    both = [np.concatenate([a, b]) for a, b in zip(*xs)]
    np.testing.assert_allclose(merged.bn_mean.values, np.stack([x.mean(0) for x in both]),
                               atol=1e-6)
    np.testing.assert_allclose(merged.bn_std.values, np.stack([x.std(0) for x in both]),
                               rtol=1e-5)
    np.testing.assert_allclose(merged.en_std.values[:, 0], [x.std() for x in both], rtol=1e-5)
    assert (merged["count"].values == 5).all()
    assert statscope.store.find_runs(tmp_path) == [str(out)]


@pytest.mark.slow
def test_a_rank_killed_mid_run_leaves_every_rank_readable(tmp_path):
    out, proc = torchrun(tmp_path, "ddp", die_at=3)
    assert proc.returncode != 0
    ds = statscope.open_run(out)
    assert ds.attrs["ranks"]["1"]["status"] == "running"  # rank 1 died without closing
    steps1 = int(ds.attrs["ranks"]["1"]["n_steps"])
    assert 1 <= steps1 <= 4
    count = ds["count"].sel(rank=1).values[:, 0]
    assert (count[:steps1] == 3).all() and (count[steps1:] == 0).all()


@pytest.mark.slow
def test_torchrun_fsdp2_records_each_rank(tmp_path):
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 fully_shard")
    out, proc = torchrun(tmp_path, "fsdp")
    if proc.returncode and "not supported" in proc.stderr:
        pytest.skip(f"FSDP2 on CPU/gloo: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = statscope.open_run(out)
    assert ds.sizes["rank"] == 2 and ds.attrs["step_rule"] == "optimizer"
    for r in (0, 1):
        want = np.stack([x.std(0) for x in inputs(out, r)])
        np.testing.assert_allclose(ds.bn_std.sel(rank=r).values, want, rtol=1e-5)


def test_synced_layers_show_their_merged_statistics_on_every_rank(tmp_path):
    rng = np.random.default_rng(0)
    probes = [ProbeInfo("sync", "sync", "SyncBatchNorm", "input", 1, 2),
              ProbeInfo("local", "local", "BatchNorm1d", "input", 1, 2)]
    batches = [rng.normal(size=(3, 4, 4)) * (r + 1) for r in range(2)]  # (step, n, channels)
    for r, x in enumerate(batches):
        data = {"bn_mean": x.mean(1).astype(np.float32), "bn_std": x.std(1).astype(np.float32),
                "en_mean": np.stack([x[..., :2].mean((1, 2)), x[..., 2:].mean((1, 2))], 1)
                .astype(np.float32),
                "en_std": np.stack([x[..., :2].std((1, 2)), x[..., 2:].std((1, 2))], 1)
                .astype(np.float32)}
        write_run(tmp_path / "run" / f"rank{r}", probes, data, count=np.full((3, 2), 4),
                  rank=r, world_size=2)
    ds = statscope.open_run(tmp_path / "run")
    assert ds.attrs["merged_layers"] == ["sync"]
    both = np.concatenate(batches, axis=1)
    for r in (0, 1):
        np.testing.assert_allclose(ds.bn_std.sel(rank=r).values[:, :2], both[..., :2].std(1),
                                   rtol=1e-5)
        np.testing.assert_allclose(ds.bn_std.sel(rank=r).values[:, 2:], batches[r][..., 2:].std(1),
                                   rtol=1e-5)
    raw = statscope.open_run(tmp_path / "run", merge_synced=False)
    np.testing.assert_allclose(raw.bn_std.sel(rank=1).values[:, :2], batches[1][..., :2].std(1),
                               rtol=1e-5)
    with pytest.raises(statscope.StatscopeError, match="no 'rank' dimension"):
        merge_ranks(raw.isel(rank=0))


def test_per_set_statistics_merge_over_ranks_as_over_all_their_sets(tmp_path):
    """LayerNorm's sets are tokens: the merged spread of the sets' means and stds equals numpy's
    over every rank's tokens together, with ranks holding different numbers of tokens."""
    rng = np.random.default_rng(1)
    probes = [ProbeInfo("norm", "norm", "LayerNorm", "input", -1, 6)]
    tokens = [rng.normal(size=(3, 5 + 4 * r, 6)) * (r + 1) + r for r in range(2)]  # (step, P, C)

    def sets(x):  # each token's mean and std over its channels, then mean and spread over tokens
        m, s = x.mean(-1), x.std(-1)
        return {"set_mean": m.mean(1), "set_mean_sd": m.std(1),
                "set_std": s.mean(1), "set_std_sd": s.std(1)}

    for r, x in enumerate(tokens):
        data = {"bn_mean": x.mean(1), "bn_std": x.std(1), "en_mean": x.mean((1, 2))[:, None],
                "en_std": x.std((1, 2))[:, None],
                **{k: v[:, None] for k, v in sets(x).items()}}
        write_run(tmp_path / "run" / f"rank{r}", probes,
                  {k: v.astype(np.float32) for k, v in data.items()},
                  count=np.full((3, 1), x.shape[1]), rank=r, world_size=2)
    merged = merge_ranks(statscope.open_run(tmp_path / "run"))
    want = sets(np.concatenate(tokens, axis=1))
    for name, values in want.items():
        np.testing.assert_allclose(merged[name].values[:, 0], values, rtol=1e-5, err_msg=name)
