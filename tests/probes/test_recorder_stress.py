"""The recorder under stress: layers that skip steps, lazy models, warnings as errors, failures in
close, a second start, shape churn, idle training, and a randomized run checked step by step."""

import gc
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import statscope
from statscope.errors import NonFiniteWarning, RecordingError, StatscopeError
from statscope.store import verify_run


def no_writer_threads():
    return not any(t.name == "statscope-writer" and t.is_alive() for t in threading.enumerate())


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 5)

    def forward(self, x, use_a):
        return (self.a(x).sum(1) if use_a else 0) + self.b(x).sum(1)


def test_a_layer_that_skips_the_first_blocks_does_not_misfile_the_others(tmp_path):
    model = TwoBranches()
    xs = [torch.randn(6, 3) for _ in range(12)]
    with statscope.record(model, tmp_path / "r", layers=["a", "b"], where="output",
                          channel_dim=1, block_steps=4, step="forward"):
        for i, x in enumerate(xs):
            model(x, use_a=i >= 8)
    ds = statscope.open_run(tmp_path / "r")
    # probes whose channels are known only at their first forward join in the order they run
    assert ds.attrs["layers"] == ["b", "a"]
    count = ds["count"].values
    assert (count[:, ds.layer.values == "b"] == 6).all()
    assert (count[:8, ds.layer.values == "a"] == 0).all() and (count[8:, ds.layer.values == "a"] == 6).all()
    with torch.no_grad():
        want_b = np.stack([model.b(x).double().mean(0).numpy() for x in xs])
        want_a = np.stack([model.a(x).double().mean(0).numpy() for x in xs[8:]])
    np.testing.assert_allclose(ds.bn_mean.values[:, ds.layer.values == "b"], want_b, atol=1e-6)
    np.testing.assert_allclose(ds.bn_mean.values[8:, ds.layer.values == "a"], want_a, atol=1e-6)
    assert np.isnan(ds.bn_mean.values[:8, ds.layer.values == "a"]).all()


def test_set_attrs_before_the_first_forward_of_a_lazy_model_keeps_the_run(tmp_path):
    model = nn.Sequential(nn.LazyLinear(4), nn.LazyBatchNorm1d())
    with statscope.record(model, tmp_path / "r") as rec:
        rec.set_attrs(note="before any forward")
        for _ in range(3):
            model(torch.randn(5, 2))
    ds = statscope.open_run(tmp_path / "r")
    assert ds.attrs["note"] == "before any forward" and ds.sizes == {"step": 3, "neuron": 4}
    pending = statscope.record(nn.Sequential(nn.BatchNorm1d(2)), tmp_path / "p")
    pending.set_attrs(note="before start")
    with pending:
        pending.model(torch.randn(3, 2))
    assert statscope.open_run(tmp_path / "p").attrs["note"] == "before start"


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_warnings_as_errors_neither_kill_the_writer_nor_hang(tmp_path, writer):
    model = nn.Sequential(nn.BatchNorm1d(2))
    bad = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    done = threading.Event()
    caught = []

    def train():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                with statscope.record(model, tmp_path / "r", block_steps=1,
                                      writer=writer) as rec:
                    for _ in range(6):
                        model(bad)
                        rec.set_attrs(step_seen=rec.current_step)
            except NonFiniteWarning as w:
                caught.append(w)
        done.set()

    t = threading.Thread(target=train)
    t.start()
    assert done.wait(60), "training hung"
    t.join(5)
    assert caught, "the non-finite warning reached the training thread as an error"
    assert no_writer_threads()
    ds = statscope.open_run(tmp_path / "r")
    # The writer process reports non-finite values of the blocks it filed a moment later: the
    # warning interrupts training (the run is marked failed with it) or, when training ends
    # first, comes from close() after the run is complete.
    assert ds.attrs["status"] == "completed" and writer == "process" or (
        ds.attrs["status"] == "failed" and "NonFiniteWarning" in ds.attrs["error"])
    assert ds.attrs["nonfinite"]["bn_mean"] > 0
    assert ds.sizes["step"] >= 1 and np.isnan(ds.bn_mean.values[:, 1]).all()


def test_a_failure_inside_close_stops_the_thread_marks_the_run_and_keeps_the_training_error(
        tmp_path, monkeypatch):
    model = nn.Sequential(nn.BatchNorm1d(3))
    rec = statscope.record(model, tmp_path / "r", block_steps=64)

    def oom(n, aligned=True):
        raise RuntimeError("CUDA out of memory (simulated)")

    with pytest.raises(ValueError, match="training died") as info:
        with rec:
            for _ in range(3):
                model(torch.randn(4, 3))
            monkeypatch.setattr(rec.captures[0], "take_block", oom)
            raise ValueError("training died")
    assert no_writer_threads()
    ds = statscope.open_run(tmp_path / "r")
    assert ds.attrs["status"] == "failed" and "training died" in ds.attrs["error"]
    assert not info.value.__notes__ if hasattr(info.value, "__notes__") else True
    # without a training error, the failure in close is the error close raises
    rec2 = statscope.record(model, tmp_path / "s", block_steps=64).start()
    model(torch.randn(4, 3))
    model(torch.randn(4, 3))
    monkeypatch.setattr(rec2.captures[0], "take_block", oom)
    with pytest.raises(RecordingError, match="CUDA out of memory"):
        rec2.close()
    assert no_writer_threads()
    assert statscope.open_run(tmp_path / "s").attrs["status"] == "failed"


def test_a_recorder_starts_once(tmp_path):
    model = nn.Sequential(nn.BatchNorm1d(3))
    rec = statscope.record(model, tmp_path / "r", overwrite=True).start()
    with pytest.raises(StatscopeError, match="already started"):
        with rec:
            pass
    model(torch.randn(4, 3))
    rec.close()
    with pytest.raises(StatscopeError, match="already closed"):
        rec.start()
    assert no_writer_threads()
    assert statscope.open_run(tmp_path / "r").sizes["step"] == 1


def test_changing_shapes_keep_the_buffers_bounded_and_every_value_right(tmp_path):
    model = nn.Sequential(nn.LayerNorm(64))
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, int(n), 64, generator=gen) for n in
          torch.randint(16, 64, (40,), generator=gen)]
    rec = statscope.record(model, tmp_path / "r", block_steps=16, buffer_bytes=4 << 20)
    with rec:
        for x in xs:
            model(x)
            assert rec.pool.held(torch.device("cpu")) <= 4 << 20
    assert rec.captures[0].always_moments  # dynamic padding: reduced per step after a few shapes
    ds = statscope.open_run(tmp_path / "r")
    want = np.stack([x.double().reshape(-1, 64).std(0, correction=0).numpy() for x in xs])
    np.testing.assert_allclose(ds.bn_std.values, want, rtol=2e-5)
    assert ds["count"].values[:, 0].tolist() == [8 * x.shape[1] for x in xs]


def test_steps_reach_the_store_within_flush_seconds_while_training_is_idle(tmp_path):
    model = nn.Sequential(nn.BatchNorm1d(3))
    with statscope.record(model, tmp_path / "r", block_steps=4, flush_seconds=0.2,
                          step="forward"):
        for _ in range(6):
            model(torch.randn(4, 3))
        deadline = time.monotonic() + 10
        while statscope.open_run(tmp_path / "r").sizes["step"] < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        # the sixth step ends only when a seventh begins (or at close)
        assert statscope.open_run(tmp_path / "r").sizes["step"] == 5
        model(torch.randn(4, 3))
    ds = statscope.open_run(tmp_path / "r")
    assert ds.step.values.tolist() == list(range(7)) and (ds["count"].values == 4).all()



def _wait_until(what, seconds=15):
    deadline = time.monotonic() + seconds
    while not what() and time.monotonic() < deadline:
        time.sleep(0.05)
    return what()


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_an_optimizer_step_reaches_the_store_while_training_is_idle(tmp_path, writer):
    """Under the optimizer rule the last step is committed while training is idle after its
    optimizer.step() (a kill then loses nothing), and what is logged for it afterwards (an
    evaluation's accuracy, in the store already or only staged) is filed into it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = [torch.randn(5, 3) for _ in range(7)]
    seen = []

    def steps(xs_, first):
        for i, x in enumerate(xs_):
            with torch.no_grad():
                seen.append(model[0](x).double())
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            rec.log(loss=float(first + i))

    def scalar(name, step):
        ds = statscope.open_run(tmp_path / "r")
        return (ds.sizes["step"] > step and name in ds
                and float(ds[name].values[step]) == float(step) * 10)

    with statscope.record(model, tmp_path / "r", block_steps=4, flush_seconds=0.2,
                          writer=writer) as rec:
        steps(xs[:5], 0)  # a block of four handed over, step 4 waits for its end
        assert _wait_until(lambda: statscope.open_run(tmp_path / "r").sizes["step"] == 5)
        rec.log(acc=40.0)  # the evaluation after step 4: a new name, for a committed row
        assert _wait_until(lambda: scalar("acc", 4))
        steps(xs[5:6], 5)
        assert _wait_until(lambda: statscope.open_run(tmp_path / "r").sizes["step"] == 6)
        rec.log(acc=50.0)  # staged or written: filed into step 5 either way
        steps(xs[6:], 6)
    ds = statscope.open_run(tmp_path / "r")
    assert ds.step.values.tolist() == list(range(7))
    np.testing.assert_array_equal(ds.loss.values, np.arange(7.0))
    np.testing.assert_array_equal(ds.acc.values, [np.nan] * 4 + [40.0, 50.0, np.nan])
    want = np.stack([x.mean(0).numpy() for x in seen])
    np.testing.assert_allclose(ds.bn_mean.values, want, atol=1e-6)
    assert verify_run(tmp_path / "r") == []

def test_optimizer_steps_are_the_steps_by_default(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    teacher = nn.Sequential(nn.Linear(3, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD(teacher.parameters(), lr=0.1)
    xs = [torch.randn(5, 3) for _ in range(12)]
    firsts = []
    with statscope.record(model, tmp_path / "r", block_steps=4) as rec:
        for step in range(4):
            for micro in range(3):  # gradient accumulation
                x = xs[3 * step + micro]
                if micro == 0:
                    with torch.no_grad():
                        firsts.append(model[0](x).double())
                model(x).sum().backward()
                teacher(x).sum().backward()
                other.step()  # another model's optimizer: not a step of this run
            opt.step()
            opt.zero_grad()
            rec.log(loss=float(step))
    ds = statscope.open_run(tmp_path / "r")
    assert ds.attrs["step_rule"] == "optimizer" and ds.sizes["step"] == 4
    np.testing.assert_array_equal(ds.loss.values, np.arange(4.0))
    want = np.stack([f.mean(0).numpy() for f in firsts])
    np.testing.assert_allclose(ds.bn_mean.values, want, atol=1e-6)
    # no optimizer at all: each forward is a step
    with statscope.record(model, tmp_path / "f") as rec:
        for x in xs[:3]:
            model(x)
    f = statscope.open_run(tmp_path / "f")
    assert f.attrs["step_rule"] == "forward" and f.sizes["step"] == 3


class TwoViews(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(3, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.lin(x))


@pytest.mark.parametrize("seed", range(6))
def test_a_step_that_gradscaler_skips_is_a_step_of_its_own(tmp_path, seed):
    # GradScaler skips optimizer.step where the scaled gradients are not finite (here: a loss
    # times inf makes them so): no optimizer hook fires, but the gradients are discarded by
    # zero_grad. Each iteration must be one step holding its first micro-batch's statistics
    # and its own logged value, also when steps are skipped before the first optimizer step
    # (while step="auto" is still undecided), under gradient accumulation and with two
    # forwards per backward.
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = TwoViews()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    micro = int(rng.integers(1, 4))
    views = int(rng.integers(1, 3))  # forwards per backward
    iterations = int(rng.integers(12, 30))
    skipped = {0, 1, *rng.choice(iterations, 4, replace=False).tolist()}
    every, zero_first = int(rng.choice([1, 2])), bool(rng.integers(2))
    firsts = {}
    step = {"now": 0}

    def keep_first(module, args):
        firsts.setdefault(step["now"], args[0].detach().double().clone())

    model.bn.register_forward_pre_hook(keep_first)
    scales = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", statscope.StatscopeWarning)
        # step="auto" decides within the first block_steps forwards, which the first
        # iteration's micro * views must leave room for
        block_steps = int(rng.integers(2, 9)) + micro * views
        with statscope.record(model, tmp_path / "r", block_steps=block_steps, every=every,
                              step=str(rng.choice(["auto", "optimizer"]))) as rec:
            for i in range(iterations):
                step["now"] = i
                if zero_first:
                    opt.zero_grad()
                for k in range(micro):
                    loss = sum(model(torch.randn(5, 3)).pow(2).mean() for _ in range(views))
                    if i in skipped and k == 0:
                        loss = loss * float("inf")
                    scaler.scale(loss).backward()
                scaler.step(opt)
                scales.append(scaler.get_scale())
                scaler.update()
                if not zero_first:
                    opt.zero_grad()
                rec.log(iteration=i)
    # the scaler did skip exactly these iterations: it halves its scale after each
    after = scales[1:] + [scaler.get_scale()]
    assert {i for i in range(iterations) if after[i] < scales[i]} == skipped
    ds = statscope.open_run(tmp_path / "r")
    steps = list(range(0, iterations, every))
    assert ds.attrs["step_rule"] == "optimizer" and ds.step.values.tolist() == steps
    np.testing.assert_array_equal(ds.iteration.values, steps)
    want = np.stack([firsts[i].mean(0).numpy() for i in steps])
    np.testing.assert_allclose(ds.bn_mean.values, want, atol=1e-6)
    np.testing.assert_array_equal(ds["count"].values[:, 0], 5)


@pytest.mark.parametrize("step", ["auto", "optimizer"])
def test_sams_second_forward_on_perturbed_weights_is_a_micro_batch(tmp_path, step):
    # SAM (Foret et al.; davda54/sam's loop): forward and backward, move the weights up the
    # gradient and zero it, forward and backward again there, restore the weights and let the
    # base optimizer step. Its gradients are discarded between the forwards like a skipped
    # step's, but the weights changed: one step per optimizer step, the first forward's
    torch.manual_seed(0)
    model = TwoViews()
    base = torch.optim.SGD(model.parameters(), lr=0.01)
    firsts = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", statscope.StatscopeWarning)
        with statscope.record(model, tmp_path / "r", step=step, block_steps=4) as rec:
            for i in range(10):
                x = torch.randn(5, 3)
                with torch.no_grad():
                    firsts.append(model.lin(x).double())
                model(x).pow(2).mean().backward()
                with torch.no_grad():  # first_step(zero_grad=True)
                    e = {p: 0.05 * p.grad / (p.grad.norm() + 1e-12) for p in model.parameters()}
                    for p, d in e.items():
                        p.add_(d)
                base.zero_grad()
                model(x).pow(2).mean().backward()
                with torch.no_grad():  # second_step(zero_grad=True)
                    for p, d in e.items():
                        p.sub_(d)
                base.step()
                base.zero_grad()
                rec.log(iteration=i)
    ds = statscope.open_run(tmp_path / "r")
    assert ds.attrs["step_rule"] == "optimizer" and ds.sizes["step"] == 10
    np.testing.assert_array_equal(ds.iteration.values, np.arange(10))
    np.testing.assert_allclose(ds.bn_mean.values,
                               np.stack([f.mean(0).numpy() for f in firsts]), atol=1e-6)


def test_a_skipped_step_whose_gradients_are_zeroed_in_place_merges_with_the_next(tmp_path):
    # zero_grad(set_to_none=False) leaves zeros, as accumulation leaves sums: statscope cannot
    # tell the two apart and files the skipped iteration with the next, as documented
    model = TwoViews()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    with pytest.warns(statscope.StatscopeWarning, match="forwards per optimizer step vary"):
        with statscope.record(model, tmp_path / "r") as rec:
            for i in range(6):
                loss = model(torch.randn(5, 3)).pow(2).mean() * (float("inf") if i == 3 else 1)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=False)
                rec.log(iteration=i)
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes["step"] == 5


def test_varying_forwards_per_step_warn_once(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(statscope.StatscopeWarning, match="forwards per optimizer step vary"):
        with statscope.record(model, tmp_path / "r"):
            for micro in (2, 2, 3, 1):
                for _ in range(micro):
                    model(torch.randn(4, 3)).sum().backward()
                opt.step()
    assert statscope.open_run(tmp_path / "r").sizes["step"] == 4


def test_a_zero_size_batch_mid_run_does_not_stop_recording(tmp_path):
    model = nn.Sequential(nn.BatchNorm1d(3))
    sizes = [4, 0, 4, 4, 0, 2]
    with statscope.record(model, tmp_path / "r", block_steps=2, step="forward"):
        for n in sizes:
            model(torch.randn(n, 3))  # torch accepts an empty batch
    ds = statscope.open_run(tmp_path / "r")
    assert ds["count"].values[:, 0].tolist() == sizes
    assert np.isfinite(ds.bn_mean.values[[0, 2, 3, 5]]).all()
    assert np.isnan(ds.bn_mean.values[[1, 4]]).all() and ds.attrs["nonfinite"] == {}


def test_the_accessor_exists_however_open_run_was_imported(tmp_path):
    code = ("import sys, numpy as np\n"
            "from statscope.writer import write_run\n"
            "from statscope.store import open_run\n"
            "d = {k: np.ones((4, 2), 'f4') for k in ('bn_mean', 'bn_std')}\n"
            "d.update({k: np.ones((4, 1), 'f4') for k in ('en_mean', 'en_std')})\n"
            "write_run(sys.argv[1], {'a': 2}, d)\n"
            "print(open_run(sys.argv[1]).statscope.fluctuation(window=3).sizes['neuron'])\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"


class Branchy(nn.Module):
    """Three Linear+BN branches; each step runs a subset of them."""

    def __init__(self, c=(3, 4, 5)):
        super().__init__()
        self.lin = nn.ModuleList(nn.Linear(6, k) for k in c)
        self.bn = nn.ModuleList(nn.BatchNorm1d(k) for k in c)

    def forward(self, x, which):
        return sum(self.bn[i](self.lin[i](x)).sum() for i in which)


@pytest.mark.parametrize("seed", range(3))
def test_randomized_steps_land_under_the_right_layer_with_their_true_count(tmp_path, seed):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = Branchy()
    seen = {i: {} for i in range(3)}
    step = {"now": 0}

    def keep(i):
        def hook(module, args):
            seen[i].setdefault(step["now"], args[0].detach().double().clone())
        return hook

    hooks = [model.bn[i].register_forward_pre_hook(keep(i)) for i in range(3)]
    n_steps = int(rng.integers(20, 60))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        with statscope.record(model, tmp_path / "r", block_steps=int(rng.integers(1, 9)),
                              step="forward", flush_seconds=float(rng.choice([0.05, 5.0]))):
            for s in range(n_steps):
                step["now"] = s
                which = [i for i in range(3) if rng.random() < 0.6]
                n = int(rng.choice([2, 3, 7]))
                x = torch.randn(n, 6)
                if rng.random() < 0.1:
                    x[0, 0] = float("nan")
                model(x, which)
                if rng.random() < 0.1:
                    time.sleep(0.1)  # idle: the writer thread flushes on its own
    for h in hooks:
        h.remove()
    ds = statscope.open_run(tmp_path / "r")
    assert ds.step.values.tolist() == list(range(n_steps))
    for i in range(3):
        cols = ds.layer.values == f"bn.{i}"
        for s in range(n_steps):
            got = ds.bn_mean.values[s, cols]
            count = ds["count"].values[s, cols]
            if s in seen[i]:
                x = seen[i][s].numpy()
                assert (count == x.shape[0]).all()
                np.testing.assert_allclose(got, x.mean(0), atol=1e-5, equal_nan=True)
            else:
                assert (count == 0).all() and np.isnan(got).all()
    gc.collect()
    assert no_writer_threads()


def test_the_writer_failing_mid_run_stops_recording_without_stopping_training(tmp_path, monkeypatch):
    from statscope.writer import RunWriter

    model = nn.Sequential(nn.BatchNorm1d(3))
    calls = {"n": 0}
    real = RunWriter.flush

    def flaky(self):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(28, "No space left on device")
        return real(self)

    monkeypatch.setattr(RunWriter, "flush", flaky)
    # the fault is patched into this process; tests/statscope/test_writer_process.py fails a
    # writer process's disk for real
    rec = statscope.record(model, tmp_path / "r", block_steps=2, flush_seconds=1e-3,
                           writer="thread").start()
    with pytest.warns(statscope.StatscopeWarning, match="recording .*stopped"):
        for _ in range(20):
            model(torch.randn(4, 3))
            time.sleep(0.01)
    with pytest.raises(RecordingError, match="No space left"):
        rec.close()
    assert no_writer_threads()
    monkeypatch.setattr(RunWriter, "flush", real)
    ds = statscope.open_run(tmp_path / "r")
    assert ds.attrs["status"] == "failed" and ds.sizes["step"] >= 1


def test_every_records_one_step_in_k_with_true_step_numbers(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = [torch.randn(5, 3) for _ in range(11)]
    firsts = []
    with statscope.record(model, tmp_path / "r", every=3, block_steps=2) as rec:
        for i, x in enumerate(xs):
            with torch.no_grad():
                firsts.append(model[0](x).double().mean(0).numpy())
            model(x).sum().backward()
            opt.step()
            rec.log(loss=float(i))
    ds = statscope.open_run(tmp_path / "r")
    assert ds.step.values.tolist() == [0, 3, 6, 9] and ds.attrs["every"] == 3
    np.testing.assert_allclose(ds.bn_mean.values, np.stack(firsts)[[0, 3, 6, 9]], atol=1e-6)
    np.testing.assert_array_equal(ds.loss.values, [0.0, 3.0, 6.0, 9.0])
    with statscope.record(model, tmp_path / "r", every=3, resume=True) as rec:
        assert rec.current_step == 10
        for x in xs[:5]:
            model(x).sum().backward()
            opt.step()
    assert statscope.open_run(tmp_path / "r").step.values.tolist() == [0, 3, 6, 9, 12]  # 10..14
    with pytest.raises(statscope.StoreError, match="every=2"):
        statscope.record(model, tmp_path / "r", every=2, resume=True).start()


class SometimesBranch(nn.Module):
    """A BatchNorm on the main path, and one on a branch the caller switches on and off."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 6), nn.BatchNorm1d(6)
        self.branch = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 6))
        self.out = nn.Linear(6, 1)
        self.use_branch = False

    def forward(self, x):
        h = self.bn(self.fc(x))
        if self.use_branch:
            h = h + self.branch(h)
        return self.out(h)


@pytest.mark.parametrize("seed", range(4))
def test_a_layer_first_run_in_a_later_micro_batch_keeps_that_capture_under_auto(tmp_path,
                                                                                 seed):
    # "the micro-batches of one step are one step, and the first forward of each layer is
    # recorded": step="auto" learns that forwards were micro-batches only at the first
    # optimizer step, and must then keep a layer's first capture among them, as "optimizer"
    rng = np.random.default_rng(seed)
    micro, iterations = int(rng.integers(2, 4)), int(rng.integers(3, 7))
    runs = {}
    for rule in ("auto", "optimizer"):
        torch.manual_seed(seed)
        model = SometimesBranch()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(seed)
        firsts: dict[int, torch.Tensor] = {}
        step = {"now": 0}

        def keep_first(module, args):
            firsts.setdefault(step["now"], args[0].detach().double().clone())

        model.branch[1].register_forward_pre_hook(keep_first)
        on = rng.random((iterations, micro)) < 0.5
        on[0] = [False] * (micro - 1) + [True]  # the first step's branch: its last micro-batch
        with statscope.record(model, tmp_path / rule, step=rule, block_steps=16):
            for i in range(iterations):
                step["now"] = i
                for k in range(micro):
                    model.use_branch = bool(on[i, k])
                    model(torch.randn(8, 4, generator=gen)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        ds = statscope.open_run(tmp_path / rule)
        branch = ds.sel(neuron=ds.layer == "branch.1")
        want = np.stack([firsts[i].mean(0).numpy() if i in firsts else np.full(5, np.nan)
                         for i in range(iterations)])
        np.testing.assert_allclose(branch.bn_mean.values, want, atol=1e-6, err_msg=rule)
        np.testing.assert_array_equal(branch["count"].values[:, 0],
                                      [8 if i in firsts else 0 for i in range(iterations)])
        runs[rule] = ds
    assert runs["auto"].attrs["step_rule"] == "optimizer"


class DroppedBlocks(nn.Module):
    """Two residual blocks with a BatchNorm each (the first probed layer is in block 0), either
    of which the caller can drop for an iteration (stochastic depth), and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6))
                                    for _ in range(2))
        self.head = nn.Linear(6, 1)
        self.drop = set()

    def forward(self, x):
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            if i not in self.drop:
                h = h + block(h)
        return self.head(h)


def test_a_step_gradscaler_skips_while_the_first_probed_layer_is_dropped_is_its_own(tmp_path):
    # the backward of such a step never reaches the first probed layer's parameters: the
    # skipped step must still be one of its own, never merged with the next iteration's
    # forwards (which would mix layers of two batches in one step)
    torch.manual_seed(0)
    model = DroppedBlocks()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    firsts: dict[tuple[int, str], torch.Tensor] = {}
    now = {"i": 0}
    for name in ("blocks.0.1", "blocks.1.1"):
        def keep(module, args, name=name):
            firsts.setdefault((now["i"], name), args[0].detach().double().clone())

        model.get_submodule(name).register_forward_pre_hook(keep)
    plan = {3: ({0}, True), 5: ({0}, True), 6: (set(), True), 8: ({0}, False)}  # drop, inf
    with statscope.record(model, tmp_path / "r", block_steps=4) as rec:
        for i in range(10):
            now["i"] = i
            model.drop, inf = plan.get(i, (set(), False))
            loss = model(torch.randn(8, 4)).pow(2).mean()
            scaler.scale(loss * float("inf") if inf else loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            rec.log(iteration=i)
    ds = statscope.open_run(tmp_path / "r")
    assert ds.step.values.tolist() == list(range(10))
    np.testing.assert_array_equal(ds.iteration.values, np.arange(10))
    for name in ("blocks.0.1", "blocks.1.1"):
        layer = ds.sel(neuron=ds.layer == name)
        want = np.stack([firsts[(i, name)].mean(0).numpy() if (i, name) in firsts
                         else np.full(6, np.nan) for i in range(10)])
        np.testing.assert_allclose(layer.bn_mean.values, want, atol=1e-6, err_msg=name)


KILLED_WHILE_IDLE = """
import os, signal, sys, time
import torch, statscope
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
rec = statscope.record(model, sys.argv[1], flush_seconds=0.2).start()
for step in range(5):
    model(torch.randn(16, 4)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    rec.log(loss=float(step))
deadline = time.monotonic() + 20  # an evaluation, a checkpoint: the loop is idle
while statscope.open_run(sys.argv[1]).attrs["n_steps"] < 5 and time.monotonic() < deadline:
    time.sleep(0.05)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_a_process_killed_while_idle_after_an_optimizer_step_keeps_that_step(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_IDLE, str(tmp_path / "r")],
                          timeout=120, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    ds = statscope.open_run(tmp_path / "r")
    assert ds.attrs["status"] == "running" and ds.step.values.tolist() == list(range(5))
    np.testing.assert_array_equal(ds.loss.values, np.arange(5.0))
    assert verify_run(tmp_path / "r") == []
