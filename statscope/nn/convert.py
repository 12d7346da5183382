"""Replace every BatchNorm of a model by a norm of this package, like ``convert_sync_batchnorm``."""

import warnings

import torch
from torch import nn

from statscope.errors import StatscopeError, StatscopeWarning
from statscope.nn.factory import make_norm

__all__ = ["convert"]


def convert(model, name, **kw):
    """Replace every ``BatchNorm{1,2,3}d`` and ``SyncBatchNorm`` in ``model`` by ``make_norm(name)``.

    The new layer inherits ``eps``, ``momentum``, ``affine`` and ``track_running_stats`` (``kw``
    overrides them), γ and β (the same Parameters, as ``convert_sync_batchnorm`` keeps them: an
    optimizer made before and ``requires_grad`` still apply; copies where ``kw`` asks for another
    dtype or device), and the running statistics where they map: a batch set takes the
    BatchNorm running mean or variance as it is; an extended set takes their group averages, its
    variance by the law of total variance (see :meth:`HeteroNorm.load_batchnorm_stats`).
    Per-example sets have no running statistics. The new layers do not synchronise across
    processes: replacing a ``SyncBatchNorm`` warns (:class:`StatscopeWarning`) that its
    replacement normalizes each process's own batch.

    Args:
        model: any ``nn.Module``; children are replaced in place, all or none (a layer
            that cannot be converted raises :class:`StatscopeError` and changes nothing).
        name: a name of :data:`statscope.nn.NORM_NAMES`.
        **kw: passed to :func:`statscope.nn.make_norm` (e.g. ``groups=32``).

    Returns:
        nn.Module: ``model``, or its replacement if ``model`` itself is a BatchNorm.

    Example:
        >>> net = convert(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)), "hn")
        >>> type(net[1]).__name__, net[1].std_set
        ('HeteroNorm', 'extended')
    """
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        layer = _replace(model, name, kw, "")
        _warn_unsynced(name, ["the model"] if isinstance(model, nn.SyncBatchNorm) else [])
        return layer
    # every new layer is made before any is set: a layer that cannot be converted (eps = 0,
    # channels that groups do not divide) leaves the model as it was
    found = list(_batchnorms(model, ""))
    replacements = [(parent, child_name, _replace(child, name, kw, qualified))
                    for parent, child_name, child, qualified in found]
    for parent, child_name, layer in replacements:
        setattr(parent, child_name, layer)
    _warn_unsynced(name, [repr(q) for _, _, child, q in found
                          if isinstance(child, nn.SyncBatchNorm)])
    return model


def _warn_unsynced(name, layers):
    """Say which SyncBatchNorm layers lost their cross-process statistics."""
    if layers:
        what = "is a SyncBatchNorm" if len(layers) == 1 else "are SyncBatchNorms"
        warnings.warn(f"convert({name!r}): {', '.join(layers)} {what}; the replacement "
                      "normalizes each process's own batch (statscope.nn layers do not "
                      "synchronise statistics across processes)", StatscopeWarning, stacklevel=3)


def _batchnorms(module, prefix):
    """(parent, name, BatchNorm, qualified name) of each BatchNorm below ``module``, not looking
    inside a BatchNorm."""
    for child_name, child in module.named_children():
        qualified = f"{prefix}.{child_name}" if prefix else child_name
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            yield module, child_name, child, qualified
        else:
            yield from _batchnorms(child, qualified)


def _replace(bn, name, kw, qualified):
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        where = f"layer {qualified!r} " if qualified else "the layer "
        raise StatscopeError(f"convert({name!r}): {where}is a {type(bn).__name__} that has not "
                             f"seen an input yet, so its number of channels is unknown; run one "
                             f"forward of the model before convert (nothing was replaced)")
    reference = bn.weight if bn.weight is not None else bn.running_mean
    options = {"eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine,
               "track_running_stats": bn.track_running_stats}
    if reference is not None:
        options.update(device=reference.device, dtype=reference.dtype)
    options.update(kw)
    try:
        layer = make_norm(name, bn.num_features, **options)
    except StatscopeError as error:
        where = f"layer {qualified!r} " if qualified else ""
        raise StatscopeError(f"convert({name!r}): {where}({type(bn).__name__}({bn.num_features}, "
                             f"eps={bn.eps})): {error}; nothing was replaced (pass the "
                             f"argument to convert to override what the layer has)") from None
    if bn.affine and layer.affine:
        for name_ in ("weight", "bias"):
            theirs, ours = getattr(bn, name_), getattr(layer, name_)
            if (type(theirs) is nn.Parameter and theirs.shape == ours.shape
                    and theirs.dtype == ours.dtype and theirs.device == ours.device):
                # the same Parameter, as convert_sync_batchnorm keeps it: an optimizer made
                # before convert still updates it, and a frozen one stays frozen
                setattr(layer, name_, theirs)
            else:  # another dtype or device asked for: a copy, frozen as the original was
                with torch.no_grad():
                    ours.copy_(theirs)
                ours.requires_grad_(theirs.requires_grad)
    with torch.no_grad():
        if bn.running_mean is not None and bn.running_var is not None:
            layer.load_batchnorm_stats(bn.running_mean, bn.running_var, bn.num_batches_tracked)
    layer.train(bn.training)
    return layer
