"""The per-channel affine map ``y = (x - c)·a + b`` of a norm whose statistics are per channel.

BN, EN, EN_G, HN, HN_G and (BN, BN+EN) in training, and every fusable norm in eval, end in this
map with ``c``, ``a`` and ``b`` of shape ``(C,)``. Written as ``addcmul`` it costs autograd two
full-size products and a reduction of a temporary in the backward; as one Function it runs on
BatchNorm's own CPU kernels: the inference kernel forward, and one call of
``native_batch_norm_backward`` (inference mode) that returns ``g·a``, ``Σ g`` and
``Σ g·(x - c)`` per channel in two passes over the gradient.
"""

import torch

try:
    from torch.compiler import is_compiling as compiling
except ImportError:  # torch < 2.3
    from torch._dynamo import is_compiling as compiling

__all__ = ["centred_affine", "compiling", "UNIT_EPS"]

UNIT_EPS = 1e-30
"""The eps of the BatchNorm kernels used as plain affine maps with a unit variance: positive, as
``F.batch_norm`` demands (torch 2.11 rejects 0; on CUDA anything below cuDNN's 1e-5 takes the
native kernel), and too small to change ``1 + eps`` in any float type."""


class _CentredAffine(torch.autograd.Function):

    @staticmethod
    def forward(x, centre, scale, shift):
        return torch.nn.functional.batch_norm(x, centre, torch.ones_like(centre), scale, shift,
                                              training=False, eps=UNIT_EPS)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3])

    @staticmethod
    def backward(ctx, grad):
        x, centre, scale = ctx.saved_tensors
        need_x, need_centre, need_scale, need_shift = ctx.needs_input_grad
        if torch.is_grad_enabled() or x.device.type != "cpu":
            # create_graph: differentiable ops, so that double backward sees every path. Off the
            # CPU too: CUDA's inference-mode native_batch_norm_backward asserts on a missing
            # save_mean for some shapes (seen with (N, C) inputs on torch 2.11).
            dims = (0, *range(2, x.dim()))
            view = (1, -1) + (1,) * (x.dim() - 2)
            grad_x = grad * scale.reshape(view) if need_x else None
            grad_scale = ((x - centre.reshape(view)) * grad).sum(dims) if need_scale else None
            grad_sum = grad.sum(dims) if need_centre or need_shift else None
        else:
            grad_x, grad_scale, grad_sum = torch.ops.aten.native_batch_norm_backward(
                grad, x, scale, centre, torch.ones_like(centre), None, None, False, UNIT_EPS,
                [need_x, need_scale, need_centre or need_shift])
        grad_centre = -scale * grad_sum if need_centre else None
        return grad_x, grad_centre, grad_scale, grad_sum if need_shift else None


def centred_affine(x, centre, scale, shift):
    """``(x - centre)·scale + shift`` per channel, differentiable in all four.

    Args:
        x: ``(N, C, *S)``, any memory format. The forward rounds like BatchNorm's (as
            ``x·scale + (shift - centre·scale)``); the backward's ``Σ g·(x - centre)`` is
            centred, so with ``centre`` the channel means ``dscale`` loses nothing to an offset.
        centre: ``(C,)``.
        scale: ``(C,)``.
        shift: ``(C,)``.

    Returns:
        Tensor: same shape, dtype and memory format as ``x``.

    Example:
        >>> x = torch.tensor([[1.0, 10.0], [3.0, 20.0]])
        >>> centred_affine(x, torch.tensor([2.0, 14.0]), torch.tensor([1.0, 0.5]),
        ...                torch.tensor([0.0, 1.0]))
        tensor([[-1., -1.],
                [ 1.,  4.]])
    """
    return _CentredAffine.apply(x, centre, scale, shift)
