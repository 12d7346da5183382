"""Probes under torch.compile: an operator inside the graph (statscope.probes.compiled), checked
against float64 numpy on the tensors the layers saw."""

import numpy as np
import pytest
import torch
from torch import nn

import statscope
from statscope.probes import compiled


class Net(nn.Module):
    """Conv → BatchNorm2d (channels_last) → ReLU → Linear → LayerNorm over (N, L, C)."""

    def __init__(self, offset=0.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6)
        with torch.no_grad():
            self.conv.bias[0] = offset  # one channel far from zero

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))  # (N, C, H, W)
        return self.ln(self.fc(h.flatten(2).transpose(1, 2))).sum()  # (N, L, C) tokens


def seen_inputs(model):
    """The inputs of the BatchNorm and the LayerNorm, as float64 arrays with channels last."""
    seen = {"bn": [], "ln": []}
    model.bn.register_forward_pre_hook(
        lambda m, a: seen["bn"].append(a[0].detach().movedim(1, -1).double()))
    model.ln.register_forward_pre_hook(lambda m, a: seen["ln"].append(a[0].detach().double()))
    return seen


def run(model, path, backend, steps=3, seed=1, shape=(8, 3, 6, 6), **kwargs):
    model = model.to(memory_format=torch.channels_last)
    seen = seen_inputs(model)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with statscope.record(model, path, **kwargs) as rec:
        fast = torch.compile(model, backend=backend)
        for _ in range(steps):
            x = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
            fast(x).backward()
            opt.step()
            opt.zero_grad()
    return statscope.open_run(path), rec, {k: [t.numpy() for t in v] for k, v in seen.items()}


def check(ds, seen, layer, first):
    """bn_mean/bn_std/en_std of ``layer`` against float64 numpy: the mean to 1e-5 of the std
    beyond what float32 storage keeps, the stds to 1e-5 of themselves."""
    sl = ds.layer.values == layer
    for k, x in enumerate(seen):
        flat = x.reshape(-1, x.shape[-1])
        mean, std = flat.mean(0), flat.std(0)
        stored = mean.astype(np.float32).astype(np.float64)
        err = np.abs(ds.bn_mean.values[first + k][sl] - stored) / std
        assert err.max() < 1e-5, (layer, k, err)
        np.testing.assert_allclose(ds.bn_std.values[first + k][sl], std, rtol=1e-5)
        np.testing.assert_allclose(ds.en_std.values[first + k][sl][0], flat.std(), rtol=1e-5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_probes_are_right_and_run_inside_the_graph(tmp_path, backend):
    torch.manual_seed(0)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ds, rec, seen = run(Net(), tmp_path / "r", backend, layers=["bn", "ln"])
    assert ds.sizes["step"] == 3
    check(ds, seen["bn"], "bn", 0)
    check(ds, seen["ln"], "ln", 0)
    # neither the probes nor the recorder's step boundary break the graph
    assert not torch._dynamo.utils.counters["graph_break"], \
        dict(torch._dynamo.utils.counters["graph_break"])


def test_a_compiled_function_other_than_the_models_forward_ends_steps_at_the_optimizer(
        tmp_path):
    # torch.compile(model.forward_features): the layers run without the model's forward, which
    # marks a step's first forward; every step was filed as one. The compiled graph runs
    # without autograd, so the recorder cannot tell validation from training there: it says so
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Net().to(memory_format=torch.channels_last)
    seen = seen_inputs(model)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(statscope.StatscopeWarning, match="compiled function other than"):
        with statscope.record(model, tmp_path / "r", layers=["bn", "ln"], block_steps=2):
            # the class's forward: the layers run, the recorded model's own forward does not
            fast = torch.compile(lambda x: Net.forward(model, x), backend="aot_eager")
            for _ in range(4):
                x = torch.randn(8, 3, 6, 6, generator=gen).contiguous(
                    memory_format=torch.channels_last)
                fast(x).backward()
                opt.step()
                opt.zero_grad()
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes["step"] == 4
    check(ds, [t.numpy() for t in seen["bn"]], "bn", 0)
    check(ds, [t.numpy() for t in seen["ln"]], "ln", 0)


def test_a_compiled_forward_without_autograd_is_not_a_step(tmp_path):
    # the compiled graph runs without autograd whatever the caller's mode: the step boundary
    # takes the mode dynamo traced in
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Net().to(memory_format=torch.channels_last)
    seen = {"bn": [], "ln": []}
    for name in seen:
        getattr(model, name).register_forward_pre_hook(
            lambda m, a, name=name: seen[name].append(a[0].detach().double())
            if torch.is_grad_enabled() else None)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with statscope.record(model, tmp_path / "r", layers=["bn", "ln"]):
        fast = torch.compile(model, backend="aot_eager")
        for _ in range(3):
            x = torch.randn(8, 3, 6, 6, generator=gen).contiguous(
                memory_format=torch.channels_last)
            fast(x).backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                fast(x * 2 + 1)
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes["step"] == 3 and len(seen["bn"]) == 3
    check(ds, [t.movedim(1, -1).numpy() for t in seen["bn"]], "bn", 0)
    check(ds, [t.numpy() for t in seen["ln"]], "ln", 0)


class Breaking(nn.Module):
    """Conv → graph break → BatchNorm → ReLU: dynamo compiles the block's resumed forward once
    and shares it among the plain model's blocks."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.conv(x)
        torch._dynamo.graph_break()
        return torch.relu(self.bn(x))


# dynamo's own tracing after a graph break, with or without statscope
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_blocks_behind_a_graph_break_are_all_compiled(tmp_path):
    # each probe names its module in the graph, so the shared frame needs a graph per block:
    # past dynamo's limit of 8 the other blocks ran uncompiled, with a warning
    import torch._dynamo.config as config

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    limit = config.recompile_limit
    model = nn.Sequential(*[Breaking() for _ in range(12)])
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 4, 5, 5, generator=gen) for _ in range(2)]
    with statscope.record(model, tmp_path / "r", step="forward"):
        assert config.recompile_limit == limit + 13  # 12 probes and the step boundary
        fast = torch.compile(model, backend="aot_eager")
        for x in xs:
            fast(x).sum().backward()
    assert config.recompile_limit == limit
    frames = torch._dynamo.utils.counters["frames"]
    assert frames["ok"] == frames["total"], dict(frames)
    # the layers' inputs again, eagerly (no optimizer step: the same weights)
    seen = []
    for block in model:
        block.bn.register_forward_pre_hook(
            lambda m, a: seen.append(a[0].detach().movedim(1, -1).double().numpy()))
    for x in xs:
        model(x)
    ds = statscope.open_run(tmp_path / "r")
    for k in range(12):
        check(ds, seen[k::12], f"{k}.bn", 0)


def test_an_offset_too_large_for_float32_moments_is_reduced_from_the_tensor(tmp_path):
    # inductor's float32 reduction of a channel 1000 σ from zero is off by ~2e-3 σ in the mean:
    # the graph's flag sends that probe to the generic (shifted) reduction of the tensor
    torch.manual_seed(0)
    torch._dynamo.reset()
    calls = []
    real = statscope.probes.capture.Capture.capture_moments

    def spy(self, x, packed, slot):
        taken = real(self, x, packed, slot)
        calls.append((self.target.module_name, taken))
        return taken

    statscope.probes.capture.Capture.capture_moments = spy
    try:
        ds, rec, seen = run(Net(offset=1000.0), tmp_path / "r", "inductor", layers=["bn", "ln"],
                            shape=(32, 3, 16, 16))  # 8,192 elements per channel
    finally:
        statscope.probes.capture.Capture.capture_moments = real
    check(ds, seen["bn"], "bn", 0)
    check(ds, seen["ln"], "ln", 0)
    assert ("bn", False) in calls and ("ln", True) in calls


def test_a_mask_and_fourth_moments_under_compile(tmp_path):
    # neither fits the graph's two moments: the probe reduces the tensor itself at run time
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5))
    seen = []
    model[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double().numpy()))
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(3, 7, 4, generator=gen) for _ in range(3)]
    masks = [torch.rand(3, 7, generator=gen) > 0.4 for _ in range(3)]
    with statscope.record(model, tmp_path / "m", layers=["1"]) as rec:
        fast = torch.compile(model, backend="aot_eager")
        for x, m in zip(xs, masks):
            rec.mask(m)
            fast(x).sum().backward()
    with statscope.record(model, tmp_path / "k", layers=["1"],
                          stats=["bn_mean", "bn_std", "bn_kurt"]):
        for x in xs:
            fast(x).sum().backward()
    masked, kurt = statscope.open_run(tmp_path / "m"), statscope.open_run(tmp_path / "k")
    for k, (h, m) in enumerate(zip(seen[:3], masks)):
        real = h[m.numpy()]  # (tokens, C)
        np.testing.assert_allclose(masked.bn_mean.values[k], real.mean(0), atol=1e-6)
        np.testing.assert_allclose(masked.bn_std.values[k], real.std(0), rtol=1e-5)
        assert (masked["count"].values[k] == m.sum().item()).all()
    for k, h in enumerate(seen[3:]):
        d = h.reshape(-1, 5) - h.reshape(-1, 5).mean(0)
        want = (d ** 4).mean(0) / (d ** 2).mean(0) ** 2
        np.testing.assert_allclose(kurt.bn_kurt.values[k], want, rtol=1e-4)


def test_a_closed_recorder_leaves_the_compiled_model_running_and_a_new_one_records(tmp_path):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))
    fast = torch.compile(model, backend="aot_eager")
    keys = set(compiled._PROBES)
    with statscope.record(model, tmp_path / "a"):
        fast(torch.randn(8, 4)).sum().backward()
    assert set(compiled._PROBES) == keys  # unregistered at close
    fast(torch.randn(8, 4)).sum().backward()  # the graph's stale key does nothing
    x = torch.randn(8, 4)
    with statscope.record(model, tmp_path / "b"):
        fast(x).sum().backward()
    with torch.no_grad():
        h = model[0](x).double().numpy()
    ds = statscope.open_run(tmp_path / "b")
    assert ds.sizes["step"] == 1
    np.testing.assert_allclose(ds.bn_std.values[0], h.std(0), rtol=1e-5)
    assert statscope.open_run(tmp_path / "a").sizes["step"] == 1


def test_probes_attached_with_hooks_run_inside_the_graph_too(tmp_path):
    torch.manual_seed(0)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ds, rec, seen = run(Net(), tmp_path / "r", "aot_eager", layers=["bn", "ln"],
                        mechanism="hooks")
    check(ds, seen["bn"], "bn", 0)
    check(ds, seen["ln"], "ln", 0)
    assert not torch._dynamo.utils.counters["graph_break"]


class Residual(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


def test_moments_survive_the_compiler_reusing_its_buffers(tmp_path):
    # inductor hands a buffer the graph no longer reads to a later kernel of the same size: the
    # probe keeps its own copy of the packed moments (without it: 56 % off on a small ResNet)
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          *(Residual() for _ in range(2)), nn.Conv2d(8, 16, 3, 2, 1),
                          nn.BatchNorm2d(16), nn.ReLU(), Residual(16))
    model = model.to(memory_format=torch.channels_last)
    seen = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.BatchNorm2d):
            seen[name] = []
            mod.register_forward_pre_hook(
                lambda m, a, name=name: seen[name].append(a[0].detach().double().numpy()))
    gen = torch.Generator().manual_seed(3)
    with statscope.record(model, tmp_path / "r", block_steps=4):
        fast = torch.compile(model, backend="inductor")
        for _ in range(4):
            x = torch.randn(8, 3, 16, 16, generator=gen)
            fast(x.contiguous(memory_format=torch.channels_last)).sum().backward()
    ds = statscope.open_run(tmp_path / "r")
    for name, xs in seen.items():
        sl = ds.layer.values == name
        for k, x in enumerate(xs):
            np.testing.assert_allclose(ds.bn_std.values[k][sl], x.std((0, 2, 3)), rtol=1e-5)
            np.testing.assert_allclose(ds.bn_mean.values[k][sl], x.mean((0, 2, 3)),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_probes_on_cuda_take_shifted_moments(tmp_path, backend):
    # on CUDA the graph reduces x - x0 (no flag to read without a sync): a channel 1000 σ from
    # zero keeps its mean and std
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Net(offset=1000.0).cuda().to(memory_format=torch.channels_last)
    seen = seen_inputs(model)
    gen = torch.Generator().manual_seed(1)
    with statscope.record(model, tmp_path / "r", layers=["bn", "ln"]):
        fast = torch.compile(model, backend=backend)
        for _ in range(3):
            x = torch.randn(32, 3, 16, 16, generator=gen).cuda()
            fast(x.contiguous(memory_format=torch.channels_last)).backward()
    ds = statscope.open_run(tmp_path / "r")
    check(ds, [t.cpu().numpy() for t in seen["bn"]], "bn", 0)
    check(ds, [t.cpu().numpy() for t in seen["ln"]], "ln", 0)


def test_a_mask_function_reads_the_arguments_behind_a_graph_break(tmp_path):
    # the step boundary hands every argument to the mask function: it stays eager
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.norm = nn.Linear(4, 5), nn.LayerNorm(5)

        def forward(self, x, attention_mask=None):
            return self.norm(self.proj(x))

    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Tagger()
    seen = []
    model.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double().numpy()))
    gen = torch.Generator().manual_seed(4)
    masks = [torch.rand(3, 7, generator=gen) > 0.4 for _ in range(3)]
    with statscope.record(model, tmp_path / "r", layers=["norm"], step="forward",
                          mask=lambda args, kwargs: kwargs["attention_mask"]):
        fast = torch.compile(model, backend="aot_eager")
        for m in masks:
            fast(torch.randn(3, 7, 4, generator=gen), attention_mask=m).sum().backward()
    ds = statscope.open_run(tmp_path / "r")
    assert ds["count"].values[:, 0].tolist() == [int(m.sum()) for m in masks]
    for k, (h, m) in enumerate(zip(seen, masks)):
        np.testing.assert_allclose(ds.bn_std.values[k], h[m.numpy()].std(0), rtol=1e-5)
