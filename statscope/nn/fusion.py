"""Fold eval-mode norms with fixed statistics into the preceding Linear or Conv layer."""

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from statscope.nn.layers import is_norm_layer

__all__ = ["fuse"]

_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def fuse(model):
    """An eval-mode copy of ``model`` with norms folded into the Linear/Conv layer before them.

    A norm is folded when it directly follows a ``Linear`` or ``Conv{1,2,3}d`` inside an
    ``nn.Sequential`` (at any depth) and its eval-mode output is a fixed per-channel affine map:
    BN, EN, HN, HN_G and (BN, BN+EN) with tracked running statistics, and torch's own
    ``BatchNorm{1,2,3}d``. The folded norm becomes ``nn.Identity``. IN, LN, GN, SN and
    (BN, BN+IN+LN) compute statistics per example at inference and stay. Layers wired together
    in a ``forward`` method rather than a Sequential are not seen (no tracing is done). A layer
    whose weight is computed at each forward (``weight_norm``, ``spectral_norm``, a subclass
    with a ``forward`` of its own, forward hooks) keeps its norm: scaling a weight it recomputes
    would be undone. So does a layer used in more than one place — registered under two names
    (shared by two blocks, or called on its own as well) or tied to another layer's weight or
    bias: scaling it would change its other uses too.

    Args:
        model: any ``nn.Module``; it is not modified.

    Returns:
        nn.Module: a deep copy in eval mode, equal to ``model.eval()`` up to rounding.

    Example:
        >>> from statscope.nn import make_norm
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), make_norm("hn", 8)).eval()
        >>> fuse(net)
        Sequential(
          (0): Linear(in_features=4, out_features=8, bias=True)
          (1): Identity()
        )
    """
    fused = copy.deepcopy(model).eval()
    _fuse_in_place(fused, _shared(fused))
    return fused


def _shared(model):
    """The ids of the modules and parameters that sit in more than one place of ``model``.

    A place is a parent and a name in it; a parent reached twice (a block shared as a whole)
    is one place for its children, whose every use is then followed by the same norm.
    """
    places = {}
    for parent in model.modules():
        for registry in (parent._modules, parent._parameters):
            for name, item in registry.items():
                if item is not None:
                    places.setdefault(id(item), set()).add((id(parent), name))
    return {key for key, where in places.items() if len(where) > 1}


def _inference_affine(norm):
    if is_norm_layer(norm):
        return norm.inference_affine()
    if (isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.running_mean is not None
            and norm.running_var is not None):
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale
        if norm.bias is not None:
            shift = shift + norm.bias
        return scale.detach(), shift.detach()
    return None


def _fuse_in_place(module, shared):
    for child in module.children():
        _fuse_in_place(child, shared)
    if not isinstance(module, nn.Sequential):
        return
    names = list(module._modules)
    for before, after in zip(names, names[1:]):
        layer, norm = module._modules[before], module._modules[after]
        if not _foldable(layer) or not _used_once(layer, shared):
            continue
        affine = _inference_affine(norm)
        if affine is None or affine[0].numel() != layer.weight.shape[0]:
            continue
        _fold(layer, *affine)
        module._modules[after] = nn.Identity()


def _used_once(layer, shared):
    """Whether ``layer``, its weight and its bias each sit in one place of the model only."""
    return not any(id(item) in shared for item in (layer, layer.weight, layer.bias)
                   if item is not None)


def _foldable(layer):
    """Whether ``layer`` computes with its stored ``weight`` and ``bias`` as torch's own
    Linear/Conv does, so that scaling them folds a norm: not a weight computed at each forward
    (a parametrization such as ``weight_norm`` or ``spectral_norm``, or the older hooks, which
    recompute it from other parameters), nor a subclass whose forward transforms it (a
    weight-standardized conv), nor a layer with forward hooks."""
    base = next((b for b in _FOLDABLE if isinstance(layer, b)), None)
    if base is None or type(layer).forward is not base.forward:
        return False
    if base is not nn.Linear and type(layer)._conv_forward is not base._conv_forward:
        return False
    return (type(layer._parameters.get("weight")) is nn.Parameter
            and not parametrize.is_parametrized(layer)
            and not layer._forward_pre_hooks and not layer._forward_hooks)


@torch.no_grad()
def _fold(layer, scale, shift):
    weight = layer.weight
    scale = scale.to(weight)
    view = (-1,) + (1,) * (weight.dim() - 1)
    weight.mul_(scale.reshape(view))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
    new_bias = bias * scale + shift.to(weight)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)
