"""``statscope dashboard PATH``: open the Dash app over a run or a folder of runs."""

from __future__ import annotations

import argparse
import sys

from statscope.errors import StatscopeError

__all__ = ["register", "run_dashboard", "DEFAULT_HOST", "DEFAULT_PORT"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050
_ANY = ("0.0.0.0", "::", "[::]", "")


def register(subparsers) -> None:
    """Add the ``dashboard`` subcommand to ``subparsers`` (from ``add_subparsers``)."""
    p = subparsers.add_parser(
        "dashboard", help="open the dashboard over a run or a folder of runs",
        description="Serve the statscope dashboard over the runs under PATH. It binds "
                    f"{DEFAULT_HOST} unless --host says otherwise and reads nothing outside PATH.")
    p.add_argument("path", metavar="PATH", help="a run folder, or a folder whose sub-folders are runs")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to bind (default {DEFAULT_HOST}; 0.0.0.0 exposes the runs to "
                        "the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port to listen on (default {DEFAULT_PORT})")
    p.add_argument("--no-browser", action="store_true", help="do not open a web browser")
    p.set_defaults(func=run_dashboard)


def run_dashboard(args: argparse.Namespace) -> int:
    """Check PATH, report unreadable runs, and serve the app until interrupted.

    Args:
        args: ``path``, ``host``, ``port`` and ``no_browser`` from the parser.

    Returns:
        0 once the server stops.

    Raises:
        StatscopeError: PATH does not exist, holds no readable run, or the port or host is
            invalid (exit code 2).
        ServeError: the port is in use or not permitted (exit code 1).
    """
    from statscope.commands import check_path_argument, missing_url
    from statscope.storage import is_url, local_path

    check_path_argument(args.path, "PATH")
    # a URL: s3://bucket/sweep; a file:// URL is the local folder it names
    path = args.path if is_url(args.path) else local_path(args.path)
    if not isinstance(path, str) and not path.exists():
        raise StatscopeError(f"PATH={args.path!r}: no such file or directory; expected a run "
                             "folder or a folder of runs")
    if not isinstance(path, str) and not path.is_dir():
        raise StatscopeError(f"PATH={args.path!r}: not a folder; expected a run folder or a "
                             "folder of runs")
    if not 0 <= args.port <= 65535:
        raise StatscopeError(f"--port={args.port}: expected 0..65535")
    import threading

    from statscope.dashboards.app import create_app
    from statscope.dashboards.callbacks import prewarm
    from statscope.dashboards.data import RunCatalog
    from statscope.dashboards.server import bind

    catalog = RunCatalog(path)
    errors = catalog.errors()
    if not catalog.names():
        if isinstance(path, str) and not errors:
            better = missing_url(path, "PATH")
            if better is not None:
                raise better
        detail = "".join(f"\n  {name}: {why}" for name, why in errors.items())
        raise StatscopeError(f"PATH={args.path!r}: no statscope runs found (a run is a folder "
                             f"written by statscope.record){detail}")
    for name, why in errors.items():
        print(f"statscope: warning: skipping run {name!r}: {why}", file=sys.stderr)
    if args.host in _ANY:
        print(f"statscope: warning: --host={args.host!r} serves your runs to every machine that "
              "can reach this one; the dashboard has no authentication", file=sys.stderr)
    app = create_app(catalog=catalog, warm=False)
    server = bind(app, args.host, args.port)  # a port in use fails here, before anything starts
    catalog.spawn(prewarm, catalog)
    url = server.url if args.host not in _ANY else f"http://127.0.0.1:{server.port}/"
    print(f"statscope dashboard: {len(catalog.names())} run(s) under {catalog.root} at {url} "
          "(Ctrl-C stops it)", file=sys.stderr)
    if not args.no_browser:
        import webbrowser

        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    try:
        server.run()
    finally:
        catalog.close()  # let the background prewarm stop between two reads, not mid-read
    return 0
