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
    _refuse_malformed_callbacks(app)
    app.catalog = catalog  # type: ignore[attr-defined]  # read by tests and benchmarks
    if warm:
        catalog.spawn(prewarm, catalog)
    return app


def _refuse_malformed_callbacks(app: Dash) -> None:
    """Answer a callback request that names no callback of the app, or does not carry its
    inputs, with HTTP 400: Dash itself fails on it with an HTTP 500 and a traceback in the log.
    (The values inside are the callbacks' to check: any client can post anything.)"""
    from flask import abort, request

    def shaped(items, n: int) -> bool:
        return (isinstance(items, list) and len(items) == n
                and all(isinstance(i, dict) and "id" in i and "property" in i for i in items))

    @app.server.before_request
    def check():
        if request.method != "POST" or not request.path.endswith("/_dash-update-component"):
            return None
        body = request.get_json(silent=True)
        output = body.get("output") if isinstance(body, dict) else None
        spec = app.callback_map.get(output) if isinstance(output, str) else None
        if (spec is None or not shaped(body.get("inputs"), len(spec["inputs"]))
                or not shaped(body.get("state", []), len(spec["state"]))
                or not isinstance(body.get("changedPropIds", []), list)):
            abort(400, description="not a request for one of this dashboard's callbacks with "
                                   "its inputs")
        return None
