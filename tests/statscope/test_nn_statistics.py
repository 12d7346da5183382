"""Running statistics against long-run truths, and the routes of statscope.nn against each other.

The running statistics are checked on many batches of a known distribution: pixels of channel c
are N(μ_c, 4) with fixed channel means μ_c, and the running estimates kept as a cumulative average
(``momentum=None``) must converge to the population values their docs promise.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from statscope import native
from statscope.nn import HeteroNorm, SwitchableNorm, make_norm
from statscope.nn.algebra import plain_forward
from test_nn_support import force_route, one_thread  # noqa: F401 (a fixture)

WITHIN = 4.0  # variance of every channel around its own mean

pytestmark = pytest.mark.usefixtures("one_thread")


def channel_means(channels, seed=0):
    return np.random.default_rng(seed).normal(0.0, 1.5, size=channels)


def feed(layer, shape, batches, seed=1, channels_last=False):
    """Run ``batches`` float64 batches of N(μ_c, WITHIN) pixels through ``layer`` (training)."""
    gen = torch.Generator().manual_seed(seed)
    mu = torch.from_numpy(channel_means(shape[1])).reshape((1, -1) + (1,) * (len(shape) - 2))
    with torch.no_grad():
        for _ in range(batches):
            x = mu + WITHIN ** 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            layer(x)


def tolerance(dof, batches):
    """Four standard errors, relative, of the mean of ``batches`` unbiased variance estimates of
    ``dof`` degrees of freedom each (normal pixels: relative variance 2/dof per estimate)."""
    return 4 * (2 / (dof * batches)) ** 0.5


def spread(groups, channels):
    """Mean square of the channel means around their group's mean, repeated per channel."""
    mu = channel_means(channels).reshape(groups, -1)
    return np.repeat(((mu - mu.mean(1, keepdims=True)) ** 2).mean(1), channels // groups)


# (shape, channels_last) per route: a channels_last input takes the Function on any route
ROUTES = {"kernel": ((4, 64), False), "composed": ((4, 64), False),
          "function": ((4, 64, 2, 2), True)}


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("groups", [1, 8])
def test_hn_subtracted_running_variance_is_the_pooled_within_channel_variance(route, groups,
                                                                            monkeypatch):
    # issue 12: with Bessel's factor of the whole extended set this converged to 3.01, not 4
    force_route(monkeypatch, route)
    shape, channels_last = ROUTES[route]
    layer = HeteroNorm(64, "batch", "extended", groups, std_center="subtracted", momentum=None,
                       dtype=torch.float64)
    feed(layer, shape, 400, channels_last=channels_last)
    count = shape[0] * int(np.prod(shape[2:]))
    dof = 64 // groups * (count - 1)  # K channels, each M - 1 around its own mean
    np.testing.assert_allclose(layer.running_var.numpy(), WITHIN, rtol=tolerance(dof, 400))
    np.testing.assert_allclose(layer.running_mean.numpy(), channel_means(64),
                               atol=4 * (WITHIN / (count * 400)) ** 0.5)


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("name,groups", [("hn", 1), ("hn", 8), ("en", 1), ("en", 8)])
def test_own_centre_running_variance_is_the_extended_sets_unbiased_variance(route, name, groups,
                                                                           monkeypatch):
    # around the set's own mean: the within-channel variance plus the channels' spread, with
    # Bessel's factor n/(n-1) of the whole set (n pixels), as documented
    force_route(monkeypatch, route)
    shape, channels_last = ROUTES[route]
    layer = make_norm(name, 64, groups=groups, momentum=None, dtype=torch.float64)
    feed(layer, shape, 400, channels_last=channels_last)
    n = shape[0] * 64 // groups * int(np.prod(shape[2:]))
    truth = WITHIN + spread(groups, 64) * n / (n - 1)
    np.testing.assert_allclose(layer.running_var.numpy(), truth, rtol=tolerance(n - 1, 400))
    mu = channel_means(64)
    count = shape[0] * int(np.prod(shape[2:]))
    if name == "en":
        mu = np.repeat(mu.reshape(groups, -1).mean(1), 64 // groups)
        count *= 64 // groups
    np.testing.assert_allclose(layer.running_mean.numpy(), mu,
                               atol=4 * (WITHIN / (count * 400)) ** 0.5)


@pytest.mark.parametrize("center", ["own", "subtracted"])
def test_mixture_running_variances_converge_to_their_sets_truths(center):
    layer = make_norm("bn+en", 16, groups=2, momentum=None, std_center=center,
                      dtype=torch.float64)
    feed(layer, (8, 16, 3, 3), 400)
    np.testing.assert_allclose(layer.running_var.numpy(), WITHIN, rtol=tolerance(71, 400))
    n = 8 * 8 * 9
    extended = WITHIN + (spread(2, 16) * n / (n - 1) if center == "own" else 0.0)
    np.testing.assert_allclose(layer.running_var_extended.numpy(), extended,
                               rtol=tolerance(n - 8, 400))


def test_mixed_mean_subtracted_running_variance_is_unbiased():
    # the mean subtracted mixes the batch and instance means of each pixel; Bessel's factor
    # follows from the sets' sizes and overlap and the learned shares
    layer = SwitchableNorm(8, ("batch", "instance"), ("batch",), std_center="subtracted",
                           momentum=None, dtype=torch.float64)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.4, -0.7], dtype=torch.float64))
    feed(layer, (4, 8, 3, 3), 600)
    np.testing.assert_allclose(layer.running_var.numpy(), WITHIN, rtol=tolerance(30, 600))


CHANNEL_NORMS = ["hn", "hn_g4", "en", "en_g4", "bn+en"]


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(CHANNEL_NORMS), center=st.sampled_from(["own", "subtracted"]),
       shape=st.sampled_from([(3, 8), (1, 8, 5), (2, 8, 3, 4), (5, 8, 2, 1, 3)]),
       momentum=st.sampled_from([0.1, None]), affine=st.booleans(), seed=st.integers(0, 2**16))
def test_routes_give_the_same_outputs_gradients_and_running_statistics(name, center, shape,
                                                                       momentum, affine, seed):
    """The C++ kernel, the composed route, the Function and the plain ops agree on everything."""
    gen = torch.Generator().manual_seed(seed)
    results = []
    routes = ("composed", "function", "plain")
    if native.kernels() is not None:
        routes = ("kernel",) + routes
    for route in routes:
        layer = make_norm(name, 8, std_center=center, momentum=momentum, affine=affine,
                          dtype=torch.float64)
        if shape[0] * np.prod(shape[2:]) < 2:
            continue
        gen.manual_seed(seed)
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
        grads = []
        for step in range(2):
            x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3).requires_grad_()
            g = torch.randn(shape, generator=gen, dtype=torch.float64)
            if route == "plain":
                y = plain_forward(layer, x, layer.weight, layer.bias, layer.mean_weight,
                                 layer.var_weight, True, True)
            else:
                with pytest.MonkeyPatch.context() as patch:
                    force_route(patch, route)
                    y = layer(x)
            y.backward(g)
            grads += [y.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]
        buffers = [b.clone() for b in layer.buffers()]
        results.append((grads, buffers))
    reference = results[-1]
    for got in results[:-1]:
        for a, b in zip(got[0] + got[1], reference[0] + reference[1]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(mean_sets=st.sampled_from([("batch", "instance", "layer"), ("batch",), ("layer",),
                                  ("instance", "extended")]),
       std_sets=st.sampled_from([("batch", "instance", "layer"), ("group",), ("batch", "layer"),
                                 ("extended", "instance")]),
       center=st.sampled_from(["own", "subtracted"]),
       shape=st.sampled_from([(3, 8, 4), (2, 8, 3, 4), (1, 8, 2, 3), (2, 8, 2, 1, 3)]),
       channels_last=st.booleans(), seed=st.integers(0, 2**16))
def test_per_example_function_matches_plain_ops(mean_sets, std_sets, center, shape,
                                                channels_last, seed):
    """Outputs, gradients and running statistics of the cells Function equal the plain ops'."""
    gen = torch.Generator().manual_seed(seed)
    if ("batch" in mean_sets + std_sets or "extended" in mean_sets + std_sets) and \
            shape[0] * np.prod(shape[2:]) < 2:
        return
    results = []
    routes = ("function", "plain") if native.kernels() is None else ("kernel", "function",
                                                                      "plain")
    for route in routes:
        gen.manual_seed(seed)
        layer = SwitchableNorm(8, mean_sets, std_sets, groups=2, std_center=center,
                               dtype=torch.float64)
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
        out = []
        for mode in ("train", "train", "eval"):
            getattr(layer, mode)()
            x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3
            if channels_last and x.dim() == 4:
                x = x.to(memory_format=torch.channels_last)
            x.requires_grad_()
            g = torch.randn(shape, generator=gen, dtype=torch.float64)
            if route == "plain":
                use_batch = layer.training or not layer.track_running_stats
                y = plain_forward(layer, x, layer.weight, layer.bias, layer.mean_weight,
                                 layer.var_weight, use_batch, layer.training)
            else:
                with pytest.MonkeyPatch.context() as patch:
                    force_route(patch, "kernel" if route == "kernel" else "composed")
                    y = layer(x)
                kernel = route == "kernel" and mode == "train" and x.is_contiguous()
                assert ("CppNode" if kernel else "_CellNorm") in y.grad_fn.name()
            y.backward(g)
            out += [y.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]
        results.append(out + [b.clone() for b in layer.buffers()])
    for got in results[:-1]:
        for a, b in zip(got, results[-1]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
