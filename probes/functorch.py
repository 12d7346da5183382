"""Forwards under ``torch.func`` transforms (``grad``, ``vjp``, ``jvp``, ``vmap``, ...).

Inside a transform the model's tensors are functorch wrappers: a ``grad`` or ``jvp`` level wraps
the tensor the layer sees, a ``vmap`` level batches several of them (the members of a model
ensemble, or one sample each for per-sample gradients). A probe cannot copy such a tensor into
its block buffer (functorch refuses to mutate a tensor it did not create) nor hand it to the
C++ kernel (it has no storage of its own), and a reference kept past the transform is dead.

So, decided once per forward of the model (:func:`kind`):

- under ``grad``/``vjp``/``jvp`` levels only (functional training, meta-learning), the probes
  record the tensor the layer normalized: unwrapped through every level (:func:`unwrap`) and
  captured with functorch's dispatch off (:data:`plain`). The values are the layer's own.
- under a ``vmap`` level (or ``functionalize``), a probed tensor holds a batch of forwards that
  each normalize on their own; pooling them would be a statistic no layer computed. Such
  forwards are not recorded, like forwards without autograd, and the recorder says so once.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["level", "kind", "unwrap", "plain"]

_f = getattr(torch._C, "_functorch", None)
level = getattr(_f, "maybe_current_level", None) or (lambda: None)
"""The innermost transform's level, None outside transforms (one C call)."""
_RECORDED = ("Grad", "Jvp")

plain = getattr(torch._C, "_DisableFuncTorch", contextlib.nullcontext)
"""Context manager: torch ops on plain tensors stay plain (functorch's dispatch off)."""


def kind() -> str | None:
    """None outside ``torch.func`` transforms; ``"grad"`` under ``grad``/``vjp``/``jvp`` levels
    only; else the name of the first other level (``"vmap"``, ``"functionalize"``)."""
    if level() is None:
        return None
    for interpreter in _f.get_interpreter_stack() or ():
        name = interpreter.key().name
        if name not in _RECORDED:
            return name.lower()
    return "grad"


def unwrap(t):
    """The plain tensor inside functorch wrappers of ``t`` (``t`` itself if it has none, or is
    not a tensor); None where a level batches it (``vmap``)."""
    if not isinstance(t, torch.Tensor):
        return t
    while _f.is_functorch_wrapped_tensor(t):
        if _f.is_batchedtensor(t):
            return None
        t = _f.get_unwrapped(t)
    return t
