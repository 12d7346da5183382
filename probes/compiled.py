"""The probes under ``torch.compile``: one opaque operator call in the graph, not a graph break.

A probe is Python that reads the recorder's state at run time (the step's row, whether the
recorder is on, the module's mode) and keeps references to tensors: dynamo cannot trace it.
Run behind ``torch.compiler.disable``, every probed layer breaks the graph in two, in the forward
and in the backward that AOTAutograd derives from it. On a small BatchNorm ResNet compiled with
inductor that cost 2.0× the compiled plain model's step, mostly in the fusions the breaks split
(docs/performance.md).

Here the compiled graph instead calls the operator ``statscope::observe(sink, x, key)``, which
dynamo, AOTAutograd and inductor treat as opaque: at run time it calls the probe registered
under ``key`` with the real tensor ``x``, exactly as the eager forward would. The operator says
it writes ``sink`` (a one-element tensor that nothing reads) so that no compiler drops a call
whose result is unused, and carries the ``cudagraph_unsafe`` tag, so that a CUDA graph never
captures a call whose Python must run at every replay.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from typing import Callable

import torch
from torch import nn

from statscope.rows import FLOAT32_MEAN_RATIO

__all__ = ["observer", "forget", "reserve", "in_graph"]

# key -> (probe, module); a probe is registered while it is attached (see attach.attach)
_PROBES: dict[int, tuple[Callable, nn.Module]] = {}
_RUNNING = [0]  # probes the operator is running now (a compiled graph calls them)
_KEYS = itertools.count()


_LIBRARY = None  # torch.library.Library("statscope", "DEF"), kept while the process lives
# The operator and its sink, set by _operator(). Globals, not closure cells of each probe's
# traced function: dynamo guards a global once per graph, while one object reached through the
# closures of several probes gets an identity guard per probe, evaluated in Python at every call
_OP = _SINK = None


@functools.cache
def _operator() -> None:
    """``torch.ops.statscope.observe`` and its sink, defined on first use (never while dynamo
    traces: an attached probe defines it when it is attached).

    Defined with ``torch.library.Library`` rather than ``torch.library.custom_op``: a call of
    the same operator through ``custom_op``'s Python layers measured 18 µs, this one 1.7 µs.
    """
    global _LIBRARY
    _LIBRARY = lib = torch.library.Library("statscope", "DEF")
    lib.define("observe(Tensor(a!) sink, Tensor x, Tensor? packed, int key) -> ()",
               tags=(torch.Tag.cudagraph_unsafe,))

    def observe(sink, x, packed, key):
        found = _PROBES.get(key)
        if found is None:
            return
        probe, module = found
        _RUNNING[0] += 1
        try:
            if packed is None:
                probe(module, (x,))
            else:
                # copied: the compiler owns its buffers and reuses them once the graph is done
                # with them, while the block keeps its entries until the writer files them. On
                # the CPU through numpy, not a torch op: each torch op lets another thread take
                # the GIL, and this thread waits for it back
                own = torch.from_numpy(packed.numpy().copy()) if packed.is_cpu \
                    else packed.clone()
                probe.moments(module, x, own)
        finally:
            _RUNNING[0] -= 1

    lib.impl("observe", observe, "CompositeExplicitAutograd")
    torch.library.register_fake("statscope::observe", lambda sink, x, packed, key: None,
                                lib=lib)
    global _OP, _SINK
    _OP, _SINK = torch.ops.statscope.observe.default, torch.zeros(1)


def in_graph() -> bool:
    """Whether a compiled graph runs the probe now (it runs without autograd, whatever the
    mode it was traced in)."""
    return _RUNNING[0] > 0


def observer(probe: Callable, module: nn.Module, fallback: Callable) -> tuple[Callable, int]:
    """What runs in place of ``probe`` while dynamo traces ``module``'s forward.

    A probe that carries ``probe.moments`` and ``probe.channel_dim`` gets the probed tensor's
    per-channel moments computed in the graph, in float32 (float64 for float64 tensors), packed
    in one tensor: ``probe.moments(module, x, packed)`` at run time (the entry kinds ``"mv"``
    and ``"shifted"`` of :mod:`statscope.probes.reduce`). On the CPU, ``packed`` is the mean,
    the biased variance and a flag, (2C + 1,): the reduction is the one a BatchNorm makes of its
    input, which the compiler fuses with the layer's own, and the flag says where a channel's
    offset could cost the float32 mean more than 5e-5 of its std
    (:data:`statscope.rows.FLOAT32_MEAN_RATIO`): the probe then reduces ``x`` itself. On a GPU
    it is ``x0``, the mean and the variance of ``x − x0``, (3C,), ``x0`` each channel's first
    element: a shift, so that a large offset loses nothing to float32 (without it, an offset of
    1000 σ cost inductor's mean 2e-3 σ and its std 5e-5 of itself). Any other probe gets
    ``probe(module, (x,))``, or ``probe.by_grad_mode[mode](module, (x,))`` where it has that
    dict, ``mode`` the grad mode dynamo traced in (a compiled graph runs without autograd, so
    the probe cannot ask at run time).

    Args:
        probe: the probe; ``x`` is the probed tensor, detached.
        module: the probed module.
        fallback: called with the probe's own arguments where they hold no tensor to observe
            (a graph break, see :func:`statscope.probes.attach.attach`).

    Returns:
        ``(traced, key)``: ``traced(module, args[, output])`` picks the probed tensor (the output
        where given, else the first argument) and calls the operator on it; ``key`` unregisters
        the probe (:func:`forget`).
    """
    _operator()
    key = next(_KEYS)
    by_grad_mode = getattr(probe, "by_grad_mode", None)
    if by_grad_mode is None:
        _PROBES[key] = (probe, module)
    else:  # -key: the graph dynamo traced with grad off
        _PROBES[key], _PROBES[-key] = (by_grad_mode[True], module), (by_grad_mode[False], module)
    channel_dim = getattr(probe, "channel_dim", None) if hasattr(probe, "moments") else None

    def traced(module, args, output=None):
        x = output if output is not None else (args[0] if args else None)
        if not isinstance(x, torch.Tensor):
            fallback(module, args) if output is None else fallback(module, args, output)
            return
        x = x.detach()
        if (channel_dim is None or x.ndim < 2 or not -x.ndim <= channel_dim < x.ndim
                or x.numel() == 0):
            # the probe reports a bad channel dim itself
            _OP(_SINK, x, None, key if by_grad_mode is None or torch.is_grad_enabled() else -key)
            return
        cd = channel_dim % x.ndim
        dims = [d for d in range(x.ndim) if d != cd]
        u = x if x.dtype == torch.float64 else x.float()
        if x.is_cpu:  # the same reduction as a BatchNorm's own, which the compiler fuses
            var, mean = torch.var_mean(u, dims, correction=0)
            per_channel = x.numel() // x.shape[cd]
            far = (mean.abs() * math.sqrt(per_channel) > FLOAT32_MEAN_RATIO * var.sqrt()).any()
            _OP(_SINK, x, torch.cat([mean, var, far.to(mean.dtype).view(1)]), key)
            return
        x0 = u
        for d in reversed(dims):
            x0 = x0.select(d, 0)
        var, mean = torch.var_mean(u - x0.view([-1 if d == cd else 1 for d in range(x.ndim)]),
                                   dims, correction=0)
        _OP(_SINK, x, torch.cat([x0, mean, var]), key)

    return traced, key


_RESERVED = [0]  # how far reserve() has raised dynamo's recompile limit
_RESERVE_LOCK = threading.Lock()


def reserve(delta: int) -> None:
    """Raise (or lower, with a negative ``delta``) dynamo's per-frame recompile limit by the
    number of attached probes.

    Each probe's call in a graph names its module (the operator's key and the wrapper's
    closure), so a frame that runs many probed modules of one class gets a graph per module
    where the plain model shares one: a block's forward resumed after a graph break, say. Past
    dynamo's limit (8 per frame) the rest would run uncompiled, with a warning. Changes the
    user makes to the limit meanwhile are kept: only statscope's share moves.
    """
    import torch._dynamo.config as config

    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with _RESERVE_LOCK:
        base = getattr(config, name) - _RESERVED[0]
        _RESERVED[0] = max(_RESERVED[0] + delta, 0)
        setattr(config, name, base + _RESERVED[0])


def forget(key: int) -> None:
    """Unregister the probe :func:`observer` registered under ``key``; its calls do nothing."""
    _PROBES.pop(key, None)
    _PROBES.pop(-key, None)
