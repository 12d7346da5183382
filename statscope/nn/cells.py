"""Norms with per-example statistics (SN, (BN, BN+IN+LN), pairs with IN/LN/GN sets) as one Function.

Such a norm is ``y = (x - m)·a + β`` with ``m`` and ``a = γ (v + eps)^-½`` per example and
channel, functions of the cell moments ``μ``, ``σ²`` (over the ``|S|`` pixels of each example and
channel), the mixture weights and, in eval, the running statistics. Written in plain ops its
autograd graph holds a dozen full-size tensors; here the full-size work is four calls:

- forward: the cell moments from GroupNorm's kernel with one group per channel (its mean and
  ``rstd``, ``σ² = rstd⁻²`` at an eps of 1e-30), then ``x·a + (β - m·a)`` in one ``addcmul``;
- backward: ``Σ g`` and ``D = Σ g·(x - μ)`` per cell in one reduction (BatchNorm's backward kernel
  on the ``(1, N·C, |S|)`` view), then ``dx = g·a + (x - μ)·2dσ²/|S| + dμ/|S|`` in two calls.

Between them, the ``(N, C)`` algebra (set averages, centres, mixtures, γ) is the layers' own
:func:`statscope.nn.algebra.statistics_from_cells`, and its backward is closed-form: every set
statistic is an average over the cells of the set, a self-adjoint map, so the gradient reaching
the cells is the set average of the gradient (``dm = -a Σg``, ``da = D + (μ - m) Σg`` to start
from).
"""

import torch

from statscope.nn.algebra import UNIT_EPS, statistics_from_cells
from statscope.nn.channel import recomputed_backward
from statscope.nn.moments import set_average

__all__ = ["cell_norm"]


def _cell_moments(x):
    """Biased mean and variance of each example and channel, ``(N, C)`` each."""
    n, c = x.shape[:2]
    # CUDA's GroupNorm kernel takes contiguous inputs only; the CPU's takes channels_last too
    # but sums x and x² there in one pass, which loses the variance of channels far from 0
    # (offset 1e4, std 1, float32: off by 1e3 of itself), and strided views not at all
    if not x.is_contiguous():
        x = x.contiguous()
    _, mean, rstd = torch.ops.aten.native_group_norm(x, None, None, n, c, x.numel() // (n * c),
                                                     c, UNIT_EPS)
    return mean, rstd.pow(-2)


def _cell_sums(grad, x, mean):
    """``Σ g`` and ``Σ g·(x - μ)`` over the pixels of each example and channel, ``(N, C)`` each."""
    n, c = x.shape[:2]
    if x.device.type == "cpu" and x.is_contiguous() and grad.is_contiguous():
        flat = mean.reshape(-1)
        _, sum_gx, sum_g = torch.ops.aten.native_batch_norm_backward(
            grad.view(1, n * c, -1), x.view(1, n * c, -1), None, flat, torch.ones_like(flat),
            None, None, False, UNIT_EPS, [False, True, True])
        return sum_g.view(n, c), sum_gx.view(n, c)
    dims = tuple(range(2, x.dim()))
    view = (n, c) + (1,) * (x.dim() - 2)
    return grad.sum(dims), (grad * (x - mean.view(view))).sum(dims)


def _mix_backward(shares, grad, stats):
    """Gradient of the mixture weights (through the softmax) given the mixture's gradient."""
    share_grads = torch.stack([(grad * stat).sum() for stat in stats])
    return shares * (share_grads - (shares * share_grads).sum())


def _statistics_backward(layer, parts, grad_mean, grad_var, needs_mean_weight, needs_var_weight):
    """Closed-form backward of :func:`~statscope.nn.algebra.statistics_from_cells`.

    ``grad_mean`` and ``grad_var`` are the ``(N, C)`` gradients of its two outputs.

    Every set statistic is an average over the cells of a set, a self-adjoint operator: the
    gradient reaching the cells is the set average of the gradient. Returns the gradients of the
    cell means and variances and of the two mixture weights (None where not needed).
    """
    shares_mean, means, mean_from_cells, shares_var, variances, deviations = parts
    grad_mu = grad_sigma = None
    grad_var_weight = (_mix_backward(shares_var, grad_var, variances)
                       if needs_var_weight else None)
    for k, (pixel_set, deviation) in enumerate(zip(layer.std_sets, deviations)):
        if deviation is False:  # running statistics
            continue
        share = grad_var if shares_var is None else grad_var * shares_var[k]
        h = set_average(share, pixel_set, layer.std_groups)
        grad_sigma = h if grad_sigma is None else grad_sigma + h
        if deviation is None:  # the cells' own variance
            continue
        term = 2 * h * deviation
        grad_mu = term if grad_mu is None else grad_mu + term
        if layer.std_center == "subtracted":
            # the centre is the mean; with "own" it is the set's mean, which takes back
            # nothing: h is constant over the set and the deviations sum to zero there
            grad_mean = grad_mean - term
    grad_mean_weight = (_mix_backward(shares_mean, grad_mean, means)
                        if needs_mean_weight else None)
    for k, (pixel_set, from_cells) in enumerate(zip(layer.mean_sets, mean_from_cells)):
        if not from_cells:
            continue
        share = grad_mean if shares_mean is None else grad_mean * shares_mean[k]
        term = set_average(share, pixel_set, layer.mean_groups)
        grad_mu = term if grad_mu is None else grad_mu + term
    return grad_mu, grad_sigma, grad_mean_weight, grad_var_weight


class _CellNorm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, mean_weight, var_weight, layer, use_batch, update):
        n, c = x.shape[:2]
        mu, var = _cell_moments(x)
        parts = []
        mean, v = statistics_from_cells(layer, x.shape, (mu, var), mean_weight, var_weight,
                                        use_batch, update, parts)
        r = torch.rsqrt(v + layer.eps).expand(n, c)
        scale = r if weight is None else r * weight
        mean = mean.expand(n, c)
        shift = -mean * scale if bias is None else torch.addcmul(bias, mean, scale, value=-1)
        view = (n, c) + (1,) * (x.dim() - 2)
        y = torch.addcmul(shift.view(view), x, scale.view(view))
        ctx.save_for_backward(x, weight, bias, mean_weight, var_weight)
        ctx.layer, ctx.use_batch = layer, use_batch
        ctx.stats = (mu, var, mean, r, scale, parts)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean_weight, var_weight = ctx.saved_tensors
        layer, use_batch = ctx.layer, ctx.use_batch
        needs = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():
            inputs = (x, weight, bias, mean_weight, var_weight)
            return (*recomputed_backward(layer, grad, inputs, needs, use_batch), None, None, None)
        mu, var, mean, r, scale, parts = ctx.stats
        n, c = x.shape[:2]
        sum_g, sum_gx = _cell_sums(grad, x, mu)
        grad_mean = -scale * sum_g
        grad_scale = torch.addcmul(sum_gx, mu - mean, sum_g)  # Σ g·(x - m)
        grad_weight = (grad_scale * r).sum(0) if needs[1] and weight is not None else None
        grad_bias = sum_g.sum(0) if needs[2] and bias is not None else None
        # a = γ (v + eps)^-½: dv = -½ γ r³ da
        grad_r = grad_scale if weight is None else grad_scale * weight
        grad_v = grad_r * r.pow(3) * -0.5
        grad_mu, grad_sigma, grad_mean_weight, grad_var_weight = _statistics_backward(
            layer, parts, grad_mean, grad_v, needs[3] and mean_weight is not None,
            needs[4] and var_weight is not None)
        grad_x = None
        if needs[0]:
            count = x.numel() // (n * c)
            view = (n, c) + (1,) * (x.dim() - 2)
            slope = (torch.zeros_like(var) if grad_sigma is None
                     else (grad_sigma * (2.0 / count)).expand(n, c))
            offset = (torch.zeros_like(mu) if grad_mu is None
                      else (grad_mu * (1.0 / count)).expand(n, c))
            offset = torch.addcmul(offset, mu, slope, value=-1)
            grad_x = torch.addcmul(offset.reshape(view), x, slope.reshape(view))
            grad_x.addcmul_(grad, scale.reshape(view))
        return (grad_x, grad_weight, grad_bias, grad_mean_weight, grad_var_weight, None, None,
                None)


def cell_norm(layer, x, use_batch, update):
    """The output of a per-example ``layer`` on ``x`` ``(N, C, *S)`` (S non-empty) as one Function.

    Args:
        layer: a statscope norm layer.
        x: ``(N, C, *S)`` with at least one spatial dim, the layer's dtype.
        use_batch: batch sets from the batch (training) rather than the running statistics.
        update: whether to update the running statistics.

    Returns:
        Tensor: same shape, dtype and memory format as ``x``.
    """
    return _CellNorm.apply(x, layer.weight, layer.bias, layer.mean_weight, layer.var_weight,
                           layer, use_batch, update)
