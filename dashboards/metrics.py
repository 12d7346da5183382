"""The analyses the dashboard draws, looked up in :mod:`statscope.analyses` by name.

The dashboard never computes a fluctuation metric itself. A function the installed analyses do
not provide yet makes its view say so instead of failing the app.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

import numpy as np

from .state import Window

__all__ = ["analysis", "missing", "to_analyses_window", "inclusive"]

# Public name -> the analyses submodule that defines it (used if the package does not export it).
_HOMES = {
    "select_window": "window",
    "fluctuation": "fluctuation",
    "layer_summary": "summary",
    "sampling_baseline": "baseline",
    "excess_fluctuation": "baseline",
    "fluctuation_ci": "ci",
    "claims": "claims",
}


def analysis(name: str) -> Callable | None:
    """The function ``statscope.analyses.<name>``, or ``None`` when this install lacks it."""
    pkg = importlib.import_module("statscope.analyses")
    fn = getattr(pkg, name, None)
    if fn is None and name in _HOMES:
        try:
            fn = getattr(importlib.import_module(f"statscope.analyses.{_HOMES[name]}"), name, None)
        except ImportError:
            fn = None
    return fn


def missing(*names: str) -> list[str]:
    """Which of ``names`` the installed analyses do not provide."""
    return [n for n in names if analysis(n) is None]


def to_analyses_window(window: Window, steps=None):
    """Translate a dashboard :class:`Window` into the ``window`` argument of the analyses.

    The dashboard's ranges are inclusive of their last step; the analyses' ``(start, stop)``
    excludes ``stop``. Given a run's ``steps``, a range is cut to the steps of the run inside
    it, as the other views draw it: a range chosen past a live run's last step (to follow it)
    covers the steps it has so far, where the analyses would refuse it as outside the run. A
    range that holds none of them is left as it is (the analyses say it is outside the run).

    Example:
        >>> to_analyses_window(Window("range", start=10, stop=20)), to_analyses_window(Window())
        ((10, 21), 200)
        >>> to_analyses_window(Window("range", start=10, stop=999), np.arange(300))
        (10, 300)
    """
    if window.kind == "all":
        return "all"
    if window.kind == "last":
        return window.n
    if steps is not None:
        rows = window.rows(np.asarray(steps))
        if rows.stop > rows.start:
            return (int(steps[rows.start]), int(steps[rows.stop - 1]) + 1)
    return (window.start, window.stop + 1)


_WINDOW = re.compile(r"window=\((-?\d+), (-?\d+)\)")
_API_ADVICE = "pass a smaller window or window='all'"
_PAGE_ADVICE = "choose fewer steps under 'last', or 'all'"
_STEPS = re.compile(r"steps \[(-?\d+), (-?\d+)\)")


def inclusive(text: str) -> str:
    """``text`` (an analyses' message or window description) with its half-open step ranges
    written as the dashboard writes them: inclusive of the last step, as in the page's URL
    (the inverse of :func:`to_analyses_window`), and the advice the analyses give a Python
    caller as the page's controls give it.

    Example:
        >>> inclusive("window=(-50, -9): outside run 'a'")
        "window=-50:-10: outside run 'a'"
        >>> inclusive("steps [200, 600)"), inclusive("last 200 steps")
        ('steps 200–599', 'last 200 steps')
        >>> inclusive("window=200 is longer than run 'a'; pass a smaller window or window='all'")
        "window=200 is longer than run 'a'; choose fewer steps under 'last', or 'all'"
    """
    text = text.replace(_API_ADVICE, _PAGE_ADVICE)
    text = _WINDOW.sub(lambda m: f"window={m[1]}:{int(m[2]) - 1}", text)
    return _STEPS.sub(lambda m: f"steps {int(m[1]):,}–{int(m[2]) - 1:,}", text)
