"""statscope.nn's C++ kernel: values against NumPy float64, routes, and its loader's switches."""


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_nn_support import force_route, one_thread  # noqa: F401 (a fixture)

from statscope import native
from statscope.nn import make_norm
from statscope.nn.algebra import plain_forward

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(x, weight, bias, groups, extended_mean, subtracted, eps):
    """HN/EN of ``x`` (N, C, *S) in float64 NumPy, brute force over the pixel sets."""
    x = x.astype(np.float64)
    n, c = x.shape[:2]
    v = x.reshape(n, groups, c // groups, -1)
    mu = v.mean(axis=(0, 3), keepdims=True)
    group_mean = v.mean(axis=(0, 2, 3), keepdims=True)
    centre = group_mean if extended_mean else mu
    var = ((v - (mu if subtracted else group_mean)) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    y = ((v - centre) / np.sqrt(var + eps)).reshape(x.shape)
    view = (1, -1) + (1,) * (x.ndim - 2)
    return y * weight.reshape(view) + bias.reshape(view), np.sqrt(var + eps)


NAMES = {"hn": (False, False), "hn-subtracted": (False, True), "en": (True, False)}


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(NAMES)), groups=st.sampled_from([1, 2, 8]),
       shape=st.sampled_from([(2, 8), (4, 16), (3, 8, 5), (2, 16, 3, 3), (2, 8, 2, 1, 3)]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       offset=st.sampled_from([0.0, 100.0]), seed=st.integers(0, 2**16))
def test_kernel_matches_numpy_float64(name, groups, shape, dtype, offset, seed):
    if native.kernels() is None:
        pytest.skip(native.status())
    extended_mean, subtracted = NAMES[name]
    base = "en" if extended_mean else "hn"
    layer = make_norm(f"{base}_g{groups}" if groups > 1 else base, shape[1], dtype=dtype,
                      std_center="subtracted" if subtracted else "own")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(shape[1], generator=gen) + 0.5)
        layer.bias.copy_(torch.randn(shape[1], generator=gen))
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + offset).to(dtype)
    with pytest.MonkeyPatch.context() as patch:
        force_route(patch, "kernel")
        y = layer(x)
    assert "CppNode" in y.grad_fn.name()
    truth, std = reference(x.double().numpy(), layer.weight.detach().double().numpy(),
                           layer.bias.detach().double().numpy(), groups, extended_mean,
                           subtracted, layer.eps)
    # the output's error in units of the input's resolution over the std normalized by
    resolution = {torch.float32: 2e-7, torch.float64: 1e-15, torch.bfloat16: 1e-2}[dtype]
    scale = (np.abs(x.double().numpy()).max() / std.min() + 1) * resolution * 4
    np.testing.assert_allclose(y.detach().double().numpy(), truth, atol=scale, rtol=0)


def test_noncontiguous_inputs_take_the_function_with_the_same_values(monkeypatch):
    if native.kernels() is None:
        pytest.skip(native.status())
    torch.manual_seed(1)
    layer = make_norm("hn_g2", 8, dtype=torch.float64)
    x = torch.randn(4, 8, 3, 3, dtype=torch.float64)
    force_route(monkeypatch, "kernel")
    contiguous = layer(x)
    channels_last = layer(x.to(memory_format=torch.channels_last))
    assert "ExtendedStdNorm" in channels_last.grad_fn.name()
    torch.testing.assert_close(channels_last, contiguous, rtol=1e-12, atol=1e-12)


def test_routes_are_kernel_on_small_cpu_inputs_and_python_beyond():
    if native.kernels() is None:
        pytest.skip(native.status())
    layer = make_norm("hn", 16)
    assert "ChannelNorm>" in layer(torch.randn(4, 16)).grad_fn.name()
    assert "ChannelNorm>" in make_norm("bn+en", 16)(torch.randn(4, 16)).grad_fn.name()
    sn = make_norm("sn", 16)
    assert "CellNorm>" in sn(torch.randn(4, 16, 2, 2)).grad_fn.name()
    big = torch.randn(64, 16, 16, 16)  # 262144 elements: torch's threads and vector units
    assert "CppNode" not in layer(big).grad_fn.name()
    assert "CppNode" not in sn(big).grad_fn.name()
    # in eval the running statistics take part: the Python routes
    assert "CppNode" not in sn.eval()(torch.randn(4, 16, 2, 2)).grad_fn.name()


@pytest.mark.parametrize("name", ["sn", "bn+in+ln", "hn_g4", "bn+en"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_kernels_match_float64(name, dtype):
    """float32 and bfloat16 through the kernels against the float64 plain ops, same data."""
    if native.kernels() is None:
        pytest.skip(native.status())
    torch.manual_seed(3)
    reference = make_norm(name, 8, dtype=torch.float64)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    layer = make_norm(name, 8, dtype=dtype)
    layer.load_state_dict(reference.state_dict())
    x = (torch.randn(4, 8, 3, 3, dtype=torch.float64) * 2 + 5).to(dtype)
    g = torch.randn(4, 8, 3, 3, dtype=torch.float64).to(dtype)
    x64 = x.double().requires_grad_()
    x.requires_grad_()
    y, y64 = layer(x), plain_forward(reference, x64, reference.weight, reference.bias,
                                     reference.mean_weight, reference.var_weight, True, False)
    assert "CppNode" in y.grad_fn.name()
    y.backward(g)
    y64.backward(g.double())
    resolution = {torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
    for got, want in [(y, y64), (x.grad, x64.grad)]:
        scale = want.abs().max().item() * resolution * 8
        np.testing.assert_allclose(got.detach().double().numpy(), want.detach().numpy(),
                                   atol=scale, rtol=0)
