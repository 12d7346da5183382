"""Probes on a CUDA device: the same numbers as on the CPU, and no host sync in the hot path."""

import numpy as np
import pytest
import torch
from torch import nn

import statscope

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def conv_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.BatchNorm1d(16))


def test_cuda_statistics_match_a_float64_reference(tmp_path):
    torch.manual_seed(0)
    model = conv_net().cuda().to(memory_format=torch.channels_last)
    seen = []
    model[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double().cpu()))
    with statscope.record(model, tmp_path / "r", block_steps=8, en_groups={"5": 4}):
        for _ in range(20):
            x = torch.randn(4, 3, 6, 6, device="cuda").to(memory_format=torch.channels_last)
            model(x).sum().backward()
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes["step"] == 20 and ds.attrs["status"] == "completed"
    got = ds.bn_std.sel(neuron=ds.layer == "1").values
    want = np.stack([x.permute(1, 0, 2, 3).reshape(8, -1).std(1, correction=0).numpy()
                     for x in seen])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert (ds["count"].sel(neuron=ds.layer == "1").values == 4 * 36).all()


def test_the_training_step_never_waits_on_the_device(tmp_path):
    model = conv_net().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = statscope.record(model, tmp_path / "r", block_steps=64, flush_seconds=1e9).start()
    xs = [torch.randn(4, 3, 6, 6, device="cuda") for _ in range(40)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call now raises
    try:
        for x in xs:  # fewer steps than a block: only the per-step hot path runs
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.log(loss=loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rec.close()
    assert statscope.open_run(tmp_path / "r").sizes["step"] == 40


@pytest.mark.parametrize("name", ["bn", "hn", "hn_g2", "bn+en"])
@pytest.mark.parametrize("shape", [(4, 8), (4, 8, 5, 5)])
def test_norms_on_cuda_match_the_cpu(name, shape):
    import statscope.nn as snn

    torch.manual_seed(0)
    cpu = snn.make_norm(name, 8)
    gpu = snn.make_norm(name, 8).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(shape) * 3 + 2
    grads = []
    for layer, inp in ((cpu, x.clone()), (gpu, x.cuda())):
        inp.requires_grad_(True)
        out = layer(inp)
        out.square().sum().backward()
        grads.append((out.detach().cpu().numpy(), inp.grad.cpu().numpy(),
                      layer.weight.grad.cpu().numpy()))
    for got, want in zip(grads[1], grads[0]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gpu.running_var.cpu().numpy(), cpu.running_var.numpy(), rtol=1e-5)
