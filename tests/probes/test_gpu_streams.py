"""On CUDA: the writer thread's reads are ordered after the copies, also under a user stream."""

import numpy as np
import pytest
import torch
from torch import nn

import statscope

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("idle", [False, True], ids=["blocks", "idle-flush"])
def test_a_loop_inside_a_user_stream_records_the_right_values(tmp_path, idle):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.BatchNorm1d(512)).cuda()
    seen = []
    model[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    side = torch.cuda.Stream()
    big = torch.randn(4096, 4096, device="cuda")
    with statscope.record(model, tmp_path / "r", block_steps=4, flush_seconds=0.05,
                          step="forward"):
        with torch.cuda.stream(side):
            for i in range(9):
                # long kernels queued before the probed forward keep the copies late: a reader
                # that did not wait for them would see stale rows
                for _ in range(3):
                    big = (big @ big).clamp_(-1, 1)
                model(torch.randn(64, 256, device="cuda"))
                if idle and i == 5:
                    import time
                    time.sleep(0.5)  # the writer thread flushes the ended steps in place
    want = np.stack([s.std(0, correction=0).cpu().numpy() for s in seen])
    ds = statscope.open_run(tmp_path / "r")
    np.testing.assert_allclose(ds.bn_std.values, want, rtol=1e-5)
