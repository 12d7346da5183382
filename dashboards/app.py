"""``create_app``: the Dash application over a folder of runs."""

from __future__ import annotations

import os
from pathlib import Path

from dash import Dash

from .callbacks import prewarm, register
from .data import RunCatalog
from .layout import build_layout
from .limits import MAX_REQUEST_BYTES

__all__ = ["create_app"]


def create_app(root: str | os.PathLike | None = None, *, catalog: RunCatalog | None = None,
               warm: bool = True) -> Dash:
    """Build the dashboard over the runs under ``root``.

    Args:
        root: a run folder, or a folder of runs; the app reads nothing outside it.
        catalog: an existing catalog instead of ``root`` (tests, in-memory runs).
        warm: compute the default views' analyses in a background thread at start.

    Returns:
        The ``dash.Dash`` app; ``app.server`` is its WSGI (Flask) application and
        ``app.catalog`` the :class:`~statscope.dashboards.data.RunCatalog`. Serve it with
        :func:`statscope.dashboards.server.bind` (waitress), not ``app.run`` (Flask's
        development server).

    Raises:
        StoreError: ``root`` does not exist.

    Example:
        >>> from statscope.dashboards.server import bind
        >>> app = create_app("runs/")  # doctest: +SKIP
        >>> bind(app, "127.0.0.1", 8050).run()  # doctest: +SKIP
    """
    if catalog is None:
        if root is None:
            raise TypeError("create_app: pass root or catalog")
        catalog = RunCatalog(root)
    # Dash takes update_title=None (keep the title while callbacks run) but annotates it str
    app = Dash(__name__, title="statscope", update_title=None,  # type: ignore[arg-type]
               assets_folder=str(Path(__file__).with_name("assets")),
               suppress_callback_exceptions=False)
    app.server.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.layout = build_layout(str(catalog.root) if catalog.root is not None else "in memory")
    register(app, catalog)
    app.catalog = catalog  # type: ignore[attr-defined]  # read by tests and benchmarks
    if warm:
        catalog.spawn(prewarm, catalog)
    return app
