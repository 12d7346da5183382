"""The BatchNorm fast path's C++ probe (statscope/csrc/bn_probe.cpp) and its BnRows buffer.

The C++ probe takes the common case of a BatchNorm probe's step in one call and leaves every
other case to the Python probe: each run here is recorded with both, and their stores must be
equal bit for bit, and right against numpy on the layers' inputs.
"""

import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import statscope
from statscope import native
from statscope.errors import StatscopeWarning
from statscope.probes import fastpath, hooks
from statscope.probes.reduce import StackedRun
from statscope.probes.segments import BnRows, Segment, readable, stack_segment

VARIABLES = ("bn_mean", "bn_std", "en_mean", "en_std", "count")


@pytest.fixture
def probe(bn_route):
    return bn_route


class Model(nn.Module):
    """BatchNorms of each kind of CPU input: (N, C), (N, C, L), NCHW and channels_last maps,
    one that runs only every third step, and one in float64."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.flat = nn.BatchNorm1d(6)
        self.seq = nn.BatchNorm1d(3, momentum=None)
        self.conv = nn.Conv2d(3, 4, 1)
        self.maps = nn.BatchNorm2d(4)
        self.last = nn.BatchNorm2d(4, affine=False)
        self.rare = nn.BatchNorm1d(6, eps=1e-3)
        self.wide = nn.BatchNorm1d(2).double()

    def forward(self, a, b, rare=False, fail=False):
        h = self.flat(self.fc(a))
        if fail:
            raise RuntimeError("a bad batch")
        out = h.sum() + self.seq(a[:, :3, None].expand(-1, -1, 4) * 2).sum()
        m = self.conv(b)
        out = out + self.maps(m).sum() + self.last(m.contiguous(
            memory_format=torch.channels_last)).sum()
        if rare:
            out = out + self.rare(h * 3 + 1).sum()
        return out + self.wide(a[:, :2].double() * 5 - 2).sum().float()


def train(path, steps=15, block_steps=4, flush_at=(7,), seen=None):
    """A run with what real loops do between the common steps: a batch size that changes
    within a block, an eval forward, a forward that raises, micro-batches of one optimizer step,
    a layer that skips steps and a flush mid-block. ``seen`` collects, per step, each layer's
    input of the forward that the step records (its first training forward that finished)."""
    torch.manual_seed(0)
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    pending = {}

    def keep(module, args, name):
        if module.training:
            pending.setdefault(name, args[0].detach().double())

    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_pre_hook(lambda m, args, name=name: keep(m, args, name))
    with pytest.warns(StatscopeWarning, match="forwards per optimizer step vary"), \
            statscope.record(model, path, block_steps=block_steps) as rec:
        for step in range(steps):
            n = 8 if step < 6 else 5
            a = torch.randn(n, 5, generator=gen) * (1 + step) + 3
            b = torch.randn(n, 3, 2, 3, generator=gen) - 2
            pending.clear()
            if step == 4:
                model.eval()
                with torch.no_grad():
                    model(a, b)
                model.train()
            if step == 11:
                with pytest.raises(RuntimeError, match="a bad batch"):
                    model(a, b, fail=True)
                pending.clear()  # the failed forward's layers are discarded
            model(a, b, rare=step % 3 == 0).backward()
            if seen is not None:
                seen.append(dict(pending))
            if step == 9:  # a second micro-batch of the same optimizer step
                model(a * 0.5, b, rare=True).backward()
            opt.step()
            opt.zero_grad()
            if step in flush_at:
                assert rec.flush(timeout=30)
    return statscope.open_run(path).load()


def test_the_cpp_probe_files_what_the_python_probe_files(probe, tmp_path):
    kind, calls = probe
    seen = []
    ds = train(tmp_path / "r", seen=seen)
    # against numpy on each layer's input, where the step recorded one
    for name in ("flat", "seq", "maps", "last", "rare", "wide"):
        rows = ds.sel(neuron=ds.layer == name)
        for step, inputs in enumerate(seen):
            x = inputs.get(name)
            if x is None:
                assert (rows["count"].values[step] == 0).all()
                continue
            per = x.movedim(1, -1).reshape(-1, x.shape[1]).numpy()
            scale = np.sqrt(per.var(0) + 1e-3)
            np.testing.assert_array_less(np.abs(rows.bn_mean.values[step] - per.mean(0)),
                                         1e-4 * scale + 1e-6)
            np.testing.assert_array_less(np.abs(rows.bn_std.values[step] - per.std(0)),
                                         1e-4 * scale + 1e-6)
    if kind == "cpp":
        assert calls, "the C++ probe never fell back"
        assert len(calls) < 0.6 * sum(len(s) for s in seen)  # the common case is its own


def test_both_probes_record_the_same_bits(tmp_path, monkeypatch):
    if native.kernels(wait=True) is None:
        pytest.skip(f"statscope's C++ kernels: {native.status()}")
    cpp = train(tmp_path / "cpp")
    monkeypatch.setattr(hooks, "_install_native",
                        lambda rec, cap, cell, fallback, building, transformed=False:
                        building.__setitem__(0, False))
    python = train(tmp_path / "python")
    for name in VARIABLES:
        np.testing.assert_array_equal(cpp[name].values, python[name].values, err_msg=name)


def test_the_common_case_is_one_call_and_the_buffer_holds_the_rows(probe, tmp_path):
    kind, calls = probe
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))  # NCHW: BatchNorm's own mean
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, 3, 3, generator=gen) for _ in range(12)]
    with statscope.record(model, tmp_path / "r", block_steps=4, step="manual") as rec:
        for x in xs:
            model(x)
            if kind == "cpp":
                assert type(rec.captures[0]._rows) is BnRows
            rec.step()
    if kind == "cpp":
        assert len(calls) == 3  # the first step of each block opens its segment in Python
    ds = statscope.open_run(tmp_path / "r").load()
    y = [model[0](x).detach().double().movedim(1, -1).reshape(-1, 4).numpy() for x in xs]
    scale = np.sqrt(np.stack([v.var(0) for v in y]) + 1e-5)
    assert np.all(np.abs(ds.bn_std.values - np.stack([v.std(0) for v in y])) <= 1e-4 * scale)


def test_a_lock_held_by_the_writer_sends_the_step_to_the_probe_that_waits(probe, tmp_path):
    # the C++ probe takes the recorder's lock without blocking; held elsewhere, the Python
    # probe waits for it: the step is recorded once the holder lets go, nothing hangs
    kind, calls = probe
    model = nn.Sequential(nn.BatchNorm2d(3))
    xs = [torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with statscope.record(model, tmp_path / "r", block_steps=8, step="manual") as rec:
        model(xs[0])
        rec.step()
        held, release = threading.Event(), threading.Event()

        def hold():
            with rec._lock:
                held.set()
                release.wait(10)

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        assert held.wait(10)
        timer = threading.Timer(0.3, release.set)
        timer.start()
        t0 = time.monotonic()
        model(xs[1])
        waited = time.monotonic() - t0
        holder.join(10)
        assert not holder.is_alive()
        rec.step()
        model(xs[2])
        rec.step()
    assert waited >= 0.2  # the forward waited for the lock, and then went on
    if kind == "cpp":
        assert len(calls) == 2  # the first step, and the one whose lock was held
    ds = statscope.open_run(tmp_path / "r").load()
    want = np.stack([x.double().std((0, 2, 3), correction=0).numpy() for x in xs])
    np.testing.assert_allclose(ds.bn_std.values, want, rtol=1e-5)


def _entry(value, channels=3, dtype=torch.float32, eps=1e-5):
    return ("invstd", torch.full((channels,), float(value), dtype=dtype),
            torch.full((channels,), 1.0 + value, dtype=dtype), eps)


def _same(a, b):
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


_ENTRIES = st.one_of(
    st.none(),
    st.integers(0, 50).map(_entry),  # what the buffer holds
    st.integers(0, 50).map(lambda v: _entry(v, eps=1e-3)),  # another eps: kept as it is
    st.integers(0, 50).map(lambda v: _entry(v, dtype=torch.float64)),
    st.integers(0, 50).map(lambda v: ("mv", torch.full((7,), float(v)))),  # another kind
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), _ENTRIES), max_size=20),
       st.integers(0, 6), st.integers(0, 6))
def test_bn_rows_behave_as_the_list_of_entries_they_stand_for(writes, lo, hi):
    rows, ref = BnRows(6, 3, torch.float32, 1e-5), [None] * 6
    for index, entry in writes:
        rows[index] = entry
        ref[index] = entry
    assert len(rows) == 6
    assert all(_same(a, b) for a, b in zip(rows, ref))
    assert all(_same(a, b) for a, b in zip(rows[lo:hi], ref[lo:hi]))
    run = rows.run(lo, hi)
    fits = [e is not None and e[0] == "invstd" and e[3] == 1e-5 and e[1].dtype == torch.float32
            for e in ref[lo:hi]]
    assert (type(run) is StackedRun) == (hi > lo and all(fits))  # stacked whenever it can be
    assert all(_same(run[i], ref[lo + i]) for i in range(max(hi - lo, 0)))
    seg = Segment(2, 2 + max(hi - lo, 0), refs=rows, offset=lo)
    for out in (readable(seg), stack_segment(seg)):
        assert type(out.refs) is not BnRows
        got = [out.refs[out.offset + i] for i in range(out.stop - out.start)]
        assert all(_same(a, b) for a, b in zip(got, ref[lo:hi]))


def test_the_check_of_the_cpp_forward_against_torch_runs_once_and_returns(monkeypatch):
    # it checks the Python mirror first, which takes the same lock: from a fresh process's
    # state (neither checked yet) it must return, not wait for itself
    kernels = native.kernels(wait=True)
    if kernels is None:
        pytest.skip(f"statscope's C++ kernels: {native.status()}")
    monkeypatch.setattr(fastpath, "_check", {})
    got = []
    checker = threading.Thread(target=lambda: got.append(fastpath.native_forward_is_exact(kernels)),
                               daemon=True)
    checker.start()
    checker.join(60)
    assert not checker.is_alive(), "the check waited for its own lock"
    assert got == [True] and fastpath._check == {"ok": True, "native": True}


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.BatchNorm1d(3), (4, 3)), (lambda: nn.BatchNorm1d(3, momentum=None), (4, 3, 5)),
    (lambda: nn.BatchNorm2d(3, affine=False), (2, 3, 4, 4)),
    (lambda: nn.BatchNorm3d(3, track_running_stats=False), (2, 3, 2, 2, 2)),
    (lambda: nn.BatchNorm2d(3).double(), (2, 3, 4, 4))])
def test_the_cpp_forward_is_torchs_forward_bit_for_bit(make, shape):
    # the C++ twin of the fast path's mirror, called as the probe calls it, against torch's own
    # forward: output, gradients, running statistics and the step count
    kernels = native.kernels(wait=True)
    if kernels is None:
        pytest.skip(f"statscope's C++ kernels: {native.status()}")
    torch.manual_seed(0)
    ours, ref = make(), make()
    ours.load_state_dict(ref.state_dict())
    dims = fastpath.native_dims(ours)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in ref.state_dict().values()) \
        else torch.float32
    for step in range(3):
        x = (torch.randn(shape, dtype=dtype) * 3 + step).requires_grad_(True)
        got = kernels.batchnorm_train(ours, x, dims)
        want = ref(x)
        out, mean, invstd = got
        grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        (gx,) = torch.autograd.grad(out, x, grad)
        (wx,) = torch.autograd.grad(want, x, grad)
        assert torch.equal(out, want) and torch.equal(gx, wx)
        per = x.detach().double().movedim(1, -1).reshape(-1, shape[1])
        np.testing.assert_allclose(mean.double().numpy(), per.mean(0).numpy(), rtol=1e-6,
                                   atol=1e-6)
        for a, b in zip(ours.buffers(), ref.buffers()):
            assert torch.equal(a, b)
    # inputs it leaves to the Python mirror: nothing done
    tracked = [b.clone() for b in ours.buffers()]
    assert kernels.batchnorm_train(ours, torch.randn(1, 3, *shape[2:], dtype=dtype), dims) is None \
        or shape[2:]  # one value per channel: torch's check, in Python
    assert kernels.batchnorm_train(ours, torch.randn(2, 3, *shape[2:], 1, 1, 1, dtype=dtype),
                                   dims) is None
    if shape[2:] == ():
        assert all(torch.equal(a, b) for a, b in zip(ours.buffers(), tracked))
