"""Probes on a CUDA device: the same numbers as on the CPU, and no host sync in the hot path."""

import contextlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import statscope

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@contextlib.contextmanager
def syncs_raise():
    """Any synchronizing CUDA call raises inside (torch's sync debug mode "error")."""
    with warnings.catch_warnings():
        # torch 2.11 warns that the mode is a prototype each time it is switched on
        warnings.filterwarnings("ignore", "Synchronization debug mode is a prototype",
                                UserWarning)
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


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
    with syncs_raise():
        for x in xs:  # fewer steps than a block: only the per-step hot path runs
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.log(loss=loss)
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


def _reference(seen):
    per = [x.movedim(1, -1).reshape(-1, x.shape[1]).double() for x in seen]
    return (np.stack([p.mean(0).cpu().numpy() for p in per]),
            np.stack([p.var(0, correction=0).cpu().numpy() for p in per]))


@pytest.mark.parametrize("dtype, fmt, cudnn", [
    (torch.float32, torch.contiguous_format, True),
    (torch.bfloat16, torch.channels_last, True),
    (torch.float16, torch.contiguous_format, True),
    (torch.float32, torch.channels_last, False),  # torch's own CUDA kernels
])
def test_batchnorm_fast_path_on_cuda_trains_bit_for_bit_and_records_bn_own_statistics(
        tmp_path, dtype, fmt, cudnn):
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(16).cuda()
    probed = nn.BatchNorm2d(16).cuda()
    probed.load_state_dict(plain.state_dict())
    seen = []
    probed.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    gen = torch.Generator(device="cuda").manual_seed(1)
    xs = [(torch.randn(8, 16, 7, 7, device="cuda", generator=gen) * 3 + 1).to(dtype)
          .contiguous(memory_format=fmt) for _ in range(6)]
    root = nn.Sequential(probed)  # the recorder counts steps at the root's forward
    with torch.backends.cudnn.flags(enabled=cudnn):
        with statscope.record(root, tmp_path / "r", block_steps=4, step="forward"):
            for x in xs:
                got = []
                for m, call in ((plain, plain), (probed, root)):
                    inp = x.clone().requires_grad_(True)
                    out = call(inp)
                    out.float().sin().sum().backward()
                    got.append([out, inp.grad, m.weight.grad, m.bias.grad, *m.buffers()])
                    m.zero_grad()
                for a, b in zip(*got):
                    assert a.dtype == b.dtype and torch.equal(a, b)
    ds = statscope.open_run(tmp_path / "r")
    assert ds.attrs["probes"][0]["path"] == "batchnorm"
    mean, var = _reference(seen)
    scale = np.sqrt(var + probed.eps)
    assert np.all(np.abs(ds.bn_std.values - np.sqrt(var)) <= 1e-4 * scale)
    assert np.all(np.abs(ds.bn_mean.values - mean) <= 1e-4 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stats", [None, ["bn_mean", "bn_std", "bn_kurt"]],
                         ids=["one-kernel", "with-kurtosis"])
def test_generic_path_on_cuda_matches_float64(tmp_path, dtype, stats):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.Conv1d(5, 12, 1),
                          nn.GroupNorm(3, 12)).cuda()
    seen = {1: [], 3: []}
    for i in seen:
        model[i].register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach()))
    kw = {"stats": stats} if stats else {}
    with statscope.record(model, tmp_path / "r", block_steps=4, **kw):
        for _ in range(6):
            x = torch.randn(4, 5, 8, device="cuda") * 2 + 100
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                model(x).float().sum().backward()
    ds = statscope.open_run(tmp_path / "r")
    assert [p["path"] for p in ds.attrs["probes"]] == ["generic", "generic"]
    for i, cdim in ((1, -1), (3, 1)):
        xs = [x.movedim(cdim, -1).reshape(-1, x.shape[cdim]).double().cpu().numpy()
              for x in seen[i]]
        want = np.stack([x.std(0) for x in xs])
        got = ds.bn_std.sel(neuron=ds.layer == str(i)).values
        np.testing.assert_allclose(got, want, rtol=1e-5)
        mean = np.stack([x.mean(0) for x in xs])
        np.testing.assert_allclose(ds.bn_mean.sel(neuron=ds.layer == str(i)).values, mean,
                                   rtol=1e-6, atol=1e-5 * want.min())


def test_a_training_loop_inside_its_own_stream_is_recorded_right(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16),
                          nn.LayerNorm(16)).cuda()
    seen = {1: [], 4: []}
    for i in seen:
        model[i].register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach().clone()))
    stream = torch.cuda.Stream()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.cuda.stream(stream):
        with statscope.record(model, tmp_path / "r", block_steps=8, flush_seconds=0.05):
            for _ in range(30):
                x = torch.randn(64, 8, device="cuda") * 2 + 1
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
                torch.cuda._sleep(200_000)  # keep the stream busy past the hand-over
    torch.cuda.synchronize()
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes["step"] == 30
    for i in seen:
        want = np.stack([x.double().cpu().numpy().std(0) for x in seen[i]])
        np.testing.assert_allclose(ds.bn_std.sel(neuron=ds.layer == str(i)).values, want,
                                   rtol=1e-4)


def test_neither_path_syncs_under_autocast_and_channels_last(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), nn.GroupNorm(2, 8)).cuda()
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = statscope.record(model, tmp_path / "r", block_steps=64, flush_seconds=1e9).start()
    xs = [torch.randn(4, 3, 6, 6, device="cuda").to(memory_format=torch.channels_last)
          for _ in range(40)]
    torch.cuda.synchronize()
    with syncs_raise():
        for x in xs:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.log(loss=loss)
    rec.close()
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes["step"] == 40 and np.isfinite(ds.bn_std.values).all()
    assert [p["path"] for p in ds.attrs["probes"]] == ["batchnorm", "generic"]
