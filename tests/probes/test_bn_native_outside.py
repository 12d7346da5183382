"""The BatchNorm fast path (C++ and Python routes) checked from outside: bit-identity with an
unprobed copy trained side by side, stored statistics against numpy float64 on the layers'
inputs, and the two routes' stores equal bit for bit (also with pauses, threads and a held
lock)."""

import contextlib
import copy
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

import statscope
from statscope import native
from statscope.errors import StatscopeWarning
from statscope.probes import hooks

VARIABLES = ("bn_mean", "bn_std", "en_mean", "en_std", "count")


class Wrap(nn.Module):
    def __init__(self, bn, mode=None):
        super().__init__()
        self.bn = bn
        self.mode = mode

    def forward(self, x):
        if self.mode == "ckpt-reentrant":
            return checkpoint(self.bn, x, use_reentrant=True)
        if self.mode == "ckpt":
            return checkpoint(self.bn, x, use_reentrant=False)
        return self.bn(x)


def _double(m, args):
    return (args[0] * 2 - 1,)


def _out_hook(m, args, out):
    return out * 3


class _Scale(nn.Module):
    def forward(self, w):
        return w * 2


CASES = {
    "bn1d-nc": (lambda: nn.BatchNorm1d(4), (8, 4), None),
    "bn1d-ncl": (lambda: nn.BatchNorm1d(4), (6, 4, 5), None),
    "bn2d": (lambda: nn.BatchNorm2d(3), (4, 3, 5, 5), None),
    "bn2d-cl": (lambda: nn.BatchNorm2d(3), (4, 3, 5, 5), torch.channels_last),
    "bn3d": (lambda: nn.BatchNorm3d(3), (2, 3, 2, 3, 4), None),
    "float64": (lambda: nn.BatchNorm2d(3).double(), (4, 3, 3, 3), None),
    "momentum-none": (lambda: nn.BatchNorm1d(4, momentum=None), (8, 4), None),
    "affine-false": (lambda: nn.BatchNorm2d(3, affine=False), (4, 3, 3, 3), None),
    "no-track": (lambda: nn.BatchNorm2d(3, track_running_stats=False), (4, 3, 3, 3), None),
    "lazy": (lambda: nn.LazyBatchNorm2d(), (4, 3, 3, 3), None),
    "lazy1d": (lambda: nn.LazyBatchNorm1d(), (6, 4, 3), None),
}


def _inputs(shape, n, fmt=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + i % 3) + 2).to(dtype)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        out.append(x)
    return out


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a, b, what):
    assert type(a) is type(b), what
    if a is None:
        return
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.isfinite(a).all(), what
    assert torch.equal(a, b), what


def _side_by_side(tmp_path, make, xs, setup=None, forward=None, between=None, **record):
    """Train a probed model and an unprobed copy on the same inputs; compare everything."""
    torch.manual_seed(0)
    model = make()
    torch.manual_seed(0)
    ref = make()
    if setup is not None:
        setup(model)
        setup(ref)
    forward = forward or (lambda m, x: m(x))
    opt = torch.optim.SGD(model.parameters(), lr=0.01) if list(model.parameters()) else None
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.01) if list(ref.parameters()) else None
    weights = None
    with statscope.record(model, tmp_path / "r", block_steps=3, **record):
        for i, x in enumerate(xs):
            if between is not None:
                between(i, model, ref)
            xa = x.clone().requires_grad_()
            xb = x.clone().requires_grad_()
            out_a = forward(model, xa)
            out_b = forward(ref, xb)
            _assert_same(out_a, out_b, f"output {i}")
            if weights is None:
                weights = torch.randn(out_a.shape, generator=torch.Generator().manual_seed(3),
                                      dtype=out_a.dtype)
            (out_a.float() * weights).sum().backward()
            (out_b.float() * weights).sum().backward()
            _assert_same(xa.grad, xb.grad, f"input grad {i}")
            for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                _assert_same(p.grad, q.grad, f"grad {name} {i}")
            if opt is not None:
                opt.step()
                ref_opt.step()
                opt.zero_grad()
                ref_opt.zero_grad()
            sa, sb = _state(model), _state(ref)
            assert sa.keys() == sb.keys()
            for k in sa:
                _assert_same(sa[k], sb[k], f"{k} {i}")
    return statscope.open_run(tmp_path / "r").load()


@pytest.mark.parametrize("case", list(CASES))
def test_bit_identical_to_unprobed(bn_route, tmp_path, case):
    make_bn, shape, fmt = CASES[case]
    dtype = torch.float64 if case == "float64" else torch.float32
    _side_by_side(tmp_path, lambda: Wrap(make_bn()), _inputs(shape, 7, fmt, dtype))


def _functional_call(m, x):
    params = {k: v * 1 for k, v in m.named_parameters()}
    return torch.func.functional_call(m, params, (x,))


@pytest.mark.parametrize("variant", ["pre-hook", "hook", "parametrize", "ckpt",
                                     "ckpt-reentrant", "functional-call"])
def test_bit_identical_with_wrappers(bn_route, tmp_path, variant):
    mode = variant if variant.startswith("ckpt") else None
    setup = {"pre-hook": lambda m: m.bn.register_forward_pre_hook(_double),
             "hook": lambda m: m.bn.register_forward_hook(_out_hook),
             "parametrize": lambda m: parametrize.register_parametrization(m.bn, "weight",
                                                                           _Scale()),
             }.get(variant)
    forward = _functional_call if variant == "functional-call" else None
    _side_by_side(tmp_path, lambda: Wrap(nn.BatchNorm2d(3), mode),
                  _inputs((4, 3, 3, 3), 6), setup=setup, forward=forward)


def test_bit_identical_under_autocast_bf16(bn_route, tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.bn(self.lin(x))

    _side_by_side(tmp_path, Net, _inputs((8, 4), 6))


def test_bit_identical_with_no_grad_eval_and_ema_copy(bn_route, tmp_path):
    xs = _inputs((4, 3, 3, 3), 8)
    extra = _inputs((5, 3, 3, 3), 8, seed=5)
    emas = []

    def between(i, model, ref):
        if i == 1:
            emas.append((copy.deepcopy(model), copy.deepcopy(ref)))
        if i in (2, 5):
            for ctx in (torch.no_grad, torch.inference_mode):
                with ctx():
                    _assert_same(model(extra[i]), ref(extra[i]), f"no-grad {i}")
        if i == 3:
            model.eval()
            ref.eval()
            _assert_same(model(extra[i]), ref(extra[i]), "eval")
            with torch.no_grad():
                _assert_same(model(extra[i]), ref(extra[i]), "eval")
            model.train()
            ref.train()
        if emas:  # the deep copies train too (an EMA-style copy that is also stepped)
            a, b = emas[0]
            xa, xb = extra[i].clone().requires_grad_(), extra[i].clone().requires_grad_()
            oa, ob = a(xa), b(xb)
            _assert_same(oa, ob, f"copy {i}")
            (oa ** 2).sum().backward()
            (ob ** 2).sum().backward()
            _assert_same(xa.grad, xb.grad, f"copy grad {i}")
            sa, sb = _state(a), _state(b)
            for k in sa:
                _assert_same(sa[k], sb[k], f"copy {k} {i}")

    _side_by_side(tmp_path, lambda: Wrap(nn.BatchNorm2d(3)), xs, between=between)


@pytest.mark.parametrize("bad", ["rank", "one"])
def test_errors_like_torch(bn_route, tmp_path, bad):
    torch.manual_seed(0)
    model = Wrap(nn.BatchNorm1d(4))
    ref = copy.deepcopy(model)
    x = torch.randn(3, 4, 2, 2) if bad == "rank" else torch.randn(1, 4)
    with statscope.record(model, tmp_path / "r", block_steps=3):
        for _ in range(3):  # good steps first, then the error, then a good step
            y = torch.randn(5, 4)
            model(y).sum().backward()
            ref(y).sum().backward()
        with pytest.raises(Exception) as want:
            ref(x)
        with pytest.raises(Exception) as got:
            model(x)
        assert type(got.value) is type(want.value)
        assert str(got.value) == str(want.value)
        for k, v in _state(ref).items():
            _assert_same(_state(model)[k], v, k)
        y = torch.randn(5, 4)
        _assert_same(model(y), ref(y), "after error")
        for k, v in _state(ref).items():
            _assert_same(_state(model)[k], v, k)


# -- the store against numpy ---------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.flat = nn.BatchNorm1d(6)
        self.conv = nn.Conv2d(3, 4, 1)
        self.maps = nn.BatchNorm2d(4)
        self.last = nn.BatchNorm2d(4, momentum=None)
        self.rare = nn.BatchNorm1d(6, eps=1e-3)
        self.wide = nn.BatchNorm1d(2).double()

    def forward(self, a, b, rare=False):
        h = self.flat(self.fc(a))
        m = self.conv(b)
        out = h.sum() + self.maps(m).sum() + self.maps(m * 0.5 + 1).sum() + self.last(
            m.contiguous(memory_format=torch.channels_last)).sum()
        if rare:
            out = out + self.rare(h * 3 + 1).sum()
        return out + self.wide(a[:, :2].double() * 5 - 2).sum().float()


def _run(path, steps=14, block_steps=3, pauses=(), accumulate=(), seen=None, flush_seconds=None,
         during=None, flush_at=(), model=None, step_rule=None):
    if model is None:
        torch.manual_seed(0)
        model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    gen = torch.Generator().manual_seed(1)
    pending = {}

    def keep(module, args, name):
        if module.training and torch.is_grad_enabled():
            pending.setdefault(name, args[0].detach().double())

    handles = [module.register_forward_pre_hook(lambda m, args, name=name: keep(m, args, name))
               for name, module in model.named_modules()
               if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    kw = {} if flush_seconds is None else {"flush_seconds": flush_seconds}
    if step_rule is not None:
        kw["step"] = step_rule
    warns = pytest.warns(StatscopeWarning, match="forwards per optimizer step vary") \
        if accumulate and step_rule is None else contextlib.nullcontext()
    with warns, statscope.record(model, path, block_steps=block_steps, **kw) as rec:
        for step in range(steps):
            n = 8 if step < 5 else 6
            a = torch.randn(n, 5, generator=gen) * (1 + step) + 3
            b = torch.randn(n, 3, 2, 3, generator=gen) - 2
            pending.clear()
            if during is not None:
                during(step, rec)
            if step == 3:  # neither recorded nor a step
                with torch.no_grad():
                    model(a + 1, b)
                model.eval()
                model(a - 1, b).backward()
                model.train()
            model(a, b, rare=step % 3 == 1).backward()
            if step in accumulate:  # a layer first run here keeps this forward's input
                model(a * 0.5 + 1, b * 2, rare=True).backward()
            if seen is not None:
                seen.append(dict(pending))
            opt.step()
            opt.zero_grad()
            if step_rule == "manual":
                rec.step()
            if step in pauses:
                time.sleep(0.25)
            if step in flush_at:
                assert rec.flush(timeout=30)
    for h in handles:
        h.remove()
    return statscope.open_run(path).load()


def _check_numpy(ds, seen):
    assert ds.sizes["step"] == len(seen)
    for name in ("flat", "maps", "last", "rare", "wide"):
        rows = ds.sel(neuron=ds.layer == name)
        for step, inputs in enumerate(seen):
            x = inputs.get(name)
            if x is None:
                assert (rows["count"].values[step] == 0).all(), (name, step)
                continue
            per = x.movedim(1, -1).reshape(-1, x.shape[1]).numpy()
            eps = 1e-3 if name == "rare" else 1e-5
            scale = np.sqrt(per.var(0) + eps)
            assert (rows["count"].values[step] == per.shape[0]).all(), (name, step)
            np.testing.assert_array_less(
                np.abs(rows["bn_mean"].values[step] - per.mean(0)), 1e-4 * scale,
                err_msg=f"{name} {step}")
            np.testing.assert_array_less(
                np.abs(rows["bn_std"].values[step] - per.std(0)), 1e-4 * scale,
                err_msg=f"{name} {step}")


def _equal_stores(a, b):
    for v in VARIABLES:
        np.testing.assert_array_equal(a[v].values, b[v].values, err_msg=v)
        assert a[v].values.tobytes() == b[v].values.tobytes(), v


def test_store_matches_numpy(bn_route, tmp_path):
    seen = []
    ds = _run(tmp_path / "r", seen=seen, accumulate=(4, 9), flush_at=(6,))
    _check_numpy(ds, seen)


@pytest.fixture
def routes(monkeypatch):
    """Switch between the C++ and the Python route within one test."""
    if native.kernels(wait=True) is None:
        pytest.skip(f"statscope's C++ kernels: {native.status()}")
    install = hooks._install_native

    def python_only(rec, cap, cell, fallback, building, transformed=False):
        building[0] = False

    def use(kind):
        monkeypatch.setattr(hooks, "_install_native", install if kind == "cpp" else python_only)

    return use


def test_routes_record_same_bits(routes, tmp_path):
    stores = {}
    for kind in ("cpp", "python"):
        routes(kind)
        seen = []
        stores[kind] = _run(tmp_path / kind, accumulate=(4, 9), flush_at=(6,), seen=seen)
        _check_numpy(stores[kind], seen)
    _equal_stores(stores["cpp"], stores["python"])


def test_manual_steps_match_numpy_on_both_routes(routes, tmp_path):
    stores = {}
    for kind in ("cpp", "python"):
        routes(kind)
        seen = []
        stores[kind] = _run(tmp_path / kind, accumulate=(4, 9), flush_at=(6,), seen=seen,
                            step_rule="manual", block_steps=4)
        _check_numpy(stores[kind], seen)
    _equal_stores(stores["cpp"], stores["python"])


def test_kernels_arriving_mid_run_record_same_bits(routes, tmp_path, monkeypatch):
    routes("python")
    ref = _run(tmp_path / "py")
    routes("cpp")
    real = hooks.kernels
    ready = [False]
    monkeypatch.setattr(hooks, "kernels", lambda wait=False: real(wait=wait) if ready[0] else None)
    monkeypatch.setattr(hooks, "native_status",
                        lambda: native.status() if ready[0] else "not loaded yet")

    def during(step, rec):
        if step == 5:
            ready[0] = True

    seen = []
    got = _run(tmp_path / "mid", during=during, seen=seen)
    _check_numpy(got, seen)
    _equal_stores(got, ref)


def test_pauses_longer_than_flush_seconds_record_same_bits(bn_route, tmp_path):
    seen = []
    plain = _run(tmp_path / "plain", flush_seconds=0.05, seen=seen)
    paused = _run(tmp_path / "paused", flush_seconds=0.05, pauses=(0, 2, 4, 7, 8, 12))
    _check_numpy(plain, seen)
    _equal_stores(plain, paused)


def test_held_lock_falls_back_and_waits(bn_route, tmp_path):
    """Another thread holds the recorder's lock while a probed BatchNorm runs (after the root's
    probe took and released it): the C++ probe must hand the step to the Python probe, which
    waits; nothing hangs and no step is lost."""
    kind, calls = bn_route
    ref = _run(tmp_path / "ref")
    torch.manual_seed(0)
    model = Net()
    state = {"step": -1, "rec": None}
    holders = []

    def pre(module, args):
        rec = state["rec"]
        if rec is None or state["step"] not in (2, 3, 7) or not torch.is_grad_enabled():
            return
        got = threading.Event()

        def hold():
            with rec._lock:
                got.set()
                time.sleep(0.2)

        t = threading.Thread(target=hold)
        t.start()
        assert got.wait(5)
        holders.append(t)

    model.maps.register_forward_pre_hook(pre)

    def during(step, rec):
        state["step"], state["rec"] = step, rec

    seen = []
    before = len(calls)
    ds = _run(tmp_path / "held", during=during, seen=seen, model=model)
    for t in holders:
        t.join(5)
        assert not t.is_alive()
    assert len(holders) >= 3
    if kind == "cpp":
        assert sum(c is model.maps for c in calls[before:]) >= 3  # the fallback ran
    _check_numpy(ds, seen)
    _equal_stores(ds, ref)


def test_two_threads_two_models(bn_route, tmp_path):
    refs = [_run(tmp_path / f"ref{i}", steps=10) for i in range(2)]
    results, errors = {}, []
    models = []
    for _ in range(2):  # built here: the threads share torch's global generator
        torch.manual_seed(0)
        models.append(Net())

    def work(i):
        try:
            results[i] = _run(tmp_path / f"t{i}", steps=10, model=models[i])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i in range(2):
        _equal_stores(results[i], refs[i])
