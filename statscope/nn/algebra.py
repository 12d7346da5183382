"""The set algebra of the layers: statistics from cell moments, running statistics, constants.

Functions of a layer (:class:`statscope.nn.layers.HeteroNorm` or
:class:`~statscope.nn.layers.SwitchableNorm`) shared by its routes: the plain-op forward
(:func:`plain_forward`, also what ``torch.compile``, ``torch.jit.trace`` and torch.func's
transforms see and what double backward differentiates), the set statistics from cell moments
(:func:`statistics_from_cells`, also the per-example Function's), Bessel's factors, the
running-statistics updates of the per-channel routes and their per-shape constants.
"""

from typing import NamedTuple

import torch

from statscope.nn.moments import cell_moments, deviation_fraction, set_average, set_size

__all__ = ["UNIT_EPS", "CENTRING_SCALE", "Constants", "constants", "fractions", "running_factor",
           "lerp_buffer", "update_channel", "update_extended", "plain_statistics",
           "statistics_from_cells", "mix", "plain_forward"]

UNIT_EPS = 1e-30
"""The eps of BatchNorm's kernels used as a plain affine map with a unit variance: positive, as
some torch versions and devices demand, and too small to change ``1 + eps`` in any float type."""

CENTRING_SCALE = 1e10
"""The c of the composed route's centring call (:mod:`statscope.nn.composed`): c² is far above any
per-channel variance of z (at most K), and c³ and c⁻³, which BatchNorm's backward forms, stay
inside float32's range."""

class Constants(NamedTuple):
    """Per-shape constants of the extended-std routes (0-d tensors unless said otherwise).

    K is the number of channels of a group, M the number of pixels of a channel.
    """

    eps: torch.Tensor
    slope: torch.Tensor
    """-1/(K·M), the Function's factor of the variance's gradient."""
    offset: torch.Tensor
    """-1/M (HN) or -1/(K·M) (EN), the factor of the mean's gradient."""
    inv_k: torch.Tensor
    bessel: torch.Tensor
    """Bessel's factor of the layer's running variance."""
    scratch_mean: torch.Tensor
    """``(G,)``, zeroed: written by the composed route's BatchNorm call."""
    scratch_var: torch.Tensor
    """``(G,)``, zeroed: receives the unbiased group variance."""
    rescale: "torch.Tensor | None"
    """Takes the scratch variance's Bessel factor (whole group) to the layer's, or None."""
    zeros: torch.Tensor
    """``(C,)`` zeros, the statistics of BatchNorm's inference op used as an affine map."""
    ones: torch.Tensor
    """``(C,)`` ones."""
    centring: torch.Tensor
    """``(C,)`` filled with :data:`CENTRING_SCALE`, the centring call's weight without γ."""
    centring_scale: torch.Tensor
    """:data:`CENTRING_SCALE`."""
    inv_count: torch.Tensor
    """1/M."""
    two_over_count: torch.Tensor
    """2/M."""
    minus_half: torch.Tensor
    """-1/2."""
    fractions: tuple
    """Per std set, 1 over the expected mean square deviation over the variance (Bessel's
    factor, 0-d tensors), or () when it depends on the mixture weights of the mean."""

    @classmethod
    def build(cls, layer, x):
        plan = layer._plan
        per_group = layer.num_features // plan.groups
        count = x.numel() // layer.num_features
        pooled = per_group * count
        extended_mean = plan.mean_extended[0]
        cells = count if plan.subtracted and not extended_mean else pooled
        kind = {"dtype": x.dtype, "device": x.device}

        def scalar(value):
            return torch.tensor(value, **kind)

        # float16 cannot hold c (nor takes the composed route, the only user of it): NaN there
        centring = (CENTRING_SCALE if torch.finfo(x.dtype).max > CENTRING_SCALE ** 3
                    else float("nan"))

        return cls(scalar(layer.eps if layer.eps > 0 else UNIT_EPS), scalar(-1.0 / pooled),
                   scalar(-1.0 / (pooled if extended_mean else count)), scalar(1.0 / per_group),
                   scalar(1.0 / (1.0 - 1.0 / cells)), torch.zeros(plan.groups, **kind),
                   torch.zeros(plan.groups, **kind),
                   None if cells == pooled else
                   scalar((1.0 - 1.0 / pooled) / (1.0 - 1.0 / cells)),
                   torch.zeros(layer.num_features, **kind), torch.ones(layer.num_features, **kind),
                   torch.full((layer.num_features,), centring, **kind),
                   scalar(centring), scalar(1.0 / count), scalar(2.0 / count),
                   scalar(-0.5),
                   () if layer.mean_weight is not None and layer.std_center == "subtracted" else
                   tuple(scalar(1.0 / f) for f in fractions(layer, x.shape, None)))


def fractions(layer, shape, shares_mean):
    """Per std set, the expected mean square deviation over the variance (Bessel's factor).

    Deviations around the set's own mean (``std_center="own"``, or a std set equal to the
    mean set) lose one pixel's worth: ``1 - 1/n``. Around the mean actually subtracted they
    lose what that mean's sets cost (:func:`deviation_fraction`): for HN's pooled variance
    ``1 - 1/M``, M the pixels of one channel, not ``1 - 1/n`` of the whole extended set.
    Cached per shape unless it depends on the mixture weights, or under ``torch.compile`` (a
    lookup keyed by the shape would specialise the graph on the batch size: a recompile per
    size until dynamo gives up and runs the layer eagerly) or ``torch.jit.trace`` (whose sizes
    are tensors, recorded).
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return _fraction_values(layer, shape, shares_mean)
    if shares_mean is None or layer.std_center == "own":
        key = ("fractions", shape)
        known = layer._shapes.get(key)
        if known is None:
            known = layer._shapes[key] = _fraction_values(layer, shape, None)
        return known
    return _fraction_values(layer, shape, shares_mean)


def _fraction_values(layer, shape, shares_mean):
    if layer.std_center == "own":
        return tuple(1.0 - 1.0 / set_size(shape, s, layer.std_groups) for s in layer.std_sets)
    fraction = deviation_fraction(shape, layer.mean_sets, layer.mean_groups,
                                  None if shares_mean is None else shares_mean.detach())
    return (fraction,) * len(layer.std_sets)


def running_factor(layer):
    """The running statistics' update weight: the momentum, or the count (a tensor) if None."""
    return layer.momentum if layer.momentum is not None else layer.num_batches_tracked


def lerp_buffer(layer, name, value, factor):
    """``buffer ← buffer + factor·(value - buffer)`` outside autograd.

    ``value`` is ``(1, C)``, ``(1, 1)`` or ``(C,)``; a count tensor as ``factor`` means weight
    1/count.
    """
    buffer = layer._buffers[name]
    value = value.detach()
    # a value wider than the buffer (float32 statistics of a float16 layer) is averaged in its
    # own dtype: a float16 variance of 9e4 is inf, a tenth of it is not
    wide = value.dtype if torch.promote_types(value.dtype, buffer.dtype) == value.dtype \
        else buffer.dtype
    if isinstance(factor, torch.Tensor):
        factor = factor.to(wide).reciprocal()
    if wide == buffer.dtype:
        buffer.view(1, -1).lerp_(value.to(wide), factor)
    else:
        buffer.view(1, -1).copy_(buffer.view(1, -1).to(wide).lerp(value, factor))


def update_channel(layer, shape, means, variances, shares_mean, known):
    """Running statistics from the general Function's ``(G, K)`` / ``(G, 1)`` set statistics."""
    factor = layer.momentum
    if factor is None:
        factor = layer.num_batches_tracked.to(known.eps.dtype).reciprocal()
    inverse = known.fractions or tuple(1.0 / f for f in fractions(layer, shape, shares_mean))
    groups = layer._plan.groups
    for values, names, scales in ((means, layer._mean_buffers, None),
                                  (variances, layer._var_buffers, inverse)):
        for k, (value, name) in enumerate(zip(values, names)):
            if name is None:
                continue
            if scales is not None:
                value = value * scales[k]
            # a (G, 1) value broadcasts over the channels of its group in place
            getattr(layer, name).view(groups, -1).lerp_(value, factor)


def constants(layer, x):
    """The extended-std routes' constants for ``x``'s shape and kind, made once and cached."""
    key = (x.shape, x.dtype, x.device, layer.eps, torch.is_inference_mode_enabled())
    known = layer._shapes.get(key)
    if known is None:
        known = Constants.build(layer, x)
        if len(layer._shapes) > 64:
            layer._shapes.clear()
        layer._shapes[key] = known
    return known


def update_extended(layer, mean, var, scale):
    """Running statistics of the extended-std routes.

    Args:
        mean: the mean set's statistic, ``(C,)``, ``(G, K)`` or per group ``(G,)``.
        var: the group variances ``(G,)``.
        scale: Bessel's factor for ``var`` (a 0-d tensor), or None if already applied.
    """
    factor = layer.momentum
    if factor is None:
        factor = layer.num_batches_tracked.to(var.dtype).reciprocal()
    if scale is not None:
        var = var * scale
    groups = layer._plan.groups
    if groups == 1:
        layer.running_var.lerp_(var, factor)
    else:
        layer.running_var.view(groups, -1).lerp_(var.view(groups, 1), factor)
    if mean.numel() == groups and groups > 1:
        layer.running_mean.view(groups, -1).lerp_(mean.view(groups, 1), factor)
    else:
        layer.running_mean.lerp_(mean.view(-1), factor)


def plain_statistics(layer, x, mean_weight, var_weight, use_batch, update):
    """Mean and variance to normalize with, each broadcastable to ``(N, C)``, in plain ops."""
    cells = None
    if use_batch or layer._per_example:
        cells = cell_moments(x, layer._per_example)
    if update and layer.num_batches_tracked is not None:
        with torch.no_grad():
            layer.num_batches_tracked.add_(1)
    return statistics_from_cells(layer, x.shape, cells, mean_weight, var_weight, use_batch, update)


def statistics_from_cells(layer, shape, cells, mean_weight, var_weight, use_batch, update,
                          parts=None):
    """Mean and variance from the cell moments ``(mean, var)``, ``(R, C)`` each, and buffers.

    Differentiable in the cells and the mixture weights; updates the running statistics
    (outside autograd) if ``update``. Returns tensors broadcastable to ``(N, C)``. With a
    ``parts`` list, appends what a closed-form backward needs: the shares of each side
    (softmax, or None), and per set its statistic, whether it came from the cells, and for
    a std set the deviations of the cell means from its centre (None where they are 0 by
    construction, False for running statistics).
    """
    factor = running_factor(layer) if update else None
    # the set whose cells are the cells themselves: its average is the identity
    identity = "instance" if layer._per_example else "batch"
    means, from_cells = [], []
    for pixel_set, name in zip(layer.mean_sets, layer._mean_buffers):
        if name is not None and not use_batch:
            means.append(getattr(layer, name).unsqueeze(0))
            from_cells.append(False)
            continue
        mean = set_average(cells[0], pixel_set, layer.mean_groups)
        if update and name is not None:
            lerp_buffer(layer, name, mean, factor)
        means.append(mean)
        from_cells.append(True)
    shares_mean = None if mean_weight is None else torch.softmax(mean_weight, 0)
    mean = mix(means, shares_mean)
    corrections = fractions(layer, shape, shares_mean) if update else None
    variances, deviations = [], []
    for k, (pixel_set, name) in enumerate(zip(layer.std_sets, layer._var_buffers)):
        if name is not None and not use_batch:
            variances.append(getattr(layer, name).unsqueeze(0))
            deviations.append(False)
            continue
        cell_mean, cell_var = cells
        if pixel_set == identity and (layer.std_center == "own" or mean is cell_mean):
            var, deviation = cell_var, None
        else:
            center = (set_average(cell_mean, pixel_set, layer.std_groups)
                      if layer.std_center == "own" else mean)
            deviation = cell_mean - center
            var = set_average(torch.addcmul(cell_var, deviation, deviation), pixel_set,
                              layer.std_groups)
        if update and name is not None:
            lerp_buffer(layer, name, var / corrections[k], factor)
        variances.append(var)
        deviations.append(deviation)
    shares_var = None if var_weight is None else torch.softmax(var_weight, 0)
    if parts is not None:
        parts += [shares_mean, means, from_cells, shares_var, variances, deviations]
    return mean, mix(variances, shares_var)


def mix(stats, shares):
    """``Σ_k shares[k]·stats[k]`` (broadcasting), or ``stats[0]`` if ``shares`` is None."""
    if shares is None:
        return stats[0]
    parts = shares.unbind()
    total = stats[0] * parts[0]
    for stat, share in zip(stats[1:], parts[1:]):
        total = torch.addcmul(total, stat, share)
    return total


def plain_forward(layer, x, weight, bias, mean_weight, var_weight, use_batch, update):
    """The layer in plain differentiable ops: ``x·scale + shift`` with ``(R, C)`` statistics."""
    mean, var = plain_statistics(layer, x, mean_weight, var_weight, use_batch, update)
    scale = torch.rsqrt(var + layer.eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    trailing = (1,) * (x.dim() - 2)
    scale = scale.expand(-1, layer.num_features).reshape(scale.shape[0], layer.num_features,
                                                         *trailing)
    shift = shift.expand(-1, layer.num_features).reshape(shift.shape[0], layer.num_features,
                                                         *trailing)
    return torch.addcmul(shift, x, scale)
