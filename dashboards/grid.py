"""Subplot grids as plain plotly dicts: any number of panels, at a cost that does not grow with them.

``plotly.subplots.make_subplots`` refuses a spacing above ``1 / (cols - 1)`` (22 runs at 5% spacing
fail with an HTTP 500) and validates every axis it makes (0.6 s for 34 rows × 6 columns). A
:class:`Grid` computes the domains itself, wraps panels into rows, and returns the layout as a
dict; the figure builders add their traces as dicts too, and :func:`to_wire` turns numpy arrays
into plotly.js typed arrays so that encoding a figure costs a copy, not a float-by-float listing.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Grid", "note", "to_wire", "axis_name"]


def axis_name(kind: str, number: int) -> str:
    """Trace reference of an axis: ``axis_name("x", 1) == "x"``, ``axis_name("y", 3) == "y3"``."""
    return kind if number == 1 else f"{kind}{number}"


@dataclass(frozen=True)
class Grid:
    """Panels (one per run) wrapped into rows of at most ``cols``; each a column of cells.

    Axis number ``panel * len(cells) + cell + 1`` belongs to cell ``cell`` (top to bottom) of
    panel ``panel`` (in reading order). Heights are in pixels, so a figure grows with its rows
    instead of squeezing them.

    Attributes:
        n_panels: panels to place.
        cells: height in px of each cell of a panel, top to bottom.
        cols: panels per row.
        cell_gap: px between the cells of a panel.
        row_gap: px between rows of panels (their step axis, tick labels and the next titles).
        top: px above the first row (figure title, legend, panel titles).
        bottom: px below the last row (tick labels and axis title).
        col_gap: gap between panels as a fraction of the width (shrunk when many panels).
    """

    n_panels: int
    cells: tuple[int, ...]
    cols: int
    cell_gap: int = 16
    row_gap: int = 80
    top: int = 100
    bottom: int = 60
    col_gap: float = 0.035

    @classmethod
    def wrap(cls, n_panels: int, cells: Sequence[int], max_cols: int, **kw) -> "Grid":
        """A grid of ``n_panels`` panels, at most ``max_cols`` side by side."""
        return cls(max(1, n_panels), tuple(int(c) for c in cells) or (300,),
                   max(1, min(max_cols, n_panels)), **kw)

    @property
    def n_cells(self) -> int:
        return len(self.cells)

    @property
    def panel_rows(self) -> int:
        return math.ceil(self.n_panels / self.cols)

    @property
    def panel_height(self) -> int:
        return sum(self.cells) + self.cell_gap * (self.n_cells - 1)

    @property
    def plot_height(self) -> int:
        return self.panel_rows * self.panel_height + (self.panel_rows - 1) * self.row_gap

    @property
    def height(self) -> int:
        """Height of the whole figure in px."""
        return self.top + self.plot_height + self.bottom

    def axis(self, panel: int, cell: int) -> int:
        """The axis number of a cell (1-based, as in ``xaxis3``)."""
        return panel * self.n_cells + cell + 1

    def refs(self, panel: int, cell: int) -> dict[str, str]:
        """``{"xaxis": "x3", "yaxis": "y3"}`` for a trace drawn in that cell."""
        n = self.axis(panel, cell)
        return {"xaxis": axis_name("x", n), "yaxis": axis_name("y", n)}

    def panel_of(self, axis: int) -> int:
        """The panel an axis number belongs to."""
        return (int(axis) - 1) // self.n_cells

    def _x(self, panel: int) -> list[float]:
        gap = self.col_gap if self.cols < 2 else min(self.col_gap, 0.5 / (self.cols - 1))
        width = (1 - gap * (self.cols - 1)) / self.cols
        c = panel % self.cols
        return [c * (width + gap), min(1.0, c * (width + gap) + width)]

    def _y(self, panel: int, cell: int) -> list[float]:
        h = self.plot_height
        top = (panel // self.cols) * (self.panel_height + self.row_gap)
        top += sum(self.cells[:cell]) + self.cell_gap * cell
        return [max(0.0, 1 - (top + self.cells[cell]) / h), min(1.0, 1 - top / h)]

    def layout(self, *, share_x: str = "panel", share_y: str = "cell",
               titles: Sequence[str] = (), x_title: str | None = None,
               y_titles: Sequence[str | None] = (),
               empty: Collection[tuple[int, int]] = ()) -> dict[str, Any]:
        """Axes, panel titles, height and margins of the grid, as a layout dict.

        Args:
            share_x: ``"panel"`` (the cells of a panel share steps; tick labels at its bottom),
                ``"all"`` (every cell shares one x axis) or ``"none"``.
            share_y: ``"cell"`` (the same cell of every panel shares its y axis: rows compare
                across runs), ``"all"``, or ``"none"``.
            titles: one title per panel, drawn above it.
            x_title: title of the x axis under each panel.
            y_titles: title of each cell's y axis, drawn on the first panel of each row.
            empty: ``(panel, cell)`` pairs that hold no data (a note says why). They join no
                shared axis: plotly would count them as the range [-1, 6] in the group's
                autorange, and a group led by one draws nothing.
        """
        empty = set(empty)
        full = [(p, c) for p in range(self.n_panels) for c in range(self.n_cells)
                if (p, c) not in empty]
        # the axis a group's other members match: its first cell that holds data; and in each
        # row of panels, the first panel with data in a cell labels that cell's y ticks
        base: dict[tuple[str, Any], int] = {}
        labelled: dict[tuple[int, int], int] = {}
        bottom = {}  # the cell under which a panel's step axis is labelled: its last with data
        for p, c in full:
            bottom[p] = c
            labelled.setdefault((p // self.cols, c), p)
            base.setdefault(("x", p if share_x == "panel" else None), self.axis(p, c))
            base.setdefault(("y", c if share_y == "cell" else None), self.axis(p, c))
        lay: dict[str, Any] = {"height": self.height, "annotations": [],
                               "margin": {"t": self.top, "b": self.bottom, "r": 20}}
        last = self.n_cells - 1
        for p in range(self.n_panels):
            first_col = p % self.cols == 0
            x = self._x(p)
            for c in range(self.n_cells):
                n = self.axis(p, c)
                xa: dict[str, Any] = {"domain": x, "anchor": axis_name("y", n), "automargin": True}
                ya: dict[str, Any] = {"domain": self._y(p, c), "anchor": axis_name("x", n),
                                      "automargin": True}
                if (p, c) in empty:
                    xa.update(range=[0, 1], showgrid=False, type="linear", ticks="")
                    ya.update(range=[0, 1], showgrid=False, showticklabels=False, type="linear",
                              ticks="")
                    xbase = ybase = n
                else:
                    xbase = (base[("x", p)] if share_x == "panel" else
                             base[("x", None)] if share_x == "all" else n)
                    ybase = (base[("y", c)] if share_y == "cell" else
                             base[("y", None)] if share_y == "all" else n)
                if n != xbase:
                    xa["matches"] = axis_name("x", xbase)
                if c != bottom.get(p, last) and share_x == "panel" or (p, c) in empty:
                    xa["showticklabels"] = False
                elif x_title:
                    xa["title"] = {"text": x_title}
                if n != ybase:
                    ya["matches"] = axis_name("y", ybase)
                if share_y != "none" and p != labelled.get((p // self.cols, c)):
                    ya["showticklabels"] = False
                if first_col and c < len(y_titles) and y_titles[c]:
                    ya["title"] = {"text": y_titles[c]}
                lay[f"xaxis{'' if n == 1 else n}"] = xa
                lay[f"yaxis{'' if n == 1 else n}"] = ya
            if p < len(titles):
                lay["annotations"].append({
                    "text": titles[p], "x": sum(x) / 2, "y": self._y(p, 0)[1],
                    "xref": "paper", "yref": "paper", "xanchor": "center", "yanchor": "bottom",
                    "yshift": 4, "showarrow": False, "font": {"size": 14}})
        return lay

    def note(self, panel: int, cell: int, text: str) -> dict[str, Any]:
        """An annotation centred in a cell: why the cell is empty (see :func:`note`)."""
        n = self.axis(panel, cell)
        return note(text, axis_name("x", n), axis_name("y", n))


def note(text: str, x: str = "x", y: str = "y") -> dict[str, Any]:
    """A grey annotation centred in the cell of axes ``x``/``y`` (e.g. ``"no fc3[0] in this run"``)."""
    return {"text": text, "x": 0.5, "y": 0.5, "xref": f"{x} domain", "yref": f"{y} domain",
            "showarrow": False, "font": {"size": 12, "color": "#8a5a00"},
            "bgcolor": "#fff7e6", "bordercolor": "#E69F00", "borderpad": 4}


_TYPED = {"float32": "f4", "float64": "f8", "int8": "i1", "int16": "i2", "int32": "i4",
          "uint8": "u1", "uint16": "u2", "uint32": "u4"}


def _typed(v: Any) -> Any:
    if not isinstance(v, np.ndarray) or v.dtype.kind not in "biuf" or v.ndim > 2 or not v.size:
        return v.tolist() if isinstance(v, np.ndarray) else v
    if v.dtype.kind == "b":
        v = v.astype(np.uint8)
    elif v.dtype.itemsize == 8 and v.dtype.kind in "iu":
        lo, hi = (int(v.min()), int(v.max()))
        v = v.astype(np.int32) if -2**31 <= lo and hi < 2**31 else v.astype(np.float64)
    if str(v.dtype) not in _TYPED:
        v = v.astype(np.float64)
    out = {"dtype": _TYPED[str(v.dtype)], "bdata": base64.b64encode(np.ascontiguousarray(v))
           .decode("ascii")}
    if v.ndim == 2:
        out["shape"] = f"{v.shape[0]}, {v.shape[1]}"
    return out


def to_wire(fig: Mapping[str, Any]) -> dict[str, Any]:
    """The figure dict with the numeric numpy arrays of its traces as plotly.js typed arrays.

    Dash encodes a plain dict with the JSON encoder, which writes numpy arrays number by number;
    typed arrays (base64 of the raw bytes, as ``plotly.graph_objects`` sends them) are 3-4×
    smaller and 20× faster to encode.
    """
    data = [{k: _typed(v) for k, v in trace.items()} for trace in fig.get("data", [])]
    return {**fig, "data": data}
