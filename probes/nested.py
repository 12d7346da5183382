"""Nested tensors (``torch.nested``): the elements a probe records, as a plain tensor.

A layer run on a nested tensor (variable-length sequences without padding, ``layout=torch.jagged``
or the older strided layout) normalizes its real elements only; so does its probe. The
components are flattened to ``(M, C)`` rows of the channel dimension and shaped back to the
nested tensor's number of dims with the channels where they were (``(M, 1, C)`` for a
``(B, j, C)`` input), so a probe's ``channel_dim`` keeps its meaning.
"""

from __future__ import annotations

import torch

from statscope.errors import StatscopeError

__all__ = ["flat_nested"]


def flat_nested(x: torch.Tensor, channel_dim: int, name: str) -> torch.Tensor:
    """The elements of nested ``x`` as a plain tensor of ``x.dim()`` dims: every row of the
    channel dimension along dim 0, the channels at ``channel_dim``, size 1 elsewhere.

    Args:
        x: a nested tensor, batch along dim 0.
        channel_dim: the probe's channel dimension of ``x``.
        name: the probed layer, for the error.

    Raises:
        StatscopeError: ``channel_dim`` is the batch dim or a ragged one.
    """
    n = x.dim()
    c = channel_dim % n if -n <= channel_dim < n else None
    ragged = getattr(x, "_ragged_idx", None)
    if c is None or c == 0 or c == ragged:
        raise StatscopeError(
            f"layers: the nested tensor at {name!r} has {n} dims with a batch dim 0"
            f"{'' if ragged is None else f' and a ragged dim {ragged}'}; channel_dim="
            f"{channel_dim} is not a dim of fixed size: pass channel_dim={{'{name}': DIM}}")
    x = x.detach()
    if x.layout == torch.jagged and ragged == 1:
        parts = [x.values()]  # (sum of lengths, *x.shape[2:]): the components, packed
    else:
        parts = list(x.unbind())
    channels = parts[0].shape[c - 1]
    flat = torch.cat([p.movedim(c - 1, -1).reshape(-1, channels) for p in parts])
    return flat.view(flat.shape[0], *([1] * (n - 2)), channels).movedim(-1, c)
