"""The dashboard's view state and its round trip through the URL query string.

Everything a researcher chooses (tab, runs, layer, neurons, statistic, window, scale) lives in
:class:`ViewState`, which is written to and read from the page URL so that a view can be shared or
bookmarked. Parsing is lenient: a value that does not parse falls back to its default, so a stale
or hand-edited link still opens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from urllib.parse import parse_qs, urlencode

import numpy as np

from statscope import schema as S
from statscope.errors import StatscopeError

from .limits import MAX_QUERY_ITEMS

__all__ = ["Window", "ViewState", "TABS", "SCALES", "GROUPINGS", "DEFAULT_WINDOW", "NO_SCALARS",
           "MERGED", "EACH", "parse_rank"]

TABS = ("evolution", "fluctuation", "scatter", "heatmap", "run")
"""Tab identifiers, in display order."""
SCALES = ("raw", "scale_free")
"""Fluctuation scales: the std of a statistic, or the scale-free version from the analyses."""
GROUPINGS = ("neuron", "layer")
"""Fluctuation bars per chosen neuron, or summarised per layer."""


@dataclass(frozen=True)
class Window:
    """A range of training steps.

    Attributes:
        kind: ``"last"`` (the last ``n`` recorded steps), ``"range"`` (steps ``start..stop``,
            inclusive) or ``"all"``.
        n: number of steps for ``"last"``.
        start: first step for ``"range"``.
        stop: last step for ``"range"``.
    """

    kind: str = "last"
    n: int = 200
    start: int | None = None
    stop: int | None = None

    def __post_init__(self):
        if self.kind not in ("last", "range", "all"):
            raise StatscopeError(f"window kind={self.kind!r}: expected 'last', 'range' or 'all'")
        if self.kind == "last" and self.n < 1:
            raise StatscopeError(f"window n={self.n!r}: expected a positive number of steps")
        if self.kind == "range" and (self.start is None or self.stop is None
                                     or self.stop < self.start):
            raise StatscopeError(f"window range={self.start!r}..{self.stop!r}: expected "
                                 "start <= stop")

    @classmethod
    def parse(cls, spec: str | None) -> "Window":
        """Read ``"last:200"``, ``"all"`` or ``"100:5000"`` (a step range, inclusive).

        Raises:
            StatscopeError: ``spec`` is none of these.

        Example:
            >>> Window.parse("100:5000")
            Window(kind='range', n=200, start=100, stop=5000)
        """
        spec = (spec or "").strip().lower()
        try:
            if spec == "all":
                return cls("all")
            if spec.startswith("last:"):
                return cls("last", n=int(spec[5:]))
            a, b = spec.split(":")
            return cls("range", start=int(a), stop=int(b))
        except (ValueError, TypeError):
            raise StatscopeError(f"window={spec!r}: expected 'last:N', 'all' or 'START:STOP'") \
                from None

    def spec(self) -> str:
        """The string :meth:`parse` reads back."""
        if self.kind == "all":
            return "all"
        if self.kind == "last":
            return f"last:{self.n}"
        return f"{self.start}:{self.stop}"

    def rows(self, steps: np.ndarray, zoom: tuple[float, float] | None = None) -> slice:
        """Row slice of ``steps`` ((step,) sorted int) that falls in the window, or in the
        zoomed step range ``zoom = (x0, x1)`` (inclusive) when one is given."""
        if zoom is not None:
            return slice(int(np.searchsorted(steps, zoom[0], "left")),
                         int(np.searchsorted(steps, zoom[1], "right")))
        if self.kind == "all":
            return slice(0, len(steps))
        if self.kind == "last":
            return slice(max(0, len(steps) - self.n), len(steps))
        return slice(int(np.searchsorted(steps, self.start, "left")),
                     int(np.searchsorted(steps, self.stop, "right")))

    def label(self) -> str:
        """A short human description, e.g. ``last 200 steps``."""
        if self.kind == "all":
            return "all steps"
        if self.kind == "last":
            return f"last {self.n:,} steps"
        return f"steps {self.start:,}–{self.stop:,}"


NO_SCALARS = "-"
"""The URL's ``scalar`` value that asks for no logged scalars."""

MERGED = "merged"
"""The rank choice that shows a distributed run's global statistics, merged over its ranks
exactly (what SyncBatchNorm computes; :func:`statscope.ranks.merge_ranks`)."""
EACH = "each"
"""The rank choice that draws every rank beside the merged statistics (evolution curves per
rank; per-rank and global fluctuation with the gap between them)."""


def parse_rank(value: str | int | None) -> str | int:
    """A rank choice from the URL or a selector: :data:`MERGED`, :data:`EACH` or a rank number;
    anything else is :data:`MERGED`.

    Example:
        >>> parse_rank("1"), parse_rank("each"), parse_rank("x"), parse_rank(None)
        (1, 'each', 'merged', 'merged')
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    text = str(value or "").strip().lower()
    if text.isdigit() and text.isascii():
        return int(text)
    return text if text in (MERGED, EACH) else MERGED

DEFAULT_WINDOW = Window()
"""The paper's window: the last 200 training steps."""


@dataclass(frozen=True)
class ViewState:
    """What the researcher has chosen; serialised into the URL.

    Attributes:
        tab: one of :data:`TABS`.
        runs: run names, in panel order (empty: the app picks defaults).
        layer: the layer of the heatmap, or ``None`` for the first.
        neurons: neuron keys ``"<layer>:<unit>"`` (empty: the first neuron of each layer).
        stat: the statistic of the heatmap, one of ``schema.ALL_STATS``.
        window: the steps analysed and shown.
        scale: one of :data:`SCALES`.
        by: one of :data:`GROUPINGS`.
        page: which page of :data:`~statscope.dashboards.limits.RUNS_PER_PAGE` runs is drawn
            (0 is the first).
        scalars: logged scalars drawn above the statistics; ``None`` for the default (every
            scalar the runs logged), ``()`` for none (``scalar=-`` in the URL).
        rank: for distributed runs, :data:`MERGED` (the global statistics), a rank number, or
            :data:`EACH` (every rank beside the merged statistics); single-process runs ignore it.
    """

    tab: str = TABS[0]
    runs: tuple[str, ...] = ()
    layer: str | None = None
    neurons: tuple[str, ...] = ()
    stat: str = S.BN_STD
    window: Window = DEFAULT_WINDOW
    scale: str = "scale_free"
    by: str = "neuron"
    page: int = 0
    scalars: tuple[str, ...] | None = None
    rank: str | int = MERGED

    @classmethod
    def from_query(cls, search: str | None) -> "ViewState":
        """Parse a URL query string (with or without the leading ``?``); bad values default.

        At most :data:`~statscope.dashboards.limits.MAX_QUERY_ITEMS` runs, neurons and scalars
        are read from a link; the rest is ignored.

        Example:
            >>> ViewState.from_query("?tab=scatter&run=bs4&run=bs128").runs
            ('bs4', 'bs128')
        """
        if not isinstance(search, str):  # a forged request: a number, a list, an object
            search = ""
        q = {k: list(dict.fromkeys(v))[:MAX_QUERY_ITEMS] for k, v in
             parse_qs(search.lstrip("?"), keep_blank_values=False).items()}
        one = {k: v[-1] for k, v in q.items()}
        base = cls()
        try:
            window = Window.parse(one["window"]) if "window" in one else base.window
        except StatscopeError:
            window = base.window
        return cls(
            tab=one.get("tab") if one.get("tab") in TABS else base.tab,
            runs=tuple(dict.fromkeys(q.get("run", []))),
            layer=one.get("layer") or None,
            neurons=tuple(dict.fromkeys(q.get("neuron", []))),
            stat=one.get("stat") if one.get("stat") in S.ALL_STATS else base.stat,
            window=window,
            scale=one.get("scale") if one.get("scale") in SCALES else base.scale,
            by=one.get("by") if one.get("by") in GROUPINGS else base.by,
            page=int(one["page"]) - 1 if one.get("page", "").isdigit() and int(one["page"]) else 0,
            scalars=(tuple(v for v in q["scalar"] if v != NO_SCALARS) if "scalar" in q
                     else None),
            rank=parse_rank(one.get("rank")),
        )

    def to_query(self) -> str:
        """The URL query string, with the leading ``?``; defaults are left out."""
        base = ViewState()
        pairs = [("tab", self.tab)] if self.tab != base.tab else []
        pairs += [("run", r) for r in self.runs]
        pairs += [("layer", self.layer)] if self.layer else []
        pairs += [("neuron", n) for n in self.neurons]
        for key in ("stat", "scale", "by"):
            if getattr(self, key) != getattr(base, key):
                pairs.append((key, getattr(self, key)))
        if self.window != base.window:
            pairs.append(("window", self.window.spec()))
        if self.page:
            pairs.append(("page", str(self.page + 1)))
        if self.scalars is not None:
            pairs += [("scalar", s) for s in self.scalars or (NO_SCALARS,)]
        if self.rank != base.rank:
            pairs.append(("rank", str(self.rank)))
        return "?" + urlencode(pairs, safe=":") if pairs else ""

    def replace(self, **changes) -> "ViewState":
        """A copy with ``changes`` applied."""
        return replace(self, **changes)
