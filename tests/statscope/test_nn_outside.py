"""statscope.nn as users train with it on the CPU: float16 layers, configuration errors, and
data-parallel training (DistributedDataParallel on gloo, two ranks started by torchrun).

Every number is checked against a float64 reference written here from the paper's eq. 1-2 over
the raw pixels (Table 1's pixel sets; the variance of a std set around its own mean or around
the mean subtracted), which shares no code with statscope.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad

from statscope.errors import StatscopeError
from statscope.nn import HeteroNorm, SwitchableNorm, make_norm

C = 8
PER_CHANNEL = ("en", "en_g4", "hn", "hn_g4", "bn+en")
PER_EXAMPLE = ("sn", "bn+in+ln")


def pixel_set_mean(x3, pixel_set, groups):
    """Mean of ``x3`` (N, C, P) over each pixel set, broadcast back to (N, C, P)."""
    n, c, p = x3.shape
    if pixel_set in ("batch", "instance", "layer"):
        axes = {"batch": (0, 2), "instance": 2, "layer": (1, 2)}[pixel_set]
        return np.broadcast_to(x3.mean(axes, keepdims=True), x3.shape)
    grouped = x3.reshape(n, groups, c // groups, p)
    axes = (2, 3) if pixel_set == "group" else (0, 2, 3)
    mean = grouped.mean(axes, keepdims=True)
    return np.broadcast_to(mean, grouped.shape).reshape(n, c, p)


def buffer_names(layer, sets, stem):
    """The documented running buffer of each set (None for per-example sets)."""
    names, first = [], True
    for pixel_set in sets:
        if pixel_set in ("batch", "extended") and layer.track_running_stats:
            names.append(stem if first else f"{stem}_{pixel_set}")
            first = False
        else:
            names.append(None)
    return names


def softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def reference(layer, x, params, buffers=None):
    """Eq. 1-2 in float64 NumPy: the output, and per tracked set its batch statistic.

    ``params`` maps names to arrays (weight, bias, mean_weight, var_weight); with ``buffers``
    (eval mode) the batch-pooling sets take those running statistics.
    """
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape[:2]
    x3 = x.reshape(n, c, -1)
    share_m = softmax(params["mean_weight"]) if len(layer.mean_sets) > 1 else [1.0]
    share_v = softmax(params["var_weight"]) if len(layer.std_sets) > 1 else [1.0]
    stats, mu = {}, 0.0
    for k, (s, name) in enumerate(zip(layer.mean_sets,
                                      buffer_names(layer, layer.mean_sets, "running_mean"))):
        if buffers is not None and name is not None:
            m = np.broadcast_to(buffers[name].reshape(1, c, 1), x3.shape)
        else:
            m = pixel_set_mean(x3, s, layer.mean_groups)
            if name is not None:
                stats[name] = m[0, :, 0]
        mu = mu + share_m[k] * m
    var = 0.0
    for k, (s, name) in enumerate(zip(layer.std_sets,
                                      buffer_names(layer, layer.std_sets, "running_var"))):
        if buffers is not None and name is not None:
            v = np.broadcast_to(buffers[name].reshape(1, c, 1), x3.shape)
        else:
            own = pixel_set_mean(x3, s, layer.std_groups)
            v = pixel_set_mean((x3 - own) ** 2, s, layer.std_groups)
            if name is not None:  # unbiased: n/(n-1) with n the pixels of one set
                size = x3.shape[0] * x3.shape[2] * (1 if s == "batch" else c // layer.std_groups)
                stats[name] = v[0, :, 0] * size / (size - 1)
            if layer.std_center == "subtracted":
                v = pixel_set_mean((x3 - mu) ** 2, s, layer.std_groups)
        var = var + share_v[k] * v
    y = (x3 - mu) / np.sqrt(var + layer.eps)
    if layer.affine:
        y = y * params["weight"].reshape(1, c, 1) + params["bias"].reshape(1, c, 1)
    return y.reshape(x.shape), stats


def reference_grads(layer, x, params, upstream, h=1e-6):
    """d sum(upstream·y)/d params and d/dx of :func:`reference`: y is linear in weight and bias
    (closed form), the rest by central differences in float64."""
    y, _ = reference(layer, x, params)
    n, c = x.shape[:2]
    normalized = (y.reshape(n, c, -1) - params["bias"].reshape(1, c, 1)) / params[
        "weight"].reshape(1, c, 1)
    g3 = upstream.reshape(n, c, -1)
    out = {"weight": (g3 * normalized).sum((0, 2)), "bias": g3.sum((0, 2))}
    for key in ("mean_weight", "var_weight"):
        if key in params:
            d = np.zeros_like(params[key])
            for i in range(d.size):
                hi, lo = dict(params), dict(params)
                hi[key] = params[key].copy()
                hi[key][i] += h
                lo[key] = params[key].copy()
                lo[key][i] -= h
                d[i] = ((reference(layer, x, hi)[0] - reference(layer, x, lo)[0]) * upstream
                        ).sum() / (2 * h)
            out[key] = d
    return out


def perturbed(name, **kw):
    """``make_norm(name, C)`` with γ, β and mixture weights away from their initial values."""
    layer = make_norm(name, C, **kw)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_((torch.randn(p.shape, generator=gen) * 0.3).to(p.dtype))
    return layer


def arrays(layer):
    return {k: v.detach().double().numpy().copy() for k, v in layer.named_parameters()}


# --- float16 --------------------------------------------------------------------------------


@pytest.mark.parametrize("center", ["own", "subtracted"])
@pytest.mark.parametrize("name", PER_CHANNEL + PER_EXAMPLE)
def test_float16_layers_normalize_activations_whose_variance_float16_cannot_hold(name, center):
    """A float16 layer on activations of std 300 (variance 9e4, above float16's 65504), as
    torch's BatchNorm2d and GroupNorm in float16 normalize them. Before the fix every output
    was β (HN, EN, SN: the variance overflowed to inf) or NaN ((BN, BN+EN)), and the running
    variance inf after one step (torch's BatchNorm keeps 0.9 + 0.1·9e4)."""
    layer = perturbed(name, dtype=torch.float16, std_center=center)
    params = arrays(layer)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(4, C, 5, 5, generator=gen) * 300 + 50).half()
    y = layer(x)
    assert y.dtype == torch.float16
    expected, stats = reference(layer, x.double().numpy(), params)
    # float16 keeps 11 bits: outputs of a few units are good to ~5e-3
    np.testing.assert_allclose(y.detach().double().numpy(), expected, atol=2e-2)
    buffers = dict(layer.named_buffers())
    # the reference's running statistics are the sets' own (unbiased) variances; "subtracted"
    # ones, whose Bessel factors docs/nn.md derives, are checked against float32 arithmetic
    wide = perturbed(name, std_center=center)
    wide(x.float())
    for key, value in stats.items():
        start = 0.0 if key.startswith("running_mean") else 1.0
        if center == "subtracted" and key.startswith("running_var"):
            value = (dict(wide.named_buffers())[key].double().numpy() - 0.9 * start) / 0.1
        np.testing.assert_allclose(buffers[key].double().numpy(), 0.9 * start + 0.1 * value,
                                   rtol=4e-3, atol=0.1)
    layer.eval()
    y_eval = layer(x)
    expected_eval, _ = reference(
        layer, x.double().numpy(), params,
        {k: v.double().numpy() for k, v in buffers.items() if v is not None and v.dim() == 1})
    assert torch.isfinite(y_eval).all()
    np.testing.assert_allclose(y_eval.detach().double().numpy(), expected_eval, rtol=2e-2,
                               atol=2e-2)


@pytest.mark.parametrize("name", PER_CHANNEL + PER_EXAMPLE)
def test_float16_gradients_stay_finite_over_many_pixels(name):
    """std 30 over 64·20·20 pixels a channel: the backward's per-channel sum Σ g·(x - μ) is
    about 30·25600 = 7.7e5, beyond float16. torch's norms accumulate it in float32; before
    the fix the per-channel Functions formed it in float16 and the input gradient was inf."""
    layer = perturbed(name, dtype=torch.float16)
    params = arrays(layer)
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(64, C, 20, 20, generator=gen) * 30).half().requires_grad_()
    # an upstream gradient that follows the activations, as that of a loss on y does
    upstream = x.detach().float() / 30 + torch.randn(x.shape, generator=gen)
    y = layer(x)
    (y.float() * upstream).sum().backward()
    assert torch.isfinite(x.grad).all()
    expected = reference_grads(layer, x.detach().double().numpy(), params,
                               upstream.double().numpy())
    for key, value in expected.items():
        got = dict(layer.named_parameters())[key].grad.double().numpy()
        np.testing.assert_allclose(got, value, rtol=0.02, atol=0.02 * np.abs(value).max())
    # the input gradient against float32 arithmetic on the same float16 values
    wide = perturbed(name)
    x32 = x.detach().float().requires_grad_()
    (wide(x32) * upstream).sum().backward()
    scale = x32.grad.abs().max().item()
    assert (x.grad.float() - x32.grad).abs().max().item() < 2e-2 * scale


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kind", ["offset", "constant"])
@pytest.mark.parametrize("name", PER_EXAMPLE)
def test_bfloat16_per_example_norms_keep_channels_far_from_zero(name, kind, layout):
    """bfloat16 layers of the per-example norms on a large input (the autograd Function's
    route): activations of mean 100 and std 0.5, or a constant channel (exactly β). Before the
    fix the Function's bfloat16 arithmetic gave outputs off by 1.5 and 4; torch's BatchNorm2d in
    bfloat16 is off by ~0.02 on the same offset input."""
    layer = perturbed(name, dtype=torch.bfloat16)
    params = arrays(layer)
    gen = torch.Generator().manual_seed(5)
    shape = (16, C, 24, 24)
    x = (torch.randn(shape, generator=gen) * 0.5 + 100 if kind == "offset"
         else torch.full(shape, 5.0)).bfloat16()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected, _ = reference(layer, x.double().numpy(), params)
    # bfloat16 keeps 8 bits: outputs of a few units are good to ~2e-2
    np.testing.assert_allclose(y.detach().double().numpy(), expected, atol=5e-2)


@pytest.mark.parametrize("name", ("hn", "en_g4", "sn"))
def test_float16_under_torch_func_matches_float64(name):
    """torch.func sees the plain ops; in float16 they overflowed there too."""
    layer = perturbed(name, dtype=torch.float16, track_running_stats=False)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, C, 5, 5, generator=gen) * 300).half()
    upstream = torch.randn(x.shape, generator=gen)

    def loss(p):
        return (functional_call(layer, p, (x,)).float() * upstream).sum()

    grads = grad(loss)(params)
    expected = reference_grads(layer, x.double().numpy(), arrays(layer),
                               upstream.double().numpy())
    for key, value in expected.items():
        np.testing.assert_allclose(grads[key].double().numpy(), value, rtol=0.02,
                                   atol=0.02 * np.abs(value).max())


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("build", [
    lambda dtype: HeteroNorm(C, dtype=dtype),
    lambda dtype: SwitchableNorm(C, dtype=dtype, affine=False),
    lambda dtype: make_norm("hn_g4", C, dtype=dtype),
])
def test_a_dtype_that_is_not_floating_point_is_refused_naming_it(build, dtype):
    """Before, torch's RuntimeError ("Only Tensors of floating point and complex dtype can
    require gradients") named neither the argument nor the value; with ``affine=False`` the
    layer was built with integer buffers and failed at its first forward."""
    with pytest.raises(StatscopeError, match=rf"dtype={dtype!r}: expected a floating-point"):
        build(dtype)


# --- DistributedDataParallel (gloo, 2 ranks) -------------------------------------------------

DDP_NAMES = ("bn", "gn_g4", "en", "hn", "hn_g4", "bn+en", "sn", "bn+in+ln")
DDP_SHAPE = (2, C, 3, 3)

DDP_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    sys.path.insert(0, sys.argv[2])
    from test_nn_outside import DDP_NAMES, DDP_SHAPE, ddp_inputs, perturbed
    import statscope.nn as snn

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results = {}
    for name in DDP_NAMES + ("convert",):
        if name == "convert":  # a SyncBatchNorm converted to HN: per-rank statistics, as documented
            layer = snn.convert(torch.nn.Sequential(torch.nn.SyncBatchNorm(DDP_SHAPE[1])), "hn")[0]
            with torch.no_grad():
                layer.weight.add_(0.25)
        else:
            layer = perturbed(name)
        model = DDP(layer)
        x, upstream, probe = ddp_inputs(rank)
        y = model(x)
        (y * upstream).sum().backward()
        buffers = {k: v.tolist() for k, v in layer.named_buffers() if v.dim() == 1}
        model.eval()
        with torch.no_grad():
            y_eval = model(probe)  # DDP first broadcasts rank 0's buffers
        results[name] = {"y": y.tolist(), "y_eval": y_eval.tolist(), "buffers": buffers,
                         "grads": {k: p.grad.tolist() for k, p in layer.named_parameters()}}
    with open(f"{sys.argv[1]}.{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
""")


def ddp_inputs(rank):
    """Rank ``rank``'s half of the global batch, its upstream gradient and an eval probe."""
    gen = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(DDP_SHAPE, generator=gen) * (1 + rank) + rank
    upstream = torch.randn(DDP_SHAPE, generator=gen)
    probe = torch.randn(DDP_SHAPE, generator=torch.Generator().manual_seed(99))
    return x, upstream, probe


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "result"
    script = out.parent / "train.py"
    script.write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), str(out), os.path.dirname(__file__)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the ranks it started
        proc.communicate()
        pytest.fail("torchrun with 2 ranks did not finish in 240 s")
    assert proc.returncode == 0, err[-3000:]
    return [json.loads((out.parent / f"result.{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("name", DDP_NAMES + ("convert",))
def test_ddp_ranks_normalize_with_their_own_batch_and_average_gradients(ddp_results, name):
    """No statscope norm synchronises statistics (docs/nn.md): under DDP each rank's output and
    running statistics are those of its own batch, the gradients DDP's average of the ranks',
    and in eval both ranks use rank 0's running statistics (DDP broadcasts buffers)."""
    if name == "convert":
        layer = make_norm("hn", C)
        with torch.no_grad():
            layer.weight.add_(0.25)
    else:
        layer = perturbed(name)
    params = arrays(layer)
    grads = []
    for rank in (0, 1):
        x, upstream, probe = (t.double().numpy() for t in ddp_inputs(rank))
        got = ddp_results[rank][name]
        expected, stats = reference(layer, x, params)
        np.testing.assert_allclose(np.array(got["y"]), expected, atol=1e-5)
        for key, value in stats.items():  # momentum 0.1 from 0 (means) and 1 (variances)
            start = 0.0 if key.startswith("running_mean") else 1.0
            np.testing.assert_allclose(got["buffers"][key], 0.9 * start + 0.1 * value,
                                       atol=1e-6)
        grads.append(reference_grads(layer, x, params, upstream))
    running = {k: np.array(v) for k, v in ddp_results[0][name]["buffers"].items()}
    expected_eval, _ = reference(layer, probe, params, running)
    for rank in (0, 1):
        got = ddp_results[rank][name]
        np.testing.assert_allclose(np.array(got["y_eval"]), expected_eval, atol=1e-5)
        for key in grads[0]:
            np.testing.assert_allclose(got["grads"][key], (grads[0][key] + grads[1][key]) / 2,
                                       rtol=1e-4, atol=1e-5)
