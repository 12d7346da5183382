"""Which tensors of a model to probe, and where their channels are.

By default the probes watch the **input of every normalization layer** (BatchNorm*, GroupNorm,
LayerNorm, RMSNorm, InstanceNorm*, SyncBatchNorm and statscope.nn layers, and the LayerNorms and
RMSNorms of other libraries that do not subclass torch's, such as ``LlamaRMSNorm`` and
``T5LayerNorm``); a model without any is probed at the output of each Linear and Conv layer.
The channel dimension follows the layer type: dim 1 for the inputs of
BatchNorm/GroupNorm/InstanceNorm and the outputs of Conv (channels-first, so BatchNorm1d's
``(N, C, L)`` is read right), the last dim for the inputs of LayerNorm/RMSNorm and the outputs
of Linear (so ``(N, L, C)`` sequences are channels-last). A LayerNorm of
``(N, C, H, W)`` images — ``data_format="channels_first"`` (Hugging Face's ConvNeXt), or a forward
of its own in a class that says ``2d``/``3d`` (torchvision's and timm's ``LayerNorm2d``) — is read
at dim 1.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from statscope import schema as S
from statscope.errors import StatscopeError

__all__ = ["Target", "select", "unwrap", "NORM_TYPES"]

_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)
_CHANNEL_FIRST_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                        nn.modules.instancenorm._InstanceNorm)
_CHANNEL_LAST_NORMS = (nn.LayerNorm, nn.RMSNorm)
_CHANNEL_LAST_FORWARDS = tuple(t.forward for t in _CHANNEL_LAST_NORMS)
NORM_TYPES = _CHANNEL_FIRST_NORMS + _CHANNEL_LAST_NORMS
_CONVS = (nn.modules.conv._ConvNd,)


@dataclass(frozen=True)
class Target:
    """One tensor to probe.

    Attributes:
        name: the ``layer`` coordinate value.
        module_name: qualified name in ``named_modules()`` of the unwrapped model.
        module: the module itself.
        where: ``"input"`` or ``"output"``.
        channel_dim: the dimension of the probed tensor that holds channels.
        channels: number of channels when the module says so, else None (read at first forward).
        groups: EN groups for this probe.
        position_sets: the layer normalizes each position over its channels (LayerNorm and
            RMSNorm, also of ``(N, C, H, W)`` images): its per-set statistics take a set per
            position whatever the channel dimension (:mod:`statscope.probes.sets`).
    """

    name: str
    module_name: str
    module: nn.Module
    where: str
    channel_dim: int
    channels: int | None
    groups: int
    position_sets: bool = False


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP/DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.DataParallel) and len(model.device_ids) > 1:
            # its replicas are shallow copies made at every forward: they would share the
            # wrapped forwards, bound to the original module (on device_ids[0])
            raise StatscopeError(
                f"model=DataParallel(device_ids={model.device_ids}): statscope cannot record a "
                "model that DataParallel replicates over several devices at every forward; use "
                "DistributedDataParallel (torchrun), where each rank records its own batch "
                "statistics, or one device")
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_statscope_norm(module: nn.Module) -> bool:
    return type(module).__module__.startswith("statscope.nn")


def is_norm(module: nn.Module) -> bool:
    """True for torch's normalization layers, statscope's own, and other libraries' LayerNorms
    and RMSNorms (:func:`_named_norm`)."""
    return isinstance(module, NORM_TYPES) or _is_statscope_norm(module) or _named_norm(module)


_NAMED_NORM = re.compile(r"(rms|layer)_?norm([23]d)?$", re.IGNORECASE)
_IMAGE_NORM = re.compile(r"[a-z][23]d", re.IGNORECASE)  # LayerNorm2d, LayerNormExp2d, RmsNorm2d


def _named_norm(module: nn.Module) -> bool:
    """A LayerNorm or RMSNorm of another library that does not subclass torch's
    (``LlamaRMSNorm`` and its kin, ``T5LayerNorm``, timm's ``RmsNorm``, SAM's ``LayerNorm2d``):
    told by its class name and a 1-D ``weight`` (its channels) or a ``normalized_shape``."""
    if isinstance(module, NORM_TYPES) or not _NAMED_NORM.search(type(module).__name__):
        return False
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.ndim == 1) \
        or hasattr(module, "normalized_shape")


def _layer_norm_like(module: nn.Module) -> bool:
    """torch's LayerNorm or RMSNorm, or another library's (:func:`_named_norm`): a layer that
    normalizes each position over its channels."""
    return isinstance(module, _CHANNEL_LAST_NORMS) or _named_norm(module)


def _channels_first_layernorm(module: nn.Module) -> bool:
    """A LayerNorm/RMSNorm of ``(N, C, H, W)`` inputs: ``data_format="channels_first"`` (Hugging
    Face's ConvNeXt), or a ``forward`` of its own in a class whose name, or the name of a class
    it derives from, says ``2d``/``3d`` (torchvision's and timm's ``LayerNorm2d`` move the
    channels last, normalize and move them back). Other subclasses keep the channels last
    (CLIP's LayerNorm that computes in float32 overrides ``forward`` too)."""
    if not _layer_norm_like(module):
        return False
    fmt = getattr(module, "data_format", None)
    if isinstance(fmt, str):
        return fmt.lower() == "channels_first"
    if type(module).forward in _CHANNEL_LAST_FORWARDS:
        return False
    # the class or one it derives from: timm's LayerNorm2dNoBias keeps LayerNorm2d's forward
    return any(_IMAGE_NORM.search(c.__name__) for c in type(module).__mro__
               if c not in _CHANNEL_LAST_NORMS)


def _default_channel_dim(module: nn.Module, where: str) -> int | None:
    if where == "input":
        if isinstance(module, _CHANNEL_FIRST_NORMS) or _is_statscope_norm(module) \
                or _channels_first_layernorm(module):
            return 1
        if _layer_norm_like(module):
            return -1
        if isinstance(module, nn.Linear):
            return -1
        if isinstance(module, _CONVS):
            return 1
        return None
    if isinstance(module, _CONVS) or isinstance(module, _CHANNEL_FIRST_NORMS) \
            or _is_statscope_norm(module) or _channels_first_layernorm(module):
        return 1
    if isinstance(module, nn.Linear) or _layer_norm_like(module):
        return -1
    return None


def _known_channels(module: nn.Module, where: str) -> int | None:
    """Channels the module declares, or None when it does not (yet: lazy modules report 0)."""
    return _declared_channels(module, where) or None


def _declared_channels(module: nn.Module, where: str) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features if where == "input" else module.out_features
    if isinstance(module, _CONVS):
        return module.in_channels if where == "input" else module.out_channels
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, _CHANNEL_LAST_NORMS):
        shape = module.normalized_shape
        return int(shape[-1]) if shape else None
    if _named_norm(module):
        weight = getattr(module, "weight", None)
        return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim == 1 \
            else None
    return getattr(module, "num_features", None)


def _match(name: str, module: nn.Module, spec: Any) -> bool:
    if isinstance(spec, type):
        return isinstance(module, spec)
    return name == spec or fnmatch.fnmatchcase(name, spec)


def check_per_layer(value: Any, what: str, chosen) -> None:
    """Raise StatscopeError for a per-layer ``value`` (a mapping of names, globs or types to
    values) with a key that matches none of the ``chosen`` (name, module) pairs: a typo there
    would silently leave the setting off, where ``layers=`` names a missing module."""
    if not isinstance(value, Mapping):
        return
    for spec in value:
        if not isinstance(spec, (str, type)):
            raise StatscopeError(f"{what}={{{spec!r}: ...}}: expected module names, globs or "
                                 f"types as keys")
        if not any(_match(n, m, spec) for n, m in chosen):
            names = ", ".join(dict.fromkeys(n for n, _ in chosen))
            raise StatscopeError(f"{what}={{{spec!r}: ...}}: {spec!r} matches none of the "
                                 f"probed layers: {names}")


def _layer_int(value: Any, what: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise StatscopeError(f"{what}={value!r} for {name!r}: expected an integer")
    return int(value)


def _per_layer(value: Any, name: str, module: nn.Module, default: Any) -> Any:
    if isinstance(value, Mapping):
        for spec, v in value.items():
            if _match(name, module, spec):
                return v
        return default
    return default if value is None else value


def select(model: nn.Module, layers: Any = None, *, where: str | Iterable[str] = "input",
           channel_dim: int | Mapping[Any, int] | None = None,
           en_groups: int | Mapping[Any, int] = 1) -> list[Target]:
    """Choose the tensors to probe.

    Args:
        model: any module (DDP, DataParallel and ``torch.compile`` wrappers are looked through).
        layers: None for the default; else a qualified name, glob (``"features.*"``) or module
            type, or a list of them.
        where: ``"input"``, ``"output"`` or both (``("input", "output")``); with ``layers=None``
            and no norm layers in the model the default is the output of Linear/Conv layers.
        channel_dim: the channel dimension, for all probes or per name/glob/type.
        en_groups: EN groups, for all probes or per name/glob/type (default 1: the whole layer).

    Returns:
        Targets in ``named_modules()`` order; names get ``:in``/``:out`` when a module is probed
        at both ends.

    Raises:
        StatscopeError: a name matches no module (the message lists the available ones), an
            unknown ``where``, or no channel dimension can be told for a selected module.
    """
    root = unwrap(model)
    wheres = (where,) if isinstance(where, str) else tuple(where)
    for w in wheres:
        if w not in ("input", "output"):
            raise StatscopeError(f"where={where!r}: expected 'input', 'output' or both")
    named = [(n, m) for n, m in root.named_modules() if n]
    if layers is None:
        chosen = [(n, m) for n, m in named if is_norm(m)]
        if not chosen:
            chosen = [(n, m) for n, m in named if isinstance(m, (nn.Linear, *_CONVS))]
            if where == "input":
                wheres = ("output",)
    else:
        if isinstance(layers, (str, type)):
            specs = [layers]
        elif isinstance(layers, Iterable):
            specs = list(layers)
        else:
            raise StatscopeError(f"layers={layers!r}: expected a module name, glob or type, or a "
                                 "list of them")
        for spec in specs:
            if not isinstance(spec, (str, type)):
                raise StatscopeError(f"layers={layers!r}: {spec!r} is neither a module name, a "
                                     "glob nor a module type")
            if not any(_match(n, m, spec) for n, m in named):
                available = ", ".join(n for n, _ in named) or "(none)"
                raise StatscopeError(f"layers={spec!r}: no such module; available: {available}")
        chosen = [(n, m) for n, m in named if any(_match(n, m, s) for s in specs)]
    if not chosen:
        raise StatscopeError(f"layers={layers!r}: the model has no module to probe")
    check_per_layer(channel_dim, "channel_dim", chosen)
    check_per_layer(en_groups, "en_groups", chosen)
    targets = []
    for name, module in chosen:
        for w in wheres:
            default = _default_channel_dim(module, w)
            cdim = _per_layer(channel_dim, name, module, default)
            if cdim is None:
                raise StatscopeError(
                    f"channel_dim: cannot tell the channel dimension of the {w} of {name!r} "
                    f"({type(module).__name__}); pass channel_dim={{'{name}': DIM}}")
            cdim = _layer_int(cdim, "channel_dim", name)
            groups = _layer_int(_per_layer(en_groups, name, module, 1), "en_groups", name)
            suffix = (S.INPUT_SUFFIX if w == "input" else S.OUTPUT_SUFFIX) if len(wheres) > 1 else ""
            channels = _known_channels(module, w) if cdim == default else None
            if channels is not None and (groups < 1 or channels % groups):
                raise StatscopeError(f"en_groups={groups} for {name!r}: its {channels} channels "
                                     "are not divisible by it")
            targets.append(Target(name + suffix, name, module, w, int(cdim), channels, groups,
                                  w == "input" and _layer_norm_like(module)))
    return targets


def norm_info(module: nn.Module) -> dict | None:
    """What rebuilding a norm layer's running statistics needs, or None for other modules."""
    if not (isinstance(module, _BATCH_NORMS) or _is_statscope_norm(module)
            or isinstance(module, nn.modules.instancenorm._InstanceNorm)):
        return None
    nbt = getattr(module, "num_batches_tracked", None)
    return {
        "momentum": getattr(module, "momentum", None),
        "eps": getattr(module, "eps", None),
        "track_running_stats": bool(getattr(module, "track_running_stats", False)),
        "num_batches_tracked": int(nbt.item()) if isinstance(nbt, torch.Tensor) else None,
    }
