"""Two ways to run a probe at a module's input or output: wrapping ``forward``, or hooks.

``"forward"`` (the default) puts a thin wrapper in the module's instance ``forward``. It calls
the probe with the same ``(module, args[, output])`` as a forward hook would, but leaves
``nn.Module.__call__`` on its fast path: registering even an empty forward hook sends every call of
that module through the slow path, which costs ~8 µs a call on CPU — about 5% of the paper's
FC-net step at batch size 4 before any statistic is computed. ``"hooks"`` uses
``register_forward_pre_hook``/``register_forward_hook``, for modules whose ``forward`` cannot be
replaced (TorchScript) or when another library owns it.

A probe that carries ``probe.batchnorm`` (a one-element list of a function, which the recorder
may swap) on the input of an eligible BatchNorm (see :mod:`statscope.probes.fastpath`) replaces
the module's ``forward`` by the BatchNorm fast path, which computes the layer itself and hands
the function in ``probe.batchnorm`` the statistics BatchNorm computed;
it falls back to calling the probe before the module's own ``forward`` for every call it does not
take.
"""

from __future__ import annotations

import sys
import types
import warnings
from typing import Callable

import torch
from torch import nn

from statscope.errors import StatscopeError, StatscopeWarning
from statscope.probes.compiled import forget, observer, reserve
from statscope.probes.fastpath import batchnorm_forward, eligible

__all__ = ["attach", "MECHANISMS"]

MECHANISMS = ("forward", "hooks")


def _eager_only(probe: Callable, module: nn.Module, in_graph: bool) -> Callable:
    """``probe`` as it is in eager mode; what runs under ``torch.compile`` is ``run.compiled``:
    with ``in_graph`` an opaque operator in the graph that calls ``probe`` at run time
    (:mod:`statscope.probes.compiled`), else a graph break that runs it eagerly.

    ``torch.compiler.disable`` alone would do for the second, but its wrapper costs a few µs on
    every eager call. ``run.key`` is the operator's registration (None without ``in_graph``).
    """
    compiled = disabled = torch.compiler.disable(probe)
    key = None
    if in_graph:
        compiled, key = observer(probe, module, disabled)
    compiled = _not_exported(compiled)
    is_compiling = torch.compiler.is_compiling

    def run(*args):
        if is_compiling():
            return compiled(*args)
        return probe(*args)

    run.compiled, run.key = compiled, key  # type: ignore[attr-defined]
    return run


def _not_exported(compiled: Callable) -> Callable:
    """``compiled``, except while ``torch.export`` traces: an exported program holds the model
    alone (no statscope operator, which a program loaded elsewhere could not run)."""
    is_exporting = torch.compiler.is_exporting

    def traced(*args):
        if not is_exporting():
            compiled(*args)

    return traced


class _Handle:
    """A handle that also unregisters the probe's operator key when removed."""

    def __init__(self, inner, key: int | None):
        self.inner, self.key, self.removed = inner, key, False
        reserve(1)

    def remove(self) -> None:
        if self.key is not None:
            forget(self.key)
        self.inner.remove()
        if not self.removed:
            self.removed = True
            reserve(-1)


class _ForwardHandle:
    def __init__(self, module: nn.Module, wrapper: Callable, previous: Callable | None):
        self.module, self.wrapper, self.previous = module, wrapper, previous

    def remove(self) -> None:
        current = self.module.__dict__.get("forward")
        if current is not self.wrapper:
            warnings.warn(f"statscope: the forward of {type(self.module).__name__} was replaced "
                          "after statscope wrapped it; the (now inert) wrapper stays",
                          StatscopeWarning, stacklevel=4)
            return
        if self.previous is None:
            del self.module.__dict__["forward"]
        else:
            self.module.forward = self.previous


def attach(module: nn.Module, probe: Callable, where: str, mechanism: str = "forward",
           with_kwargs: bool = False, on_error: Callable[[], None] | None = None):
    """Call ``probe(module, args)`` before, or ``probe(module, args, output)`` after, a forward.

    Args:
        module: the module to watch.
        probe: the function to call.
        where: ``"input"`` or ``"output"``.
        mechanism: ``"forward"`` or ``"hooks"``.
        with_kwargs: call ``probe(module, args, kwargs)`` before the forward (``where="input"``).
        on_error: called (no arguments) when an eager forward that ``probe`` saw raises
            (``where="input"``); not under ``torch.compile``.

    Under ``torch.compile`` the probe is called as ``probe(module, (x,))`` from inside the
    compiled graph, ``x`` the probed tensor (the first argument or the output;
    :mod:`statscope.probes.compiled`); with ``with_kwargs``, or where the arguments hold no
    tensor, behind a graph break with all its arguments.

    Returns:
        A handle whose ``remove()`` undoes the attachment.
    """
    if mechanism not in MECHANISMS:
        raise StatscopeError(f"mechanism={mechanism!r}: expected one of {MECHANISMS}")
    eager = _eager_only(probe, module, in_graph=not with_kwargs)
    if on_error is not None:
        if where != "input":
            raise StatscopeError(f"attach(where={where!r}, on_error=...): input probes only")
        return _Handle(_attach_guarded(module, probe, eager, mechanism, with_kwargs, on_error),
                       eager.key)
    return _Handle(_attach(module, probe, eager, where, mechanism, with_kwargs), eager.key)


def _attach_guarded(module: nn.Module, probe: Callable, eager: Callable, mechanism: str,
                    with_kwargs: bool, on_error: Callable[[], None]):
    """An input probe that also hears of the module's eager forwards that raise."""
    owner = id(module)
    if mechanism == "hooks":
        pre = _attach(module, probe, eager, "input", mechanism, with_kwargs)
        post = module.register_forward_hook(_RaisedHook(on_error, owner), always_call=True)
        return _Handles(pre, post)
    tracing = torch._C._get_tracing_state
    previous = module.__dict__.get("forward")
    inner = type(module).forward if previous is None else _unbound(previous)
    compiled, is_compiling = eager.compiled, torch.compiler.is_compiling

    def forward(self, *args, **kwargs):
        if id(self) == owner and not tracing():
            if is_compiling():  # the try below is never traced
                if with_kwargs:
                    compiled(self, args, kwargs)
                else:
                    compiled(self, args or tuple(kwargs.values()))
                return inner(self, *args, **kwargs)
            if with_kwargs:
                probe(self, args, kwargs)
            else:
                probe(self, args or tuple(kwargs.values()))
            try:
                return inner(self, *args, **kwargs)
            except BaseException:
                on_error()
                raise
        return inner(self, *args, **kwargs)

    bound = types.MethodType(forward, module)
    module.forward = bound
    return _ForwardHandle(module, bound, previous)


def _attach(module: nn.Module, probe: Callable, eager: Callable, where: str, mechanism: str,
            with_kwargs: bool):
    # A copy of the model (copy.deepcopy: an EMA or averaged model) takes the probes along; they
    # run the copy's own forward and record nothing: only ``module`` itself is probed. An id,
    # not the module: see below. Nor is a forward that torch.jit.trace records probed (the trace
    # would hold the probes' work)
    owner = id(module)
    tracing = torch._C._get_tracing_state
    if mechanism == "hooks":
        hook = _OwnedHook(eager, owner)
        if where == "input":
            return module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
        return module.register_forward_hook(hook)
    previous = module.__dict__.get("forward")
    # The wrappers take the module as ``self`` (bound with MethodType) and call the class's
    # forward unbound, rather than closing over the module and its bound forward: a deep copy of
    # the model then computes with its own parameters, and under torch.compile dynamo, which
    # reaches an object held in a closure also through the model, needs no identity check of
    # each such alias (evaluated in Python at every call of the compiled model)
    inner = type(module).forward if previous is None else _unbound(previous)

    fast = getattr(probe, "batchnorm", None)
    if where == "input" and fast is not None and eligible(module):
        forward = batchnorm_forward(fast, eager, inner, owner)
    elif where == "input" and with_kwargs:
        def forward(self, *args, **kwargs):
            if id(self) == owner and not tracing():
                eager(self, args, kwargs)
            return inner(self, *args, **kwargs)
    elif where == "input":
        # the eager-mode check inline: one Python call less per forward
        compiled, is_compiling = eager.compiled, torch.compiler.is_compiling

        def forward(self, *args, **kwargs):
            if id(self) == owner and not tracing():
                (compiled if is_compiling() else probe)(self, args or tuple(kwargs.values()))
            return inner(self, *args, **kwargs)
    else:
        compiled, is_compiling = eager.compiled, torch.compiler.is_compiling

        def forward(self, *args, **kwargs):
            output = inner(self, *args, **kwargs)
            if id(self) == owner and not tracing():
                (compiled if is_compiling() else probe)(self, args, output)
            return output

    bound = types.MethodType(forward, module)
    module.forward = bound
    return _ForwardHandle(module, bound, previous)


class _OwnedHook:
    """A probe as a forward (pre-)hook of the module whose ``id`` is ``owner``. A copy of the
    module (deep copy, pickle) gets an inert hook in its place."""

    __slots__ = ("probe", "owner")

    def __init__(self, probe: Callable, owner: int):
        self.probe, self.owner = probe, owner

    def __call__(self, module, *args):
        if id(module) == self.owner and not torch._C._get_tracing_state():
            self.probe(module, *args)

    def __reduce__(self):
        return (_InertHook, ())


class _RaisedHook:
    """A forward hook (``always_call=True``) that calls ``on_error()`` when the forward of the
    module whose ``id`` is ``owner`` raised: torch then calls it from its ``except`` block, with
    no output."""

    __slots__ = ("on_error", "owner")

    def __init__(self, on_error: Callable[[], None], owner: int):
        self.on_error, self.owner = on_error, owner

    def __call__(self, module, args, output):
        if torch.compiler.is_compiling():  # torch calls no hook on an exception there
            return
        if output is None and id(module) == self.owner and sys.exc_info()[1] is not None:
            self.on_error()

    def __reduce__(self):
        return (_InertHook, ())


class _Handles:
    def __init__(self, *handles):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _InertHook:
    """What a copied model holds in place of a probe's hook."""

    def __call__(self, *args):
        return None


def _unbound(previous: Callable) -> Callable:
    """A forward already in the instance (another wrapper), called as ``inner(self, ...)``."""
    def inner(_self, *args, **kwargs):
        return previous(*args, **kwargs)

    return inner
