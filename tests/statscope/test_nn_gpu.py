"""statscope.nn on a CUDA device: every norm against the float64 plain ops on the CPU."""

import copy

import pytest
import torch

from statscope.nn import make_norm
from statscope.nn.algebra import plain_forward

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

NAMES = ["bn", "gn_g2", "ln", "in", "en", "en_g2", "hn", "hn_g2", "sn", "bn+en", "bn+in+ln"]
SHAPES = [((6, 8), None), ((3, 8, 5, 4), None), ((3, 8, 5, 4), torch.channels_last),
          ((64, 8, 32, 32), None)]  # the last is past the CPU's size limits of the routes


def close(got, want, what):
    """float32 on the GPU against float64: within 1e-4 of the largest value, 1e-3 of each."""
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-3,
                               atol=1e-4 * max(1.0, want.abs().max().item()), msg=what)


@pytest.mark.parametrize("shape, fmt", SHAPES, ids=["nc", "nchw", "channels_last", "large"])
@pytest.mark.parametrize("name", NAMES)
def test_cuda_training_steps_match_float64_plain_ops(name, shape, fmt):
    if len(shape) == 2 and name in ("in", "sn", "bn+in+ln"):
        pytest.skip("per-example sets need pixels")
    torch.manual_seed(0)
    layer = make_norm(name, 8)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    reference = copy.deepcopy(layer).double()
    layer = layer.cuda()
    for _ in range(2):
        x = torch.randn(shape, dtype=torch.float64) * 2 + 3
        g = torch.randn(shape, dtype=torch.float64)
        xc = x.float().cuda()
        if fmt is not None:
            xc = xc.contiguous(memory_format=fmt)
        xc.requires_grad_()
        xr = x.clone().requires_grad_()
        y = layer(xc)
        want = (reference(xr) if name in ("bn", "gn_g2", "ln", "in") else
                plain_forward(reference, xr, reference.weight, reference.bias,
                              getattr(reference, "mean_weight", None),
                              getattr(reference, "var_weight", None), True, True))
        y.backward(g.float().cuda())
        want.backward(g)
        close(y, want, f"{name}: output")
        close(xc.grad, xr.grad, f"{name}: input gradient")
        for (pname, p), q in zip(layer.named_parameters(), reference.parameters()):
            close(p.grad, q.grad, f"{name}: {pname}.grad")
            p.grad, q.grad = None, None
        if fmt is not None:
            assert y.is_contiguous(memory_format=fmt)
    for (bname, b), c in zip(layer.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b.double().cpu(), c.double(), rtol=1e-4, atol=1e-5,
                                   msg=f"{name}: {bname}")
