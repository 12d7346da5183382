"""The recorder's arguments, checked before anything is attached, and the small conversions
the recorder makes of what a user hands it (logged scalars, probe descriptions)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from statscope import schema as S
from statscope.errors import StatscopeError, StatscopeWarning
from statscope.probes.attach import MECHANISMS
from statscope.probes.selection import Target, norm_info
from statscope.probes.statistics import STATISTICS
from statscope.probes.steps import _caller_level
from statscope.store import ProbeInfo

__all__ = ["STEP_MODES", "positive_int", "check_model", "check_options", "stat_names",
           "warn_scripted", "scalar_of", "probe_info", "running_buffers"]

STEP_MODES = ("auto", "optimizer", "forward", "manual")


def positive_int(name: str, value: Any, least: int = 1) -> int:
    """``value`` when it is an int ≥ ``least``, else a :class:`StatscopeError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise StatscopeError(f"{name}={value!r}: expected an int ≥ {least}")
    return value


def check_model(model: Any) -> None:
    """Refuse what probes cannot record; warn of TorchScript submodules."""
    if not isinstance(model, nn.Module):
        raise StatscopeError(f"model={type(model).__name__}: expected a torch.nn.Module")
    if isinstance(model, torch.jit.ScriptModule):
        raise StatscopeError(
            f"model={type(model).__name__}: a TorchScript module (torch.jit.script or "
            "torch.jit.trace) runs without the Python hooks that probes use; record the "
            "eager model instead")
    warn_scripted(model)


def check_options(*, overwrite: Any, record_eval: Any, step: Any, flush_seconds: Any,
                  mechanism: Any, on_error: Any, meta: Any, mask: Any) -> None:
    """Refuse a bad value of one of :func:`statscope.record`'s plain options."""
    for name, flag in (("overwrite", overwrite), ("record_eval", record_eval)):
        if not isinstance(flag, bool):  # overwrite="no" replaced the run
            raise StatscopeError(f"{name}={flag!r}: expected True or False")
    if step not in STEP_MODES:
        raise StatscopeError(f"step={step!r}: expected one of {STEP_MODES}")
    if isinstance(flush_seconds, bool) or not isinstance(flush_seconds, (int, float)) \
            or not flush_seconds > 0:
        raise StatscopeError(f"flush_seconds={flush_seconds!r}: expected a positive number")
    if mechanism not in MECHANISMS:
        raise StatscopeError(f"mechanism={mechanism!r}: expected one of {MECHANISMS}")
    if on_error not in ("stop", "raise"):
        raise StatscopeError(f"on_error={on_error!r}: expected 'stop' (recording stops, "
                             "training goes on) or 'raise' (the next probe raises)")
    if meta is not None and not isinstance(meta, Mapping):
        raise StatscopeError(f"meta={meta!r}: expected a mapping of names to values, e.g. "
                             "{'lr': 0.1}")
    if mask is not None and not callable(mask):
        raise StatscopeError(f"mask={mask!r}: expected a function (args, kwargs) -> mask of "
                             "the model's forward, e.g. lambda a, kw: kw['attention_mask']; "
                             "or call rec.mask(tensor) at each step")


def stat_names(stats: Any) -> tuple[str, ...]:
    """The statistic names asked for, once each, in order."""
    if isinstance(stats, str) or not isinstance(stats, Iterable):
        raise StatscopeError(f"stats={stats!r}: expected a list of statistic names, e.g. "
                             f"{list(S.DEFAULT_STATS)}")
    names = tuple(dict.fromkeys(stats))
    if not names:
        raise StatscopeError(f"stats=[]: expected at least one of {', '.join(STATISTICS)}")
    return names


def warn_scripted(model: nn.Module) -> None:
    """Say which submodules are TorchScript modules: their layers run without Python hooks, so
    none of them is recorded (nor offered to ``layers=``)."""
    scripted = [name for name, m in model.named_modules()
                if isinstance(m, torch.jit.ScriptModule)]
    outer = [n for n in scripted if not any(n.startswith(o + ".") for o in scripted if o != n)]
    if outer:
        what = "is a TorchScript module" if len(outer) == 1 else "are TorchScript modules"
        warnings.warn(f"statscope: {', '.join(repr(n) for n in outer)} {what} "
                      "(torch.jit.script or trace): the layers inside run without Python hooks "
                      "and are not recorded; record the eager module instead", StatscopeWarning,
                      stacklevel=_caller_level())


def scalar_of(name: str, value: torch.Tensor):
    """What :meth:`Recorder.log` keeps of a one-element tensor: its value now, as a Python
    number on the CPU (``item`` is a read there, not a sync), else a detached 0-d copy on its
    device (one kernel, stream-ordered before any later in-place update), as for tensor
    subclasses too, whose ``item`` may communicate (a DTensor's). Once per step: the common case,
    a float CPU tensor, makes one torch call."""
    plain_cpu = type(value) is torch.Tensor and value.is_cpu
    if plain_cpu:
        try:
            number = value.item()
        except RuntimeError:  # not one element: said below
            number = None
        if type(number) is float:
            return number
    if value.numel() != 1:
        raise StatscopeError(f"log({name}=...): a tensor of shape {tuple(value.shape)}; "
                             "expected one element")
    if value.is_complex():
        raise StatscopeError(f"log({name}=...): a complex tensor ({value.dtype}); log its "
                             "real part or its absolute value")
    if plain_cpu:
        return float(value.item())  # an integer or boolean tensor
    return value.detach().reshape(()).clone()


def probe_info(t: Target, path: str) -> ProbeInfo:
    """What the store keeps of probe ``t`` (``path``: the BatchNorm fast path or the generic one)."""
    return ProbeInfo(name=t.name, module=t.module_name, type=type(t.module).__name__,
                     where=t.where, channel_dim=t.channel_dim, channels=t.channels or 0,
                     groups=t.groups, norm=norm_info(t.module) if t.where == "input" else None,
                     path=path)


def running_buffers(t: Target):
    """The running mean and variance of the layer ``t`` probes at its input, as float64-ready
    copies; ``"lazy"`` before a lazy layer's first forward; None without them."""
    mean, var = getattr(t.module, "running_mean", None), getattr(t.module, "running_var", None)
    if t.where != "input" or not isinstance(mean, torch.Tensor) \
            or not isinstance(var, torch.Tensor):
        return None
    if isinstance(mean, nn.parameter.UninitializedBuffer):
        return "lazy"  # materialized at the first forward, as zeros and ones
    return (mean.detach().float().cpu().numpy().reshape(-1).copy(),
            var.detach().float().cpu().numpy().reshape(-1).copy())
