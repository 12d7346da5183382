"""statscope.nn's LN, GN and IN against torch's own modules on any shape, batch size 1 included.

Issue 10, item 7: ``make_norm("ln")`` at batch size 1 took a per-channel path with stride-0
statistics and returned gradients off by up to 1e12, differently on every run.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from statscope.errors import StatscopeError
from statscope.nn import make_norm


def reference(name, x, weight, bias, groups):
    """torch's module for the norm, with statscope's per-channel γ and β applied after it."""
    channels = x.shape[1]
    if name == "ln":
        y = torch.nn.functional.layer_norm(x, x.shape[1:], eps=1e-5)
    elif name == "gn":
        y = torch.nn.functional.group_norm(x, groups, eps=1e-5)
    else:
        y = torch.nn.functional.instance_norm(x, eps=1e-5)
    view = (1, channels) + (1,) * (x.dim() - 2)
    return y * weight.view(view) + bias.view(view)


@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(["ln", "gn", "in"]), n=st.integers(1, 4),
       channels=st.sampled_from([1, 2, 4, 6]), spatial=st.lists(st.integers(1, 4), max_size=3),
       seed=st.integers(0, 2**16))
def test_per_example_norms_match_torch_at_any_batch_size(name, n, channels, spatial, seed):
    shape = (n, channels, *spatial)
    groups = 2 if channels % 2 == 0 else 1
    # float64: with 2 pixels per set the normalization amplifies float32 rounding differences
    # between two correct implementations; the bug was off by up to 1e12
    kind = {"dtype": torch.float64}
    layer = make_norm(name, channels, **({"groups": groups} if name == "gn" else {}), **kind)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(channels, generator=gen, **kind))
        layer.bias.copy_(torch.randn(channels, generator=gen, **kind))
    x = torch.randn(shape, generator=gen, **kind) * 3 + 1
    pixels = {"ln": channels, "gn": channels // groups, "in": 1}[name]
    for size in spatial:
        pixels *= size
    if pixels < 2:
        with pytest.raises(StatscopeError, match=r"1 pixel per set"):
            layer(x)
        return
    g = torch.randn(shape, generator=gen, **kind)
    runs = []
    for _ in range(2):  # the bug gave different garbage on every run
        xs = x.clone().requires_grad_()
        layer.zero_grad()
        y = layer(xs)
        y.backward(g)
        runs.append((y.detach(), xs.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    xr = x.clone().requires_grad_()
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    y_ref = reference(name, xr, weight, bias, groups)
    y_ref.backward(g)
    for got, want in zip(runs[0], (y_ref.detach(), xr.grad, weight.grad, bias.grad)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_ln_at_batch_size_one_trains_like_torch_layernorm():
    # the reproduction: the FC net at batch size 1 with "ln" trained to NaN
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(20, 16), make_norm("ln", 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 3))
    theirs = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.LayerNorm(16),
                                 torch.nn.ReLU(), torch.nn.Linear(16, 3))
    theirs.load_state_dict(ours.state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
    for _ in range(50):
        x, target = torch.randn(1, 20), torch.randint(0, 3, (1,))
        for model, opt in zip((ours, theirs), optimizers):
            torch.nn.functional.cross_entropy(model(x), target).backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
