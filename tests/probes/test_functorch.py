"""A recorded model inside ``torch.func`` transforms: functional training, per-sample gradients,
model ensembles. The probes once raised inside the user's forward there (a copy into a block
buffer of a wrapped tensor, the C++ kernel on a tensor without storage)."""

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, stack_module_state, vmap

import statscope
from statscope.errors import StatscopeWarning


def conv():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2))


def mlp(width=32):
    return nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU(),
                         nn.Linear(width, 1))


def reference_inputs(model, state, x, kinds):
    """The inputs of ``model``'s layers of ``kinds`` in a plain forward (no transform) with the
    same parameters and buffers, as float64 (channels, values) numpy arrays."""
    copy_ = copy.deepcopy(model)
    seen = {}

    def keep(name, t):
        seen[name] = t.detach().double()

    for name, m in copy_.named_modules():
        if isinstance(m, kinds):
            m.register_forward_pre_hook(lambda m, a, name=name: keep(name, a[0]))
    with torch.no_grad():
        functional_call(copy_, {k: v.detach().clone() for k, v in state.items()}, (x,))
    out = {}
    for name, t in seen.items():
        dim = 1 if t.dim() == 4 else -1
        out[name] = t.movedim(dim, -1).reshape(-1, t.shape[dim]).numpy()
    return out


def assert_recorded(ds, refs):
    assert ds.sizes["step"] == len(refs)
    for i, ref in enumerate(refs):
        for name, values in ref.items():
            sel = ds.layer == name
            np.testing.assert_allclose(ds.bn_mean.sel(neuron=sel).values[i], values.mean(0),
                                       atol=1e-5 * values.std(0).max())
            np.testing.assert_allclose(ds.bn_std.sel(neuron=sel).values[i], values.std(0),
                                       rtol=1e-5)


@pytest.mark.parametrize("model_of, shape, kinds", [
    (conv, (8, 3, 10, 10), (nn.BatchNorm2d,)),  # the BatchNorm fast path
    (mlp, (6, 5, 32), (nn.LayerNorm,)),  # generic, copied into the block buffer
    (mlp, (64, 64, 32), (nn.LayerNorm,)),  # generic, the C++ kernel
])
def test_functional_training_under_grad_is_recorded(tmp_path, model_of, shape, kinds):
    torch.manual_seed(0)
    model = model_of()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def loss(p, b, x):
        return functional_call(model, (p, b), (x,)).pow(2).mean()

    refs = []
    gen = torch.Generator().manual_seed(1)
    with statscope.record(model, tmp_path / "r", step="forward", block_steps=4):
        for _ in range(6):
            x = torch.randn(*shape, generator=gen) + 1
            refs.append(reference_inputs(model, {**params, **buffers}, x, kinds))
            g = grad(loss)(params, buffers, x)
            params = {k: v - 0.1 * g[k] for k, v in params.items()}
    assert_recorded(statscope.open_run(tmp_path / "r"), refs)


# torch's forward-mode AD scripts its decompositions at first use
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_forward_under_jvp_and_under_grad_of_grad_is_recorded(tmp_path):
    torch.manual_seed(0)
    model = mlp(8)
    params = {k: v.detach() for k, v in model.named_parameters()}
    xs = [torch.randn(5, 8) + i for i in range(2)]

    def out(x):
        return functional_call(model, params, (x,)).sum()

    with statscope.record(model, tmp_path / "r", step="forward"):
        jvp(out, (xs[0],), (torch.ones_like(xs[0]),))
        grad(lambda x: grad(out)(x).pow(2).sum())(xs[1])
    refs = [reference_inputs(model, params, x, (nn.LayerNorm,)) for x in xs]
    assert_recorded(statscope.open_run(tmp_path / "r"), refs)


def test_a_vmapped_ensemble_is_not_recorded_and_trains_as_without_statscope(tmp_path):
    # each member normalizes its own batch: a probed tensor there holds several forwards
    torch.manual_seed(0)
    members = [conv() for _ in range(3)]
    for m in members:
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
    params, buffers = stack_module_state(members)
    x = torch.randn(4, 3, 8, 8)

    def ensemble(model):
        def f(p, b, x):
            return functional_call(model, (p, b), (x,))
        return vmap(f, in_dims=(0, 0, None))(params, buffers, x)

    want = ensemble(copy.deepcopy(members[0]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with statscope.record(members[0], tmp_path / "r"):
            got = [ensemble(members[0]) for _ in range(3)]
    said = [str(w.message) for w in caught if issubclass(w.category, StatscopeWarning)]
    assert len(said) == 2 and "vmap" in said[0] and "no training step was recorded" in said[1]
    for g in got:
        torch.testing.assert_close(g, want, rtol=0, atol=0)
    assert statscope.open_run(tmp_path / "r").sizes["step"] == 0


def test_per_sample_gradients_beside_training_leave_its_steps_alone(tmp_path):
    # Opacus-style per-sample gradients (vmap over grad) between a step's forward and its
    # optimizer step: neither a step nor a micro-batch; the training forwards are recorded
    torch.manual_seed(0)
    model = mlp(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    model[1].register_forward_pre_hook(
        lambda m, a: None if torch._C._functorch.maybe_current_level() is not None
        else seen.append(a[0].detach().double().reshape(-1, 8)))

    def loss(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).pow(2).mean()

    gen = torch.Generator().manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StatscopeWarning)
        with statscope.record(model, tmp_path / "r"):
            for _ in range(5):
                x = torch.randn(6, 8, generator=gen)
                model(x).pow(2).mean().backward()
                params = {k: v.detach() for k, v in model.named_parameters()}
                per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
                assert per_sample["0.weight"].shape == (6, 8, 8)
                opt.step()
                opt.zero_grad()
    ds = statscope.open_run(tmp_path / "r")
    assert ds.attrs["step_rule"] == "optimizer" and ds.sizes["step"] == 5 and len(seen) == 5
    np.testing.assert_array_equal(ds["count"].values, 6)
    np.testing.assert_allclose(ds.bn_std.sel(neuron=ds.layer == "1").values,
                               np.stack([s.std(0, unbiased=False).numpy() for s in seen]),
                               rtol=1e-5)
