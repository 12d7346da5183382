"""statscope.nn under torch.jit.trace, torch.func (grad, vmap, jacrev) and torch.compile.

Each takes its own route (plain torch ops, or torch's own norm): a trace of the C++ kernel route
recorded only an ``empty_like`` (uninitialised memory), functorch refused the C++ and Python
autograd Functions, and a shape-keyed cache made dynamo recompile for every batch size. Outputs
and gradients are checked against a float64 reference written from the paper's eq. 1-2 over the
raw pixels, which shares no code with statscope.
"""

import copy

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

from statscope.errors import StatscopeError
from statscope.nn import NORM_NAMES, make_norm, routes

BATCH_SETS = ("batch", "extended")
C = 8
# torch.jit.trace is deprecated from torch 2.9 on, and still what users deploy with
TRACE_DEPRECATED = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.trace(_method)?` is deprecated:DeprecationWarning")


def build(name, **kw):
    """``make_norm(name, C)`` with a grouped norm at 4 groups (2 channels each)."""
    base = name.split("_g")[0]
    if base in ("gn", "en", "hn", "bn+en"):
        kw["groups"] = 4
    layer = make_norm(base, C, **kw)
    gen = torch.Generator().manual_seed(len(name))
    with torch.no_grad():  # away from the initial values, so that a mix-up shows
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return layer


def set_mean(x3, pixel_set, groups):
    """The mean over each pixel set of ``x3`` (N, C, P), broadcast back to (N, C, P)."""
    n, c, p = x3.shape
    if pixel_set == "batch":
        return x3.mean((0, 2), keepdim=True).expand_as(x3)
    if pixel_set == "instance":
        return x3.mean(2, keepdim=True).expand_as(x3)
    if pixel_set == "layer":
        return x3.mean((1, 2), keepdim=True).expand_as(x3)
    grouped = x3.reshape(n, groups, c // groups, p)
    dims = (2, 3) if pixel_set == "group" else (0, 2, 3)
    return grouped.mean(dims, keepdim=True).expand_as(grouped).reshape(n, c, p)


def running_names(sets, stem):
    """The documented buffer of each set: the first batch-pooling set's is ``stem``."""
    names, first = [], True
    for pixel_set in sets:
        names.append(None if pixel_set not in BATCH_SETS else stem if first
                     else f"{stem}_{pixel_set}")
        first = first and pixel_set not in BATCH_SETS
    return names


def reference(layer, x, params, training):
    """Eq. 1-2 in float64 from the pixels; ``params`` by name (weight, bias, mixture weights).

    In eval mode with tracked statistics a batch-pooling set takes the layer's running buffers.
    """
    x = x.double()
    n, c = x.shape[:2]
    x3 = x.reshape(n, c, -1)
    use_batch = training or not layer.track_running_stats
    buffers = dict(layer.named_buffers())

    def shares(key, count):
        return torch.softmax(params[key].double(), 0) if count > 1 else [1.0]

    means = []
    for pixel_set, name in zip(layer.mean_sets, running_names(layer.mean_sets, "running_mean")):
        if name is not None and not use_batch:
            means.append(buffers[name].double().view(1, c, 1))
        else:
            means.append(set_mean(x3, pixel_set, layer.mean_groups))
    mu = sum(p * m for p, m in zip(shares("mean_weight", len(means)), means))
    variances = []
    for pixel_set, name in zip(layer.std_sets, running_names(layer.std_sets, "running_var")):
        if name is not None and not use_batch:
            variances.append(buffers[name].double().view(1, c, 1))
            continue
        centre = set_mean(x3, pixel_set, layer.std_groups) if layer.std_center == "own" else mu
        variances.append(set_mean((x3 - centre) ** 2, pixel_set, layer.std_groups))
    var = sum(p * v for p, v in zip(shares("var_weight", len(variances)), variances))
    y = (x3 - mu) / torch.sqrt(var + layer.eps)
    if "weight" in params:
        y = y * params["weight"].double().view(1, c, 1) + params["bias"].double().view(1, c, 1)
    return y.reshape(x.shape)


def parameters(layer):
    return {k: v.detach() for k, v in layer.named_parameters()}


def kernels_off(monkeypatch):
    """No C++ kernels: the per-channel norms take the composed route or the Python Functions."""
    monkeypatch.setattr(routes, "kernels", lambda wait=True: None)


# --- torch.jit.trace ------------------------------------------------------------------------

@TRACE_DEPRECATED
@pytest.mark.parametrize("mode", ["train", "eval", "untracked"])
@pytest.mark.parametrize("name", NORM_NAMES)
def test_a_traced_norm_computes_what_the_eager_one_does(name, mode):
    torch.manual_seed(1)
    layer = build(name, track_running_stats=mode != "untracked")
    with torch.no_grad():
        for _ in range(2):
            layer(torch.randn(4, C, 3, 3) * 2 + 1)
    layer.train(mode == "train")
    eager, traced_layer = copy.deepcopy(layer), copy.deepcopy(layer)
    traced = torch.jit.trace(traced_layer, torch.randn(4, C, 3, 3))  # check_trace reruns it
    traced.load_state_dict(layer.state_dict())
    # a trace keeps the batch size dynamic, as torch's BatchNorm's does
    for shape in ((4, C, 3, 3), (4, C, 3, 3), (6, C, 3, 3)):
        x = torch.randn(shape) * 3 + 1
        want = reference(layer, x, parameters(layer), mode == "train")
        got = traced(x)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got, eager(x), rtol=1e-5, atol=1e-5)
        for (key, ours), (_, theirs) in zip(traced.named_buffers(), eager.named_buffers()):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=key)


@TRACE_DEPRECATED
@pytest.mark.parametrize("name", ["bn", "hn", "sn"])
def test_a_traced_cumulative_average_keeps_counting(name, monkeypatch):
    # momentum=None weighs batch k by 1/k: a float frozen into the trace would weigh every
    # later batch as the traced one; the kernels off as well, whose Functions could not be traced
    kernels_off(monkeypatch)
    torch.manual_seed(2)
    layer = build(name, momentum=None)
    eager = copy.deepcopy(layer)
    traced = torch.jit.trace(copy.deepcopy(layer), torch.randn(4, C, 3, 3), check_trace=False)
    traced.load_state_dict(layer.state_dict())
    for step in range(4):
        x = torch.randn(4, C, 3, 3) * 2 + step
        torch.testing.assert_close(traced(x), eager(x), rtol=1e-5, atol=1e-5)
    assert int(traced.num_batches_tracked) == 4
    for (key, ours), (_, theirs) in zip(traced.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=key)


# --- torch.func -----------------------------------------------------------------------------

# (name, track_running_stats, mode): torch.func users turn tracking off (as
# torch.func.replace_all_batch_norm_modules_ does for BatchNorm); eval with running statistics
# reads them only
FUNC_CASES = [(name, False, mode) for name in ("bn", "gn", "hn", "en", "hn_g4", "bn+en", "sn",
                                               "bn+in+ln") for mode in ("train", "eval")]
FUNC_CASES += [(name, True, "eval") for name in ("hn", "bn+en", "sn", "bn+in+ln")]


@pytest.mark.parametrize("kernels", ["on", "off"])
@pytest.mark.parametrize("name,tracked,mode", FUNC_CASES)
def test_torch_func_transforms_match_the_float64_reference(name, tracked, mode, kernels,
                                                           monkeypatch):
    if kernels == "off":
        kernels_off(monkeypatch)
    torch.manual_seed(3)
    layer = build(name, track_running_stats=tracked, dtype=torch.float64)
    if tracked:
        with torch.no_grad():
            for _ in range(2):
                layer(torch.randn(4, C, 3, 3, dtype=torch.float64) * 2 + 1)
    layer.train(mode == "train")
    training = mode == "train"
    x = torch.randn(3, C, 2, 3, dtype=torch.float64) * 2 + 1
    params = parameters(layer)
    tight = {"rtol": 1e-8, "atol": 1e-8}

    def loss(p, inputs):
        return functional_call(layer, p, (inputs,)).square().sum()

    got = grad(loss)(params, x)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    want = torch.autograd.grad(reference(layer, x, leaves, training).square().sum(),
                               list(leaves.values()))
    for (key, g), w in zip(got.items(), want):
        torch.testing.assert_close(g, w, **tight, msg=key)

    jacobian = jacrev(layer)(x)
    expected = torch.autograd.functional.jacobian(
        lambda inputs: reference(layer, inputs, params, training), x)
    torch.testing.assert_close(jacobian, expected, **tight)

    batches = torch.stack([x, x * 0.5 - 1, x.flip(0)])
    outputs = vmap(layer)(batches)
    for out, batch in zip(outputs, batches):
        torch.testing.assert_close(out, reference(layer, batch, params, training), **tight)


def test_updating_running_statistics_under_a_transform_says_what_to_do():
    # torch's own BatchNorm fails there too (an in-place update of a captured buffer)
    layer = make_norm("hn", C, dtype=torch.float64)
    with pytest.raises(StatscopeError, match=r"hn in training mode under a torch.func "
                                             r"transform.*track_running_stats=False"):
        vmap(layer)(torch.randn(2, 4, C, dtype=torch.float64))
    assert int(layer.num_batches_tracked) == 0


# --- torch.compile --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sn", "bn+in+ln"])
def test_a_subtracted_mixture_compiles_into_one_graph(name):
    # the deviations' Bessel factor of a mixture of means was a generator dynamo cannot trace
    torch._dynamo.reset()
    torch.manual_seed(4)
    layer = build(name, std_center="subtracted")
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for step in range(2):
        x = torch.randn(4, C, 3, 3) * 2 + step
        want = reference(eager, x, parameters(eager), True)
        got = compiled(x)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got, eager(x), rtol=1e-5, atol=1e-5)
    for (key, ours), (_, theirs) in zip(layer.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["hn", "en", "sn"])
def test_compiled_norms_keep_the_batch_size_dynamic(name):
    # as torch's BatchNorm2d: one graph for the first size, one dynamic graph for the others
    # (a cache keyed by the shape made dynamo compile one per size, then run eagerly after 8)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(5)
    layer = build(name)
    compiled = torch.compile(layer, backend="aot_eager")
    for n in range(2, 8):
        x = torch.randn(n, C, 3, 3) * 2 + 1
        want = reference(layer, x, parameters(layer), True)
        torch.testing.assert_close(compiled(x).double(), want, rtol=1e-4, atol=1e-4)
    assert counters["frames"]["ok"] <= 2, dict(counters["frames"])
    assert int(layer.num_batches_tracked) == 6
