"""Norms whose statistics are all per channel (EN, HN, their _G forms, (BN, BN+EN)) as Functions.

With every mean and std set pooling over the batch (``batch``, ``extended``), training-mode
normalization is ``y = (x - m)·γ r + β`` with ``m`` and ``r = (v + eps)^-½`` of shape ``(C,)``,
functions of the channel moments ``μ``, ``σ²`` (over ``M = N·|S|`` pixels each) and the mixture
weights. The Function computes them with torch's own BatchNorm kernels and a handful of ``(C,)``
operations, and differentiates in closed form:

- forward: the channel moments in two passes each (BatchNorm's statistics call on ``(N, C)``,
  torch's reductions on feature maps), the set statistics on ``(G, K)`` views (G channel groups
  of K), then BatchNorm's inference kernel with ``m`` and ``v`` as its statistics;
- backward: ``Σ g`` and ``D = Σ g·(x - μ)`` per channel in one reduction (BatchNorm's backward
  kernel, input gradient off), the chain rule through the set statistics on ``(C,)`` tensors, and
  ``dx = g·γr + (x - μ)·k + o`` in two full-size calls, where ``o = dμ/M`` and ``k = 2 dσ²/M``
  are what the statistics pass back to the channel moments.

The per-call cost is a few microseconds of ``(C,)`` arithmetic on top of BatchNorm's own kernels,
instead of the autograd graph of a dozen small ops. When the backward itself is differentiated
(``create_graph=True``) it recomputes the layer in plain ops and differentiates those, so double
backward sees every path.
"""

from dataclasses import dataclass

import torch

from statscope.nn.algebra import (UNIT_EPS, constants, plain_forward, update_channel,
                                  update_extended)

__all__ = ["ChannelPlan", "channel_norm", "recomputed_backward"]


@dataclass(frozen=True)
class ChannelPlan:
    """Static shape of a per-channel norm: which sets, how many groups, which centre.

    Attributes:
        num_features: C.
        groups: G, the channel groups of every extended set (1 when there is none).
        mean_extended: per mean set, whether it is "extended" (else "batch").
        std_extended: per std set, the same.
        subtracted: ``std_center == "subtracted"``.
    """

    num_features: int
    groups: int
    mean_extended: tuple
    std_extended: tuple
    subtracted: bool

    @property
    def extended_std(self):
        """bool: one mean set and one extended std set: HN, HN_G, EN, EN_G."""
        return len(self.mean_extended) == 1 and self.std_extended == (True,)

    @property
    def mean_is_channel(self):
        """bool: the mean subtracted is the channel mean itself (a lone batch set)."""
        return self.mean_extended == (False,)

    @property
    def needs_group_mean(self):
        """bool: some set statistic uses the group average of the channel means."""
        return any(self.mean_extended) or (any(self.std_extended) and not self.subtracted)


def _mix(stats, shares):
    if shares is None:
        return stats[0]
    if len(stats) == 2:  # shares sum to 1: one call
        return torch.lerp(stats[0], stats[1], shares[1])
    total = stats[0] * shares[0]
    for k in range(1, len(stats)):
        total = total + stats[k] * shares[k]
    return total


def _flat(t, ones):
    """A ``(G, K)`` or ``(G, 1)`` statistic as a contiguous ``(C,)``; ``ones`` is ``(G, K)``."""
    if t.shape[1] == 1:
        t = ones * t
    return t.view(-1)


def set_statistics(mu, var, plan, shares_mean, shares_var, inv_k):
    """Set means and variances from the channel moments, on ``(G, K)`` views.

    Args:
        mu: ``(C,)`` channel means.
        var: ``(C,)`` biased channel variances.
        plan: the layer's :class:`ChannelPlan`.
        shares_mean: the softmax shares of the mean sets (a tuple of 0-d tensors), or None for
            a single set.
        shares_var: the same for the std sets.
        inv_k: 1/K as a 0-d tensor.

    Returns:
        tuple: ``(means, m, variances, v, group_mean)``, each set statistic ``(G, K)`` (batch
        sets) or ``(G, 1)`` (extended sets); ``m`` and ``v`` their mixtures; ``group_mean`` the
        ``(G, 1)`` group average of ``mu`` or None.
    """
    groups = plan.groups
    mu2 = mu.view(groups, -1)
    var2 = var.view(groups, -1)
    group_mean = mu2.sum(1, keepdim=True) * inv_k if plan.needs_group_mean else None
    means = [group_mean if ext else mu2 for ext in plan.mean_extended]
    m = _mix(means, shares_mean)
    variances = []
    for ext in plan.std_extended:
        centre = m if plan.subtracted else (group_mean if ext else mu2)
        if centre is mu2:
            cells = var2
        else:
            dev = mu2 - centre
            cells = torch.addcmul(var2, dev, dev)
        variances.append(cells.sum(1, keepdim=True) * inv_k if ext else cells)
    return means, m, variances, _mix(variances, shares_var), group_mean


def _softmax_backward(shares, grads):
    grad = torch.stack(grads)
    return shares * (grad - (shares * grad).sum())


class _ChannelNorm(torch.autograd.Function):
    """Any per-channel norm (mixtures such as (BN, BN+EN) included), by the general chain rule.

    ``y = (x - m)·γ r + β`` with ``m`` and ``v = r^-2 - eps`` mixtures of set statistics; the
    backward takes ``Σ g`` and ``E = Σ g·(x - m)`` back through every set to the channel moments
    (``dμ``, ``dσ²``) and the mixture weights, then ``dx = g·γr + dμ/M + 2 dσ²·(x - μ)/M``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean_weight, var_weight, layer, update):
        plan = layer._plan
        known = constants(layer, x)
        mu, var = _channel_moments(x)
        softmax_mean = None if mean_weight is None else torch.softmax(mean_weight, 0)
        softmax_var = None if var_weight is None else torch.softmax(var_weight, 0)
        shares_mean = None if softmax_mean is None else softmax_mean.unbind()
        shares_var = None if softmax_var is None else softmax_var.unbind()
        means, m, variances, v, group_mean = set_statistics(mu, var, plan, shares_mean,
                                                            shares_var, known.inv_k)
        ones = known.ones.view(plan.groups, -1)
        y = torch.batch_norm(x, weight, bias, _flat(m, ones), _flat(v, ones), False, 0.0,
                             max(layer.eps, UNIT_EPS), False)
        if update:
            update_channel(layer, x.shape, means, variances, softmax_mean, known)
        ctx.save_for_backward(x, weight, bias, mean_weight, var_weight)
        ctx.layer = layer
        ctx.stats = (mu, means, m, variances, v, group_mean, softmax_mean, shares_mean,
                     softmax_var, shares_var, known)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean_weight, var_weight = ctx.saved_tensors
        if torch.is_grad_enabled():
            inputs = (x, weight, bias, mean_weight, var_weight)
            return (*recomputed_backward(ctx.layer, grad, inputs, ctx.needs_input_grad[:5]),
                    None, None)
        need_x, need_weight, need_bias, need_mean_weight, need_var_weight = \
            ctx.needs_input_grad[:5]
        plan = ctx.layer._plan
        (mu, means, m, variances, v, group_mean, softmax_mean, shares_mean, softmax_var,
         shares_var, known) = ctx.stats
        groups = plan.groups
        ones = known.ones.view(groups, -1)
        _, sum_gx, sum_g = _grad_sums(grad, x, mu, known.ones)
        sum_g2, sum_gx2 = sum_g.view(groups, -1), sum_gx.view(groups, -1)
        mu2 = mu.view(groups, -1)
        # E = Σ g·(x - m), the gradient of the output's scale
        e = sum_gx2 if plan.mean_is_channel else torch.addcmul(sum_gx2, mu2 - m, sum_g2)
        r = (v + known.eps).rsqrt_()
        grad_weight = _flat(e * r, ones) if need_weight and weight is not None else None
        grad_bias = sum_g if need_bias and bias is not None else None
        if not (need_x or need_mean_weight or need_var_weight):
            return None, grad_weight, grad_bias, None, None, None, None
        w2 = None if weight is None else weight.view(groups, -1)
        a = r if w2 is None else w2 * r
        grad_v = (e if w2 is None else e * w2) * (r.pow(3) * known.minus_half)
        grad_m = -a * sum_g2
        grad_mu = None
        grad_var = None
        grad_shares_var = []
        for k, (ext, var_k) in enumerate(zip(plan.std_extended, variances)):
            grad_var_k = grad_v if shares_var is None else grad_v * shares_var[k]
            if need_var_weight:
                grad_shares_var.append((grad_v * var_k).sum())
            if ext:
                grad_var_k = grad_var_k.sum(1, keepdim=True) * known.inv_k
            grad_var = grad_var_k if grad_var is None else grad_var + grad_var_k
            centre = m if plan.subtracted else (group_mean if ext else mu2)
            if centre is not mu2:
                # d/dμ of (μ - centre)²; a centre equal to the group mean takes back nothing,
                # since the deviations from it sum to zero over the group
                term = (grad_var_k + grad_var_k) * (mu2 - centre)
                grad_mu = term if grad_mu is None else grad_mu + term
                if plan.subtracted:
                    grad_m = grad_m - term
        grad_shares_mean = []
        for k, (ext, mean_k) in enumerate(zip(plan.mean_extended, means)):
            grad_mean_k = grad_m if shares_mean is None else grad_m * shares_mean[k]
            if need_mean_weight:
                grad_shares_mean.append((grad_m * mean_k).sum())
            if ext:
                grad_mean_k = grad_mean_k.sum(1, keepdim=True) * known.inv_k
            grad_mu = grad_mean_k if grad_mu is None else grad_mu + grad_mean_k
        grad_x = None
        if need_x:
            slope = _flat(grad_var * known.two_over_count, ones)
            offset = _flat(grad_mu * known.inv_count, ones)
            # (x - μ)·slope + offset in BatchNorm's inference kernel, then + g·γr in place
            grad_x = torch.batch_norm(x, slope, offset, mu, known.ones, False, 0.0, UNIT_EPS,
                                      False)
            grad_x.addcmul_(grad, _flat(a, ones).view((1, -1) + (1,) * (x.dim() - 2)))
        grad_mean_weight = (_softmax_backward(softmax_mean, grad_shares_mean)
                            if need_mean_weight else None)
        grad_var_weight = (_softmax_backward(softmax_var, grad_shares_var)
                           if need_var_weight else None)
        return grad_x, grad_weight, grad_bias, grad_mean_weight, grad_var_weight, None, None


class _ExtendedStdNorm(torch.autograd.Function):
    """HN, HN_G, EN and EN_G: the mean of the channel or of its group, the std of the group.

    The general Function above, specialised, with every ``(C,)`` step written in the fewest
    calls (constants are cached 0-d tensors). It serves inputs too large or too strided for
    :mod:`statscope.nn.composed`: the channel moments, the group moments from them, one
    transform call forward; one reduction and two full-size calls backward. With ``a = γ r`` per
    channel, ``r`` per group, the mean ``m`` and the centre ``c`` of the variance (the group
    mean, or the channel mean for HN with ``std_center="subtracted"``), ``E = Σ g·(x - m)`` and
    ``s = -r³ Σ_group γE / (K M)``:

        dx = g·a + s·(x - c) - t,   t = a Σg / M (HN) or Σ_group a Σg / (K M) (EN)
    """

    @staticmethod
    def forward(ctx, x, weight, bias, layer, update):
        groups = layer._plan.groups
        extended_mean = layer._plan.mean_extended[0]
        subtracted = layer._plan.subtracted and not extended_mean
        known = constants(layer, x)
        eps, c_s, c_t, inv_k, bessel, ones = (known.eps, known.slope, known.offset, known.inv_k,
                                              known.bessel, known.ones)
        size = x.shape[1]
        mu, var = _channel_moments(x)
        group_mean = None
        if subtracted:
            group_var = var.view(groups, -1).sum(1) * inv_k
        else:
            mu2 = mu.view(groups, -1)
            group_mean = mu2.sum(1, keepdim=True) * inv_k
            dev = mu2 - group_mean
            group_var = torch.addcmul(var.view(groups, -1), dev, dev).sum(1) * inv_k
            group_mean = group_mean.view(groups)
        r = (group_var + eps).rsqrt_()
        if groups == 1:
            a = ones * r if weight is None else weight * r
            centre = ones * group_mean if extended_mean else mu
        else:
            r2 = r.view(groups, 1)
            a = ((ones if weight is None else weight).view(groups, -1) * r2).view(size)
            centre = ((ones.view(groups, -1) * group_mean.view(groups, 1)).view(size)
                      if extended_mean else mu)
        y = torch.batch_norm(x, a, bias, centre, ones, False, 0.0, UNIT_EPS, False)
        if update:
            update_extended(layer, group_mean if extended_mean else mu, group_var, bessel)
        ctx.save_for_backward(x, weight, bias)
        ctx.layer = layer
        ctx.stats = (r, a, centre, ones, group_mean if not (subtracted or extended_mean) else None,
                     mu, c_s, c_t, groups, extended_mean)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():
            inputs = (x, weight, bias, None, None)
            needs = (*ctx.needs_input_grad[:3], False, False)
            return (*recomputed_backward(ctx.layer, grad, inputs, needs)[:3], None, None)
        r, a, centre, ones, group_mean, mu, c_s, c_t, groups, extended_mean = ctx.stats
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        size = x.shape[1]
        _, e, sum_g = _grad_sums(grad, x, centre, ones, need_x or need_weight)
        grad_x = grad_weight = None
        if groups == 1:
            if need_weight and weight is not None:
                grad_weight = e * r
            if need_x:
                s = (e.dot(weight) if weight is not None else e.sum()) * (r.pow(3) * c_s)
                slope = ones * s
                if extended_mean:
                    offset = ones * (a.dot(sum_g) * c_t)
                elif group_mean is not None:
                    offset = torch.addcmul(a * sum_g * c_t, mu - group_mean, s)
                else:
                    offset = a * sum_g * c_t
        else:
            r2 = r.view(groups, 1)
            e2 = e.view(groups, -1)
            if need_weight and weight is not None:
                grad_weight = (e2 * r2).view(size)
            if need_x:
                ge = e2 if weight is None else e2 * weight.view(groups, -1)
                s = ge.sum(1, keepdim=True) * (r2.pow(3) * c_s)
                slope = (ones.view(groups, -1) * s).view(size)
                if extended_mean:
                    t = (a * sum_g).view(groups, -1).sum(1, keepdim=True) * c_t
                    offset = (ones.view(groups, -1) * t).view(size)
                elif group_mean is not None:
                    dev = mu.view(groups, -1) - group_mean.view(groups, 1)
                    offset = torch.addcmul((a * sum_g * c_t).view(groups, -1), dev, s).view(size)
                else:
                    offset = a * sum_g * c_t
        if need_x:
            grad_x = torch.batch_norm(x, slope, offset, centre, ones, False, 0.0, UNIT_EPS, False)
            grad_x.addcmul_(grad, a.view((1, size) + (1,) * (x.dim() - 2)))
        grad_bias = sum_g if need_bias and bias is not None else None
        return grad_x, grad_weight, grad_bias, None, None


def _channel_moments(x):
    """Biased mean and variance per channel ``(C,)``, each in two passes (exact at an offset)."""
    if x.dim() == 2 and x.device.type in ("cpu", "cuda"):
        return torch.batch_norm_update_stats(x, None, None, 0.0)
    # on feature maps torch's reductions beat batch_norm_update_stats by 1.3-1.7x on CPU
    dims = (0, *range(2, x.dim()))
    mu = x.mean(dims)
    var = (x - mu.view((1, -1) + (1,) * (x.dim() - 2))).square_().mean(dims)
    return mu, var


def _grad_sums(grad, x, centre, ones, centred=True):
    """``(None, Σ g·(x - centre), Σ g)`` per channel, ``(C,)`` each (the first if ``centred``)."""
    if x.device.type == "cpu":
        return torch.ops.aten.native_batch_norm_backward(
            grad, x, None, centre, ones, None, None, False, UNIT_EPS, [False, centred, True])
    # CUDA's inference-mode backward kernel asserts on a missing save_mean for some shapes
    dims = (0, *range(2, x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)
    sum_gx = (grad * (x - centre.view(view))).sum(dims) if centred else None
    return None, sum_gx, grad.sum(dims)


def recomputed_backward(layer, grad, inputs, needs, use_batch=True):
    """Backward as differentiable ops (create_graph): the layer's plain-op forward, differentiated.

    Args:
        layer: the norm layer (its sets, groups, eps).
        grad: the output's gradient.
        inputs: ``(x, weight, bias, mean_weight, var_weight)``, None where absent.
        needs: whether each of them needs a gradient.
        use_batch: whether the forward used batch statistics (else the running ones).

    Returns:
        list: the five gradients, None where not needed.
    """
    wanted = [t is not None and need for t, need in zip(inputs, needs)]
    with torch.enable_grad():
        leaves = [t if t is None or t.requires_grad else t.detach().requires_grad_()
                  for t in inputs]
        y = plain_forward(layer, *leaves, use_batch, False)
        targets = [t for t, want in zip(leaves, wanted) if want]
        grads = iter(torch.autograd.grad(y, targets, grad, create_graph=True,
                                         allow_unused=True))
    return [next(grads) if want else None for want in wanted]


def channel_norm(layer, x, update):
    """Training-mode output of ``layer`` (per-channel statistics) as one autograd Function.

    Args:
        layer: a statscope norm layer with a ``_plan`` (:class:`ChannelPlan`).
        x: ``(N, C, *S)``, the dtype of the layer's parameters.
        update: whether to update the running statistics.

    Returns:
        Tensor: same shape, dtype and memory format as ``x``.
    """
    if layer._plan.extended_std:
        return _ExtendedStdNorm.apply(x, layer.weight, layer.bias, layer, update)
    return _ChannelNorm.apply(x, layer.weight, layer.bias, layer.mean_weight, layer.var_weight,
                              layer, update)
