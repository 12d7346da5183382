"""The BatchNorm fast path: the statistics BatchNorm computes itself, and a layer that trains
bit for bit as it would unprobed."""

import copy
import itertools
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import statscope
from statscope.errors import NonFiniteWarning, StatscopeWarning
from statscope.probes import fastpath

CASES = {
    # name: (module factory, input shape, memory format, autocast dtype)
    "bn1d": (lambda: nn.BatchNorm1d(6), (16, 6), None, None),
    "bn1d-seq": (lambda: nn.BatchNorm1d(6), (4, 6, 5), None, None),
    "bn2d": (lambda: nn.BatchNorm2d(6), (4, 6, 5, 3), None, None),
    "bn2d-channels-last": (lambda: nn.BatchNorm2d(6), (4, 6, 5, 3), torch.channels_last, None),
    "bn3d": (lambda: nn.BatchNorm3d(6), (2, 6, 3, 4, 2), None, None),
    "momentum-none": (lambda: nn.BatchNorm2d(6, momentum=None), (4, 6, 3, 3), None, None),
    "no-running-stats": (lambda: nn.BatchNorm2d(6, track_running_stats=False), (4, 6, 3, 3),
                         None, None),
    "no-affine": (lambda: nn.BatchNorm1d(6, affine=False), (8, 6), None, None),
    "lazy": (lambda: nn.LazyBatchNorm2d(), (4, 6, 3, 3), None, None),
    "float64": (lambda: nn.BatchNorm2d(6).double(), (4, 6, 3, 3), None, None),
    "bf16-autocast": (lambda: nn.BatchNorm2d(6), (4, 6, 5, 5), torch.channels_last,
                      torch.bfloat16),
    "fp16-autocast": (lambda: nn.BatchNorm2d(6), (4, 6, 5, 5), None, torch.float16),
}


class Net(nn.Module):
    """A conv (or linear) in front of the BatchNorm, so that autocast hands it bf16/fp16."""

    def __init__(self, bn, shape):
        super().__init__()
        c = shape[1]
        self.pre = nn.Conv2d(c, c, 1) if len(shape) == 4 else nn.Identity()
        self.bn = bn

    def forward(self, x):
        return self.bn(self.pre(x))


def inputs(shape, n, fmt, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, shape[1], dtype=torch.float64)  # channels of unequal spread
    view = [1] * len(shape)
    view[1] = -1
    out = []
    for _ in range(n):
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale.view(view) + 3)
        x = x.to(dtype)
        out.append(x.contiguous(memory_format=fmt) if fmt is not None else x)
    return out


def run(case, tmp_path, name, fast=True, monkeypatch=None, steps=6, **kw):
    make, shape, fmt, autocast = CASES[case]
    torch.manual_seed(0)
    model = Net(make(), shape)
    dtype = torch.float64 if case == "float64" else torch.float32
    model = model.to(dtype)
    if fmt is not None:
        model = model.to(memory_format=fmt)
    seen = []
    model.bn.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    if not fast:
        # the path the run records (recorder) and the hook the probe gets (hooks)
        for module in ("recorder", "hooks"):
            monkeypatch.setattr(f"statscope.probes.{module}.probe_path", lambda *a: "generic")
    with statscope.record(model, tmp_path / name, layers="bn", block_steps=4, **kw):
        for x in inputs(shape, steps, fmt, dtype):
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                model(x.requires_grad_(True)).float().square().mean().backward()
    if not fast:
        monkeypatch.undo()
    return statscope.open_run(tmp_path / name).load(), seen, model.bn


def reference(seen):
    per = [x.movedim(1, -1).reshape(-1, x.shape[1]) for x in seen]
    return (np.stack([p.mean(0).numpy() for p in per]),
            np.stack([p.var(0, correction=0).numpy() for p in per]))


@pytest.mark.parametrize("case", CASES)
def test_fast_path_equals_the_generic_path_and_float64(case, tmp_path, monkeypatch):
    fast, seen, bn = run(case, tmp_path, "fast")
    generic, _, _ = run(case, tmp_path, "generic", fast=False, monkeypatch=monkeypatch)
    assert [p["path"] for p in fast.attrs["probes"]] == ["batchnorm"]
    assert [p["path"] for p in generic.attrs["probes"]] == ["generic"]
    mean, var = reference(seen)
    scale = np.sqrt(var + bn.eps)  # what BatchNorm divides by
    for ds, tol in ((fast, 1e-4), (generic, 1e-5)):
        assert np.all(np.abs(ds.bn_mean.values - mean) <= tol * scale + 1e-6 * np.abs(mean))
        assert np.all(np.abs(ds.bn_std.values - np.sqrt(var)) <= tol * scale)
    assert np.all(np.abs(fast.bn_std.values - generic.bn_std.values) <= 1e-4 * scale)
    np.testing.assert_allclose(fast.en_std.values, generic.en_std.values, rtol=1e-5)
    assert (fast["count"].values == seen[0].numel() // 6).all()


@pytest.mark.parametrize("case", CASES)
def test_a_probed_batchnorm_trains_bit_for_bit_as_an_unprobed_one(case, tmp_path, bn_route):
    make, shape, fmt, autocast = CASES[case]
    dtype = torch.float64 if case == "float64" else torch.float32

    def build():
        torch.manual_seed(0)  # lazy modules cannot be copied before their first forward
        model = Net(make(), shape).to(dtype)
        return model.to(memory_format=fmt) if fmt is not None else model

    plain, probed = build(), build()
    opts = [torch.optim.SGD(list(m.parameters()) or [torch.zeros(1, requires_grad=True)],
                            lr=0.1, momentum=0.9) for m in (plain, probed)]
    with statscope.record(probed, tmp_path / "r", layers="bn", block_steps=3) as rec:
        assert "forward" in probed.bn.__dict__
        for step, x in enumerate(inputs(shape, 7, fmt, dtype)):
            got = []
            for model, opt in zip((plain, probed), opts):
                inp = x.clone().requires_grad_(True)
                with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                    out = model(inp)
                out.float().sin().sum().backward()
                got.append([out.detach(), inp.grad, *(p.grad for p in model.parameters()),
                            *model.buffers()])
                opt.step()
                opt.zero_grad()
            assert len(got[0]) == len(got[1])
            for a, b in zip(*got):
                assert a.dtype == b.dtype and torch.equal(a, b), f"step {step}"
        assert rec.captures[0].count[0] > 0
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes["step"] == 7 and ds.attrs["probes"][0]["path"] == "batchnorm"
    for a, b in zip(plain.state_dict().values(), probed.state_dict().values()):
        assert torch.equal(a, b)
    assert "forward" not in probed.bn.__dict__


def test_eval_forwards_and_compiled_forwards_take_the_generic_path(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))
    seen = []
    model[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    xs = inputs((8, 4), 6, None)
    with statscope.record(model, tmp_path / "r", record_eval=True, block_steps=4):
        for i, x in enumerate(xs):
            model.train(i % 2 == 0)  # eval-mode BatchNorm normalizes with its running stats
            model(x)
    ds = statscope.open_run(tmp_path / "r")
    mean, var = reference(seen)
    np.testing.assert_allclose(ds.bn_std.values, np.sqrt(var), rtol=1e-5)
    np.testing.assert_allclose(ds.bn_mean.values, mean, rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))
    seen.clear()
    model[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    with statscope.record(model, tmp_path / "c", block_steps=4):
        compiled = torch.compile(model, backend="aot_eager")
        for x in xs:
            compiled(x).sum().backward()
    ds = statscope.open_run(tmp_path / "c")
    mean, var = reference(seen)
    assert ds.sizes["step"] == 6
    np.testing.assert_allclose(ds.bn_std.values, np.sqrt(var), rtol=1e-5)


def test_which_layers_take_which_path(tmp_path):
    class OwnForward(nn.BatchNorm1d):  # like timm's BatchNormAct2d: not provably identical
        def forward(self, x):
            return super().forward(x) * 2

    class SameForward(nn.BatchNorm1d):
        pass

    model = nn.Sequential(nn.BatchNorm1d(3), nn.SyncBatchNorm(3), OwnForward(3), SameForward(3),
                          nn.LayerNorm(3))

    def paths(**kw):
        name = f"r{len(list(tmp_path.iterdir()))}"
        with statscope.record(model, tmp_path / name, **kw):
            model(torch.randn(4, 3))
        probes = statscope.open_run(tmp_path / name).attrs["probes"]
        return [p["path"] for p in sorted(probes, key=lambda p: p["name"])]

    assert paths() == ["batchnorm", "generic", "generic", "batchnorm", "generic"]
    assert paths(mechanism="hooks") == ["generic"] * 5
    assert paths(stats=["bn_mean", "bn_std", "bn_kurt"]) == ["generic"] * 5
    assert paths(channel_dim={"0": -1}, layers=["0", "3"]) == ["generic", "batchnorm"]
    assert all("forward" not in m.__dict__ for m in model)


def test_no_fast_path_where_the_mirror_of_torch_is_not_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(fastpath, "_check", {})
    real = fastpath._train_forward

    def off_by_one_ulp(m, x):
        out, mean, invstd = real(m, x)
        return torch.nextafter(out, out + 1), mean, invstd

    monkeypatch.setattr(fastpath, "_train_forward", off_by_one_ulp)
    assert not fastpath.mirror_is_exact()
    model = nn.Sequential(nn.BatchNorm1d(3))
    with statscope.record(model, tmp_path / "r"):
        model(torch.randn(4, 3))
    assert statscope.open_run(tmp_path / "r").attrs["probes"][0]["path"] == "generic"
    monkeypatch.setattr(fastpath, "_check", {})
    monkeypatch.setattr(fastpath, "_train_forward", real)
    assert fastpath.mirror_is_exact()


def test_batchnorm_errors_are_torchs_and_state_is_unchanged(tmp_path, bn_route):
    bn, ref = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with pytest.warns(StatscopeWarning, match="no training step was recorded"), \
            statscope.record(nn.Sequential(bn), tmp_path / "r"):
        for m in (bn, ref):
            with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
                m(torch.randn(1, 3))
            with pytest.raises(ValueError, match="expected 2D or 3D input"):
                m(torch.randn(2, 3, 4, 5))
        assert torch.equal(bn.num_batches_tracked, ref.num_batches_tracked)


class StrictBatchNorm2d(nn.BatchNorm2d):
    """A subclass with a check of its own: the fast path must call it."""

    def _check_input_dim(self, input):
        super()._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"strict: {input.shape[1]} channels")


def _outcome(module, x):
    try:
        return module(x).detach()
    except (ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("make", [lambda: nn.BatchNorm1d(3), lambda: nn.BatchNorm2d(3),
                                  lambda: nn.BatchNorm3d(3), lambda: StrictBatchNorm2d(3),
                                  lambda: nn.BatchNorm1d(3, momentum=None)])
def test_the_shortcuts_of_torchs_checks_raise_where_torch_raises(make, tmp_path, bn_route):
    # every rank from 1 to 5 with batch and spatial sizes 1 or 2: the dims check and the
    # "more than 1 value per channel" check, which the fast path calls only where they can fail
    bn, ref = make(), make()
    shapes = [(n, 3, *rest) for n in (1, 2) for k in range(0, 4)
              for rest in itertools.product((1, 2), repeat=k)] + [(2,), (3,), (2, 4, 2, 2)]
    gen = torch.Generator().manual_seed(0)
    # the layer is called without the recorded model's forward: its forwards are one step
    with pytest.warns(StatscopeWarning, match="could not be told apart"), \
            statscope.record(nn.Sequential(bn), tmp_path / "r", layers=[bn.__class__]):
        assert "forward" in bn.__dict__
        for shape in shapes:
            x = torch.randn(shape, generator=gen)
            got, want = _outcome(bn, x), _outcome(ref, x)
            assert type(got) is type(want), shape
            assert got == want if isinstance(got, str) else torch.equal(got, want), shape
            assert torch.equal(bn.num_batches_tracked, ref.num_batches_tracked), shape
            assert torch.equal(bn.running_var, ref.running_var), shape


def test_a_parametrization_added_while_recording_is_applied(tmp_path, bn_route):
    # the fast path reads the weight from the module's dict; parametrizing moves it elsewhere
    from torch.nn.utils import parametrize

    class Positive(nn.Module):
        def forward(self, w):
            return w.abs() + 0.5

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    probed = copy.deepcopy(plain)
    with torch.no_grad():
        for m in (plain, probed):
            m[1].weight.copy_(torch.tensor([-2.0, 0.25, 1.5]))
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    with statscope.record(probed, tmp_path / "r", layers="1"):
        assert "forward" in probed[1].__dict__
        for m in (plain, probed):
            parametrize.register_parametrization(m[1], "weight", Positive())
        got, want = probed(x), plain(x)
        assert torch.equal(got, want)
        got.sum().backward()
        want.sum().backward()
        assert torch.equal(probed[0].weight.grad, plain[0].weight.grad)
        assert torch.equal(probed[1].parametrizations.weight.original.grad,
                           plain[1].parametrizations.weight.original.grad)


def test_functional_call_substitutes_the_parameters_and_buffers_the_fast_path_reads(tmp_path,
                                                                                     bn_route):
    from torch.func import functional_call

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    probed = copy.deepcopy(plain)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))

    def state():
        return {"1.weight": torch.tensor([2.0, -1.0, 0.5]), "1.bias": torch.tensor([0.1, 0.2, 0.3]),
                "1.running_mean": torch.full((3,), 5.0), "1.running_var": torch.ones(3),
                "1.num_batches_tracked": torch.tensor(7)}

    given = [state(), state()]
    with statscope.record(probed, tmp_path / "r", layers="1"):
        assert "forward" in probed[1].__dict__
        want = functional_call(plain, given[0], (x,))
        got = functional_call(probed, given[1], (x,))
    assert torch.equal(got, want)
    for a, b in zip(given[0].values(), given[1].values()):
        assert torch.equal(a, b)  # the substituted buffers were updated alike
    assert given[1]["1.num_batches_tracked"].item() == 8
    for a, b in zip(plain.state_dict().values(), probed.state_dict().values()):
        assert torch.equal(a, b)  # and the module's own left alone


def test_a_wrong_table_of_torchs_dims_checks_turns_the_fast_path_off(monkeypatch):
    monkeypatch.setattr(fastpath, "_check", {})
    monkeypatch.setitem(fastpath._DIMS, nn.BatchNorm2d._check_input_dim, (3, 4))
    assert not fastpath.mirror_is_exact()
    monkeypatch.undo()
    monkeypatch.setattr(fastpath, "_check", {})
    assert fastpath.mirror_is_exact()


@pytest.mark.parametrize("shape, fmt", [((64, 16, 16, 16), torch.channels_last),
                                        ((4096, 16), None),
                                        ((64, 16, 16, 16), None)])
def test_large_offsets_stay_right_where_torchs_cpu_kernel_sums_in_float32(tmp_path, shape, fmt):
    # |mean| = 300 std: torch's CPU BatchNorm drifts there for channels_last and (N, C) inputs
    model = nn.Sequential(nn.BatchNorm2d(16) if len(shape) == 4 else nn.BatchNorm1d(16))
    gen = torch.Generator().manual_seed(0)
    xs = [(torch.randn(shape, generator=gen, dtype=torch.float64) + 300).float()
          for _ in range(5)]
    if fmt is not None:
        xs = [x.contiguous(memory_format=fmt) for x in xs]
    with statscope.record(model, tmp_path / "r", block_steps=2) as rec:
        for x in xs:
            model(x)
    assert rec.captures[0].sum_bn_mean  # the writer's advice: keep the extra sum at 300 std
    ds = statscope.open_run(tmp_path / "r")
    assert ds.attrs["probes"][0]["path"] == "batchnorm"
    mean, var = reference([x.double() for x in xs])
    scale = np.sqrt(var + model[0].eps)
    rounding = 2 * np.spacing(np.float32(mean))  # of the stored float32 mean
    assert np.all(np.abs(ds.bn_mean.values - mean) <= 1e-4 * scale + rounding)
    assert np.all(np.abs(ds.bn_std.values - np.sqrt(var)) <= 1e-4 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, layout", [((4, 7, 16), "transposed"),
                                           ((16, 8, 8, 16), "channels_last")])
def test_a_mean_far_from_zero_is_reduced_from_the_input_once_the_writer_sees_it(
        tmp_path, dtype, shape, layout):
    # |mean| = 1000 std: a float32 sum of the input, BatchNorm's own or the extra one, is off by
    # up to ~2e-4 of the std there (3e-5 for the stored float32 mean). E.g. a speech model's
    # BatchNorm1d over (N, L, C) features transposed to (N, C, L), 28 elements per channel
    model = nn.Sequential(nn.BatchNorm1d(16) if len(shape) == 3 else nn.BatchNorm2d(16))
    gen = torch.Generator().manual_seed(0)

    def batch():
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) + 1000).to(dtype)
        if layout == "transposed":
            return x.transpose(1, 2)
        return x.permute(0, 3, 1, 2)  # (N, H, W, C) memory: channels_last

    xs = []
    with statscope.record(model, tmp_path / "r", block_steps=2, step="manual") as rec:
        cap = rec.captures[0]
        for _ in range(4):
            xs.append(batch())
            model(xs[-1])
            rec.step()
        wait_for(lambda: cap.reduce_bn)
        for _ in range(6):
            xs.append(batch())
            model(xs[-1])
            rec.step()
    ds = statscope.open_run(tmp_path / "r")
    assert ds.attrs["probes"][0]["path"] == "batchnorm"
    mean, var = reference([x.double() for x in xs])
    scale = np.sqrt(var + model[0].eps)
    stored = mean.astype(np.float32).astype(np.float64)
    after = slice(-4, None)  # after the advice, whatever step it arrived at
    err = np.abs(ds.bn_mean.values[after] - stored[after]) / scale[after]
    assert err.max() <= 1e-5, err.max()
    np.testing.assert_allclose(ds.bn_std.values[after], np.sqrt(var[after]), rtol=1e-5)
    ulp = np.spacing(np.float32(mean))  # where the float32 rounding of the mean may go either way
    before = np.abs(ds.bn_mean.values[:4] - stored[:4]) - ulp[:4]
    assert (before / scale[:4]).max() <= 1e-5  # until the advice, the probe saw such a mean


@pytest.mark.parametrize("shape", [(4, 48), (4, 50, 48)])
def test_a_far_mean_is_right_from_the_first_step(tmp_path, shape):
    # |mean| = 5000 std at the first step, a Linear's output (N, C) or transposed to (N, C, L)
    # as speech models do: a float32 sum of the input is off by ~1e-3 of the std there; until
    # the writer's first advice the probe tells such a mean from BatchNorm's own statistics
    model = nn.Sequential(nn.BatchNorm1d(48))
    gen = torch.Generator().manual_seed(0)

    def batch():
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 0.6 + 3000).float()
        return x if len(shape) == 2 else x.transpose(1, 2)  # (N, C, L), memory (N, L, C)

    xs = [batch() for _ in range(6)]
    with statscope.record(model, tmp_path / "r", block_steps=64) as rec:
        for x in xs:
            model(x)
        assert not rec.captures[0].advised  # all six steps in the first block
    ds = statscope.open_run(tmp_path / "r")
    mean, var = reference([x.double() for x in xs])
    scale = np.sqrt(var + model[0].eps)
    stored = mean.astype(np.float32).astype(np.float64)
    ulp = np.spacing(np.float32(mean))  # a float32 sum was off by ~3 of these (1e-3 of the std)
    assert ((np.abs(ds.bn_mean.values - stored) - ulp) / scale).max() <= 1e-5
    np.testing.assert_allclose(ds.bn_std.values, np.sqrt(var), rtol=1e-5)


@pytest.mark.parametrize("layout", ["NC", "channels_last"])
def test_a_drifted_float32_mean_does_not_inflate_the_variance(tmp_path, layout):
    # 2^18 elements per channel at |mean| = 250 std (under FAR_MEAN, within CPU_BATCHNORM_MAX),
    # one thread: torch's CPU kernel sums the channel in float32 and its mean drifts by ~0.27
    # std; its variance, about that mean, was 7 % high (torch 2.13). The zero-mean channel
    # beside it is summed right.
    model = nn.Sequential(nn.BatchNorm1d(2) if layout == "NC" else nn.BatchNorm2d(2))
    gen = torch.Generator().manual_seed(0)

    def batch():
        x = torch.randn(1 << 18, 2, generator=gen, dtype=torch.float64) * 0.7
        x[:, 0] += 250 * 0.7
        x = x.float()
        if layout == "NC":
            return x
        return x.reshape(64, 64, 64, 2).permute(0, 3, 1, 2)  # channels_last (N, C, H, W)

    xs = [batch() for _ in range(2)]
    ds = _record_on_one_thread(model, xs, tmp_path / "r")
    assert ds.attrs["probes"][0]["path"] == "batchnorm"
    mean, var = reference([x.double() for x in xs])
    scale = np.sqrt(var + model[0].eps)
    assert (np.abs(ds.bn_std.values - np.sqrt(var)) / scale).max() <= 5e-5
    assert (np.abs(ds.bn_mean.values - mean) / scale).max() <= 5e-5


def _record_on_one_thread(model, xs, path):
    """The run of ``model`` over ``xs`` recorded at ``path`` with one torch thread: torch's CPU
    kernel then sums each channel sequentially (more threads split the sum)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with statscope.record(model, path):
            for x in xs:
                model(x)
    finally:
        torch.set_num_threads(threads)
    return statscope.open_run(path)


def test_beyond_the_trusted_count_torchs_float32_cpu_sums_are_not_used(tmp_path, monkeypatch):
    monkeypatch.setattr("statscope.probes.reduce.CPU_BATCHNORM_MAX", 1000)
    model = nn.Sequential(nn.BatchNorm1d(4))
    xs = [torch.randn(2000, 4) * 1e-2 + 1e3 for _ in range(2)]
    with statscope.record(model, tmp_path / "r"):
        for x in xs:
            model(x)
    ds = statscope.open_run(tmp_path / "r")
    want = np.stack([x.double().std(0, correction=0).numpy() for x in xs])
    np.testing.assert_allclose(ds.bn_std.values, want, rtol=1e-5)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "autocast", "device",
                                     "float64"])
def test_the_check_against_torch_holds_in_any_calling_context(context, monkeypatch):
    monkeypatch.setattr(fastpath, "_check", {})
    if context == "float64":
        torch.set_default_dtype(torch.float64)
    ctx = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode(),
           "autocast": torch.autocast("cpu", dtype=torch.bfloat16),
           "device": torch.device("cpu"), "float64": torch.no_grad()}[context]
    try:
        with ctx:
            assert fastpath.mirror_is_exact()
    finally:
        torch.set_default_dtype(torch.float32)


def wait_for(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the writer thread did not get there in time"
        time.sleep(0.01)


def test_the_extra_cpu_sum_follows_the_offset_of_the_data(tmp_path):
    # centred data: the writer switches the extra sum off; a jump to |mean| = 300 std switches it
    # on again after the block that shows it (that block keeps BatchNorm's own mean)
    model = nn.Sequential(nn.BatchNorm2d(8))
    gen = torch.Generator().manual_seed(0)

    def batch(offset):
        x = torch.randn(32, 8, 16, 16, generator=gen, dtype=torch.float64) + offset
        return x.float().contiguous(memory_format=torch.channels_last)

    xs = []
    with statscope.record(model, tmp_path / "r", block_steps=2, step="manual") as rec:
        cap = rec.captures[0]
        for offset, n in ((0.0, 4), (300.0, 8)):
            for _ in range(n):
                xs.append(batch(offset))
                model(xs[-1])
                rec.step()
            if offset == 0.0:
                wait_for(lambda: not cap.sum_bn_mean)
        wait_for(lambda: cap.sum_bn_mean)
        for _ in range(4):
            xs.append(batch(300.0))
            model(xs[-1])
            rec.step()
    ds = statscope.open_run(tmp_path / "r")
    mean, var = reference([x.double() for x in xs])
    scale = np.sqrt(var + model[0].eps)
    err = np.abs(ds.bn_mean.values - mean) / scale
    assert np.all(err[:4] <= 1e-4) and np.all(err[-4:] <= 1e-4 + 2 * np.spacing(300.0) / scale[-4:])


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_the_extra_sum_switches_at_the_same_step_whenever_the_writer_answers(tmp_path,
                                                                             monkeypatch,
                                                                             writer):
    # The extra CPU sum and BatchNorm's own float32 mean differ in their last bits: where the
    # probe switches from one to the other must not depend on when the writer's advice reaches
    # the training thread, or on when a block was handed over early because flush_seconds
    # passed (a slow step, a pause), or two runs of one seed differ. Here one run pauses
    # mid-block past flush_seconds twice (early hand-overs, idle flushes and the writer's
    # advice within the first block); the other's writer never answers and no block ends early
    from statscope.probes import worker

    def run(name, pauses, flush_seconds):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(),
                              nn.Linear(32, 32), nn.BatchNorm1d(32))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(1)
        with statscope.record(model, tmp_path / name, block_steps=8, writer=writer,
                              flush_seconds=flush_seconds) as rec:
            for step in range(64):
                model(torch.randn(128, 16, generator=gen) + 3).square().mean().backward()
                opt.step()
                opt.zero_grad()
                if step in pauses:
                    time.sleep(0.3)
            sums = [c.sum_bn_mean for c in rec.captures]
        return statscope.open_run(tmp_path / name), sums

    answered, sums = run("answered", (3, 13), 0.1)
    assert sums == [False, False]  # the extra sum was switched off along the way
    monkeypatch.setattr(worker.Filer, "_advise", lambda self, advice: None)
    silent, _ = run("silent", (), 1e6)
    for name in ("bn_mean", "bn_std", "en_mean", "en_std"):
        np.testing.assert_array_equal(silent[name].values, answered[name].values, err_msg=name)


def test_channels_near_eps_are_reduced_from_the_input_once_the_writer_sees_them(tmp_path):
    # var from 1e-14·eps to 1e4·eps in one layer: 1/invstd² − eps cannot give the smallest
    # (it reads ~1e-6·√eps for any var below ~1e-12), so once the writer has seen such a block
    # the probe reduces the input itself, for as long as a channel stays below 1e-3·eps.
    # Centred data goes back to BatchNorm's own statistics; the blocks that show near-eps
    # channels before the advice keep BatchNorm's, within 5e-4·√eps.
    model = nn.Sequential(nn.BatchNorm1d(10))
    eps = model[0].eps
    gen = torch.Generator().manual_seed(0)
    spread = torch.logspace(-7, 2, 10, dtype=torch.float64) * eps ** 0.5

    def batch(tiny):
        x = torch.randn(64, 10, generator=gen, dtype=torch.float64)
        return (x * spread + 1).float() if tiny else x.float()

    xs, plan = [], [(True, 2), (True, 4), (False, 2), (True, 2), (True, 4)]
    with statscope.record(model, tmp_path / "r", block_steps=2, step="manual") as rec:
        cap = rec.captures[0]
        assert not cap.reduce_bn
        for i, (tiny, n) in enumerate(plan):
            for _ in range(n):
                xs.append(batch(tiny))
                model(xs[-1])
                rec.step()
            if i in (0, 3):
                wait_for(lambda: cap.reduce_bn)  # the writer saw near-eps channels
            if i == 2:
                wait_for(lambda: not cap.reduce_bn)  # centred: BatchNorm's statistics
    got = statscope.open_run(tmp_path / "r").bn_std.values
    true = np.stack([x.double().std(0, correction=0).numpy() for x in xs])
    exact = [2, 3, 4, 5, 10, 11, 12, 13]  # the steps after the advice
    np.testing.assert_allclose(got[exact], true[exact], rtol=1e-5)
    for coarse in ([0, 1], [8, 9]):  # before it
        assert np.all(np.abs(got[coarse] - true[coarse]) <= 5e-4 * eps ** 0.5)
    assert np.all(np.abs(got[6:8] - true[6:8]) <= 1e-4 * np.sqrt(true[6:8] ** 2 + eps))


def test_near_eps_advice_reaches_the_probe_early_in_the_next_block(tmp_path):
    # The writer process reports a block's advice as soon as it has the rows, and the writer
    # thread polls for it: under steady training a probe on a channel that turns constant (var
    # 0, which 1/invstd² − eps cannot give) within the second block switches a few steps into
    # the third. It switched only at the fourth: the advice was read when the next block was
    # filed. (Constant from inside the block: at a block's first step, before the writer's
    # first advice, the probe makes the test itself, which would catch it there.)
    model = nn.Sequential(nn.BatchNorm1d(4))
    gen = torch.Generator().manual_seed(0)
    # (N, C, L): BatchNorm's own statistics as they are (no extra sum of the mean)
    xs = [torch.randn(8, 4, 2, generator=gen) for _ in range(40)] + [torch.ones(8, 4, 2)] * 88
    with statscope.record(model, tmp_path / "r", block_steps=32, step="manual",
                          writer="process") as rec:
        for x in xs:
            model(x)
            rec.step()
            time.sleep(0.005)  # a training step's time
    got = statscope.open_run(tmp_path / "r").bn_std.values
    assert np.all(got[:40] > 0.1) and np.all(got[40:64] > 0)  # BatchNorm's own: ~1e-6 for 0
    approximate = np.nonzero((got[40:] != 0).any(1))[0] + 40
    assert approximate.max() < 64 + 16 and np.all(got[80:] == 0)


@pytest.mark.parametrize("shape", [(8, 4), (8, 4, 5), (2, 4, 3, 3)])
def test_a_constant_channel_is_exactly_constant_from_the_first_step_on_the_cpu(tmp_path, shape):
    # a dead or pruned channel (constant over the batch from the start): BatchNorm's
    # 1/invstd² − eps read ~1e-6 instead of 0 for the first block, until the writer's advice
    model = nn.Sequential(nn.BatchNorm1d(4) if len(shape) < 4 else nn.BatchNorm2d(4))
    gen = torch.Generator().manual_seed(0)
    xs = []
    for _ in range(5):
        x = torch.randn(shape, generator=gen)
        x[:, 2] = 0.5  # channel 2 constant
        xs.append(x)
    with statscope.record(model, tmp_path / "r", block_steps=64) as rec:
        for x in xs:
            model(x)
        assert not rec.captures[0].advised
    ds = statscope.open_run(tmp_path / "r")
    assert np.all(ds.bn_std.values[:, 2] == 0)
    mean, var = reference([x.double() for x in xs])
    np.testing.assert_allclose(ds.bn_std.values, np.sqrt(var), rtol=1e-5, atol=1e-7)


def test_a_variance_that_overflows_batchnorm_is_reduced_from_the_input(tmp_path):
    # A diverging net: a BatchNorm's input reaches 1e27 and BatchNorm's own float32 variance
    # overflows (invstd 0), so bn_std read inf for the rest of the run while the generic path
    # and float64 give the std (~1e27, which float32 stores). Now inf only for the steps
    # before the writer's advice, and not at all for a layer that starts there (on the CPU the
    # probe makes the test at its first step).
    model = nn.Sequential(nn.BatchNorm1d(4))
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 4, generator=gen) * (1e27 if i >= 6 else 1.0) for i in range(40)]
    with pytest.warns(NonFiniteWarning, match="bn_std"):
        with statscope.record(model, tmp_path / "r", block_steps=8, step="manual") as rec:
            for i, x in enumerate(xs):
                model(x)
                rec.step()
                if i == 7:
                    wait_for(lambda: rec.captures[0].reduce_bn)
    got = statscope.open_run(tmp_path / "r").bn_std.values
    true = np.stack([x.double().std(0, correction=0).numpy() for x in xs])
    assert np.isinf(got[6:8]).all()  # before the advice: BatchNorm's own
    np.testing.assert_allclose(got[:6], true[:6], rtol=1e-5)
    np.testing.assert_allclose(got[8:], true[8:], rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with statscope.record(model, tmp_path / "s", block_steps=8) as rec:
            for x in xs[8:20]:
                model(x)
    got = statscope.open_run(tmp_path / "s").bn_std.values
    np.testing.assert_allclose(got, true[8:20], rtol=1e-5)


@pytest.mark.parametrize("layer, kinds", [
    # (N, C) and (N, C, L) inputs of one BatchNorm1d, batch sizes changing
    (lambda: nn.BatchNorm1d(6), [(16, 6), (9, 6), (4, 6, 5), (2, 6, 5), (2, 6, 5), (16, 6),
                                 (16, 6), (2, 6, 7)]),
    # contiguous and channels_last inputs of one BatchNorm2d, batch sizes changing (equal
    # strides, other counts) within a block and across its end
    (lambda: nn.BatchNorm2d(6), [(4, 6, 5, 3), (2, 6, 5, 3), (4, 6, 5, 3, "cl"),
                                 (2, 6, 5, 3, "cl"), (2, 6, 5, 3), (4, 6, 5, 3),
                                 (4, 6, 5, 3, "cl"), (4, 6, 5, 3)]),
])
def test_inputs_that_change_kind_from_step_to_step_are_each_filed_right(layer, kinds, tmp_path,
                                                                        bn_route):
    # the hot path remembers how to file the last kind of input (device, dtype, layout, shape):
    # a change of any of them, within a block and across its end, must be seen
    model = nn.Sequential(layer())
    gen = torch.Generator().manual_seed(0)
    xs = []
    with statscope.record(model, tmp_path / "r", block_steps=3, step="manual") as rec:
        for kind in kinds:
            shape, fmt = (kind[:-1], torch.channels_last) if kind[-1] == "cl" else (kind, None)
            x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 5
            x = x.float()
            xs.append(x.contiguous(memory_format=fmt) if fmt is not None else x)
            model(xs[-1])
            rec.step()
    ds = statscope.open_run(tmp_path / "r")
    assert [p["path"] for p in ds.attrs["probes"]] == ["batchnorm"]
    mean, var = reference([x.double() for x in xs])
    scale = np.sqrt(var + model[0].eps)
    assert np.all(np.abs(ds.bn_mean.values - mean) <= 1e-4 * scale)
    assert np.all(np.abs(ds.bn_std.values - np.sqrt(var)) <= 1e-4 * scale)
    assert (ds["count"].values == np.array([x.numel() // 6 for x in xs])[:, None]).all()


def test_steps_of_one_kind_of_input_take_the_hot_path(tmp_path, monkeypatch):
    # Capture.capture_bn recognises an input of the kind it saw last (the key it compares is
    # written out beside capture._input_key): only the first step of each block, which opens a
    # new segment, goes through Capture.capture
    from statscope.probes.capture import Capture

    slow = []
    general = Capture.capture
    monkeypatch.setattr(Capture, "capture", lambda self, x, slot, mask=None: (
        slow.append(slot), general(self, x, slot, mask))[1])
    for shape, fmt in (((16, 6), None), ((4, 6, 5, 3), torch.channels_last)):
        slow.clear()
        model = nn.Sequential(nn.BatchNorm1d(6) if len(shape) == 2 else nn.BatchNorm2d(6))
        with statscope.record(model, tmp_path / f"r{len(shape)}", block_steps=4,
                              step="manual") as rec:
            for x in inputs(shape, 12, fmt):
                model(x)
                rec.step()
        assert slow == [0, 0, 0]  # one per block of 4 steps


@pytest.mark.parametrize("dtype, shape, offset, seed", [
    (torch.bfloat16, (64, 2, 64, 64), 250, 0), (torch.bfloat16, (16, 4, 64, 64), 100, 5),
    (torch.float16, (32, 2, 64, 64), 250, 3)])
def test_low_precision_cpu_inputs_are_reduced_generically(tmp_path, dtype, shape, offset, seed):
    # torch's CPU kernel sums a bf16/fp16 channels_last input in float32: on one thread its
    # variance was off by 9.5e-3 (2^18 elements per channel, offset 250 std), 2.4e-4 (2^16,
    # offset 100) and 1.1e-4 (2^17, fp16) of itself (torch 2.13), beyond the fast path's 1e-4
    model = nn.Sequential(nn.BatchNorm2d(shape[1]))
    gen = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(shape, generator=gen) + offset).to(dtype)
          .to(memory_format=torch.channels_last) for _ in range(2)]
    ds = _record_on_one_thread(model, xs, tmp_path / "r")
    want = np.stack([x.double().transpose(0, 1).reshape(shape[1], -1).std(1, correction=0)
                     .numpy() for x in xs])
    np.testing.assert_allclose(ds.bn_std.values, want, rtol=1e-5)
