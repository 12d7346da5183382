"""HN, HN_G, EN and EN_G on small inputs, composed of two or three of torch's BatchNorm calls.

On a small input (the paper's FC net at batch size 4: 512 values per layer) a norm's cost is its
number of calls, not its passes over the data. There a Python autograd Function with a dozen
``(C,)`` operations per direction loses to two of BatchNorm's own ops, whose backward runs in
C++. With K channels per group and ``x`` viewed as ``(N, G, K·|S|)``:

- ``z = batch_norm(x_view)`` in training mode, without affine, normalizes each group over the
  batch: ``z = (x - m_g) r_g``, the group's mean and ``r_g = (V_g + eps)^-½``. This is EN_G
  without its affine map, which follows as BatchNorm's inference op with statistics 0 and 1.
- HN_G re-centres z per channel: ``z - z̄_c = (x - μ_c) r_g``. That, γ and β are one more
  training-mode BatchNorm call on z with ``eps = c²`` and weight ``γ·c``, ``c = 1e10``: it
  returns ``γ c (z - z̄) / sqrt(var_c(z) + c²) + β``, and ``var_c(z) = σ²_c r_g² ≤ K`` (a channel
  holds at most all of its group's variance), so the factor ``c / sqrt(var + c²)`` differs from
  1 by less than ``K / (2c²)`` (5e-18 at K = 1e3), below float64's resolution; its gradients
  likewise reduce to the centring's and γ's to within that.
- HN with ``std_center="subtracted"`` centres x per channel first (``d = x - μ``); the group's
  variance of d around its mean (0) is the pooled within-channel variance, so
  ``y = γ batch_norm(d_view) + β``.

Running statistics come from the same calls: the first, given scratch buffers and momentum 1,
writes the group mean and unbiased group variance into them (the kernel's own writes leave the
autograd version counters alone), the channel means are ``m_g + z̄_c / r_g``. Every gradient,
double backward included, is torch's own. Large inputs take the Function of
:mod:`statscope.nn.channel`, which makes fewer passes over the data.
"""

import torch

from statscope.nn.algebra import CENTRING_SCALE, UNIT_EPS, constants, update_extended

__all__ = ["extended_std_composed"]


def extended_std_composed(layer, x, update):
    """Training-mode output of an HN/HN_G/EN/EN_G ``layer`` on a contiguous ``x``.

    Args:
        layer: the norm layer; its ``_plan`` has one mean set and one extended std set.
        x: ``(N, C, *S)``, contiguous, float32, float64 or bfloat16, the layer's dtype.
        update: whether to update the layer's running statistics.

    Returns:
        Tensor: same shape and dtype as ``x``.
    """
    plan = layer._plan
    groups = plan.groups
    extended_mean = plan.mean_extended[0]
    subtracted = plan.subtracted and not extended_mean
    known = constants(layer, x)
    shape = x.shape
    source = x
    if subtracted:
        mu = x.mean((0, *range(2, x.dim())), keepdim=True)
        source = x - mu
    z, group_mean, r = torch.native_batch_norm(
        source.view(shape[0], groups, -1), None, None, known.scratch_mean, known.scratch_var,
        True, 1.0, layer.eps)
    z = z.view(shape)
    weight, bias = layer.weight, layer.bias
    if extended_mean or subtracted:
        y = z if weight is None else torch.batch_norm(z, weight, bias, known.zeros, known.ones,
                                                     False, 0.0, UNIT_EPS, False)
    else:
        y, centre, _ = torch.native_batch_norm(
            z, known.centring if weight is None else weight * known.centring_scale, bias, None,
            None, True, 0.0, CENTRING_SCALE * CENTRING_SCALE)
    if update:
        # group_mean, r and centre are BatchNorm's saved statistics, outside autograd
        if extended_mean:
            mean = group_mean
        elif subtracted:
            mean = mu.detach()
        elif groups == 1:
            mean = torch.addcdiv(group_mean, centre, r)
        else:
            mean = torch.addcdiv(group_mean.view(groups, 1), centre.view(groups, -1),
                                 r.view(groups, 1))
        update_extended(layer, mean, known.scratch_var, known.rescale)
    return y
