"""Normalization layers of Heterologous Normalization (paper §3, Table 1, §4.5) for PyTorch.

Mean and std each come from a pixel set — "batch" (BN), "instance" (IN), "layer" (LN),
"group" (GN) or "extended" (EN) — or a softmax-weighted mix of several (SN). Importing this
package imports torch; ``import statscope`` does not.

Example:
    >>> import torch, statscope.nn
    >>> layer = statscope.nn.make_norm("hn", 16)
    >>> layer(torch.randn(8, 16, 4, 4)).shape
    torch.Size([8, 16, 4, 4])
"""

from statscope.nn.convert import convert
from statscope.nn.factory import NORM_NAMES, make_norm
from statscope.nn.fusion import fuse
from statscope.nn.layers import HeteroNorm, SwitchableNorm, is_norm_layer
from statscope.nn.moments import PIXEL_SETS

__all__ = ["HeteroNorm", "SwitchableNorm", "make_norm", "NORM_NAMES", "PIXEL_SETS", "convert",
           "fuse", "is_norm_layer"]
