"""Zooming along steps: the step range of a plotly ``relayoutData`` event, remembered with the
view it belongs to (a new view forgets it)."""

from __future__ import annotations

import math
import re
from typing import Any

from dash.exceptions import PreventUpdate

from .selection import view_key
from .state import ViewState

__all__ = ["zoom_range", "zoom_store", "view_zoom"]

_RANGE_KEY = re.compile(r"^xaxis(\d*)\.range(\[0\])?$")
_AUTORANGE_KEY = re.compile(r"^xaxis(\d*)\.autorange$")


def zoom_range(relayout: dict[str, Any] | None) -> tuple[float, float] | None | bool:
    """The step range of a plotly ``relayoutData`` event.

    Returns:
        ``(x0, x1)`` for a zoom or pan along steps, ``None`` for an autoscale (back to the
        window), ``False`` when the event does not concern the step axis.
    """
    if not relayout or not isinstance(relayout, dict):
        return False
    for key, value in relayout.items():
        m = _RANGE_KEY.match(key)
        if m and m.group(2):
            ends = _numbers((value, relayout.get(f"xaxis{m.group(1)}.range[1]")))
        elif m and isinstance(value, (list, tuple)):
            ends = _numbers(value)
        else:
            continue
        if ends is not None:
            return min(ends), max(ends)
    if any(k.startswith("xaxis") and k.endswith(".autorange") for k in relayout):
        return None
    return False


def _numbers(values) -> tuple[float, float] | None:
    """Two finite numbers (a zoom's ends), or ``None``: a forged or partial event carries
    strings, nulls or NaN, which are no zoom."""
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float))
                               for v in values):
        return None
    a, b = float(values[0]), float(values[1])
    return (a, b) if math.isfinite(a) and math.isfinite(b) else None


def zoom_store(relayout, search) -> dict:
    """Remember a zoom together with the view it belongs to; a new view forgets it."""
    rng = zoom_range(relayout)
    if rng is False:
        raise PreventUpdate
    return {"view": view_key(ViewState.from_query(search)),
            "range": None if rng is None else list(rng), "axis": _zoomed_axis(relayout)}


def _zoomed_axis(relayout: dict[str, Any]) -> int:
    """Index of the x axis a relayout event names (``xaxis`` is 1, ``xaxis3`` is 3)."""
    for key in relayout:
        m = _RANGE_KEY.match(key) or _AUTORANGE_KEY.match(key)
        if m:
            return int(m.group(1) or 1)
    return 1


def view_zoom(zoom: dict | None, search: str | None) -> tuple[float, float] | None:
    """The step range of a remembered zoom (:func:`zoom_store`) when it belongs to the view
    ``search`` selects, else None."""
    if not isinstance(zoom, dict) or zoom.get("view") != view_key(ViewState.from_query(search)):
        return None
    rng = zoom.get("range")
    return _numbers(rng) if isinstance(rng, (list, tuple)) else None
