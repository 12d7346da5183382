"""Per-set statistics and masks: the pixel sets LayerNorm, InstanceNorm and GroupNorm normalize.

BatchNorm normalizes each channel over the batch (the per-channel ``bn_*`` statistics). LayerNorm
normalizes each token (or sample) over its channels, GroupNorm each sample over a group of
channels and the positions, InstanceNorm each sample and channel over the positions. For such
layers statscope records, per step and EN group, how the statistics of those *sets* spread:

- ``set_mean`` and ``set_mean_sd``: the mean over the sets of each set's mean, and its standard
  deviation over the sets (population);
- ``set_std`` and ``set_std_sd``: the same for each set's standard deviation (population, no eps).

A set is, for a channels-last tensor (``(N, C)``, ``(N, L, C)``: the inputs of LayerNorm and
RMSNorm), one position (sample or token) and EN group over the group's channels; for a
channels-first tensor (``(N, C, *)``: GroupNorm, InstanceNorm), one sample and EN group over the
group's channels and every position (``en_groups=C`` gives InstanceNorm's sets). The input of a
LayerNorm or RMSNorm of channels-first images (ConvNeXt's ``LayerNorm2d``) has a set per
position, as the layer normalizes it.

A **mask** (``record(..., mask=...)`` or ``Recorder.mask``), e.g. an attention mask, says which
positions are real: a tensor whose shape is the probed tensor's without its channel dimension
(``(N, L)`` for ``(N, L, C)`` or ``(N, C, L)``), true or 1 where real. Masked positions enter no
statistic of that probe, per-channel or per-set, and ``count`` is the number of real elements per
channel. A probed tensor the mask does not fit is recorded whole. Nothing here syncs with the
device: counts of real elements stay tensors until the writer thread reads them.
"""

from __future__ import annotations

import torch

__all__ = ["mask_weights", "masked_entry", "set_entry"]


def mask_weights(x: torch.Tensor, channel_dim: int, mask) -> torch.Tensor | None:
    """The mask as float weights shaped like ``x`` with its channel dimension of size 1, or None
    when there is no mask or it does not fit ``x``."""
    if mask is None:
        return None
    cd = channel_dim % x.ndim
    rest = x.shape[:cd] + x.shape[cd + 1:]
    if tuple(mask.shape) != tuple(rest):
        return None
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return mask.to(device=x.device, dtype=acc).unsqueeze(cd)


@torch.no_grad()
def masked_entry(x: torch.Tensor, channel_dim: int, w: torch.Tensor, order: int = 2) -> tuple:
    """Per-channel moments over the real elements: ``("wvar", mean, var, n)``, or with
    ``order=4`` ``("wvar4", mean, var, n, m3, m4)``, m3 and m4 the third and fourth central
    moments (for ``bn_kurt``).

    Two passes in float32 (float64 for float64 inputs): the weighted mean, then the weighted
    powers of the centred values, so an offset does not cancel the variance. ``n`` is the
    number of real elements per channel, a (C,) tensor.
    """
    cd = channel_dim % x.ndim
    dims = tuple(d for d in range(x.ndim) if d != cd)
    xf = x.to(w.dtype)
    real = w > 0  # padding may hold anything, inf included: select, never multiply by 0
    n = w.expand_as(xf).sum(dims)
    mean = torch.where(real, xf, 0.0).sum(dims) / n
    shape = [1] * x.ndim
    shape[cd] = -1
    d = torch.where(real, xf - mean.view(shape), 0.0)
    d2 = d.square()
    var = d2.sum(dims) / n
    if order < 4:
        return ("wvar", mean, var, n)
    return ("wvar4", mean, var, n, (d2 * d).sum(dims) / n, d2.square_().sum(dims) / n)


@torch.no_grad()
def set_entry(x: torch.Tensor, channel_dim: int, groups: int, w: torch.Tensor | None,
              per_position: bool = False) -> tuple[torch.Tensor, ...]:
    """Mean and spread over the sets of the sets' means and stds, per EN group: four (G,)
    tensors (see the module docstring for what a set is; ``per_position``: a set per position
    also for channels-first ``x``)."""
    cd = channel_dim % x.ndim
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = x.shape[cd]
    if cd == x.ndim - 1 or per_position:  # each position is a set (per group)
        v = x.movedim(cd, -1).reshape(-1, groups, c // groups).to(acc)  # (P, G, E)
        # (P, 1): a masked position is no set
        wp = None if w is None else w.movedim(cd, -1).reshape(-1, 1)
        ew = None
    else:  # channels first: each sample is a set (per group), over channels and positions
        v = x.movedim(cd, 1).reshape(x.shape[0], groups, -1).to(acc)  # (N, G, E)
        ew = None if w is None else w.movedim(cd, 1).reshape(x.shape[0], 1, -1)
        ew = None if ew is None else ew.expand(-1, c // groups, -1).reshape(x.shape[0], 1, -1)
        wp = None if ew is None else (ew.sum(-1) > 0).to(acc)  # (N, 1)
    if ew is None:
        var, mean = torch.var_mean(v, dim=-1, correction=0)  # (P or N, G)
    else:
        real = ew > 0
        n = ew.sum(-1)
        mean = torch.where(real, v, 0.0).sum(-1) / n
        var = torch.where(real, v - mean.unsqueeze(-1), 0.0).square().sum(-1) / n
    std = var.sqrt()
    return (*_spread(mean, wp), *_spread(std, wp))


def _spread(values: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std over the sets (dim 0), weighted by ``w`` (real sets) if given."""
    if w is None:
        var, mean = torch.var_mean(values, dim=0, correction=0)
        return mean, var.sqrt()
    real = w > 0
    n = w.sum(0)
    mean = torch.where(real, values, 0.0).sum(0) / n
    var = torch.where(real, values - mean, 0.0).square().sum(0) / n
    return mean, var.sqrt()
