"""Two gloo ranks on 127.0.0.1: each records its own batch statistics into its own store."""

import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import statscope


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    with statscope.record(model, path, meta={"batch_size": 2}):
        for step in range(5):
            x = torch.full((2, 3), float(rank + 1)) + torch.arange(6.0).reshape(2, 3) * step
            model(x).sum().backward()
    dist.destroy_process_group()


def test_each_rank_writes_its_own_statistics(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    runs = statscope.open_runs(tmp_path / "ddp")
    assert runs.run.values.tolist() == ["rank0", "rank1"]
    assert runs.layer.values.tolist() == ["1"] * 4  # no "module." prefix from DDP
    assert [runs.attrs["runs"][r]["rank"] for r in ("rank0", "rank1")] == [0, 1]
    mean = runs.bn_mean.values
    assert mean.shape == (2, 5, 4) and not np.allclose(mean[0], mean[1])
