"""Serving the app: waitress, a production WSGI server, with a thread pool for concurrent pages.

Dash's own ``app.run`` is Flask's development server: it prints a warning on every start and is
not made for several clients. :func:`bind` opens the listening socket first, so a port in use or
a bad host is one clear :class:`~statscope.errors.StatscopeError` before anything else happens;
:meth:`Server.run` then serves until interrupted, and :meth:`Server.stop` ends it from another
thread (tests, notebooks).
"""

from __future__ import annotations

import errno
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from statscope.errors import StatscopeError

from .limits import MAX_REQUEST_BYTES

__all__ = ["ServeError", "Server", "bind", "THREADS"]

THREADS = 8
"""Worker threads: callbacks of several pages run side by side (the column cache is shared)."""


class ServeError(StatscopeError):
    """The server could not start at run time (the port is taken, or not ours to use)."""

    exit_code = 1


@dataclass
class Server:
    """A bound waitress server over one app.

    Attributes:
        host: the address bound.
        port: the port bound (the one the system chose when 0 was asked).
    """

    host: str
    port: int
    _server: Any = field(repr=False)
    _map: dict = field(repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The page's address, e.g. ``http://127.0.0.1:8050/``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def run(self) -> None:
        """Serve until interrupted (Ctrl-C) or :meth:`stop`."""
        self._server.run()

    def start(self) -> "Server":
        """Serve in a daemon thread and return at once."""
        self._thread = threading.Thread(target=self.run, daemon=True, name="statscope-server")
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the socket and every connection, end the workers, and join the thread."""
        from waitress.trigger import trigger

        def close_all():
            for channel in list(self._map.values()):
                channel.close()

        # Sockets are closed by the loop's own thread (the trigger runs a call there): closing
        # them from here would pull them from under its select(). An empty map ends the loop.
        pulls = [c for c in self._map.values() if isinstance(c, trigger)]
        pulled = False
        if pulls and self._thread is not None and self._thread.is_alive():
            try:
                pulls[0].pull_trigger(close_all)
                pulled = True
            except OSError:  # the loop closed its trigger meanwhile (seen once in CI: EBADF)
                pass
        if pulled:
            self._thread.join(timeout)
        else:
            close_all()
            if self._thread is not None:
                self._thread.join(timeout)
        self._server.task_dispatcher.shutdown(timeout=timeout)


def bind(app, host: str, port: int, *, threads: int = THREADS) -> Server:
    """Bind ``host:port`` for ``app`` (a ``dash.Dash``) without serving yet.

    Args:
        app: the app from :func:`statscope.dashboards.create_app`.
        host: the address to bind (``127.0.0.1``, ``0.0.0.0``, ``::``...).
        port: the port; 0 lets the system choose.
        threads: worker threads.

    Returns:
        The :class:`Server`; its ``port`` is the one bound.

    Raises:
        StatscopeError: ``host`` is not an address of this machine (a usage error, exit 2).
        ServeError: the port is in use or not permitted (exit 1).
    """
    from waitress import create_server

    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise StatscopeError(f"--port={port!r}: expected 0..65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError):
        raise StatscopeError(f"--host={host!r}: not a known address; expected an address of "
                             "this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    # The socket is ours, so a failed bind closes it here (waitress would leave it open).
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRNOTAVAIL:
            raise StatscopeError(f"--host={host!r}: not an address of this machine; expected "
                                 "one of its own, e.g. 127.0.0.1 or 0.0.0.0") from None
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(f"--port={port}: already in use on {host}; stop what listens "
                             "there or choose another port with --port") from None
        if exc.errno == errno.EACCES:
            raise ServeError(f"--port={port}: permission denied on {host} (ports below 1024 "
                             "need privileges); choose another port with --port") from None
        raise ServeError(f"--host={host!r} --port={port}: cannot listen ({exc.strerror})") \
            from None
    channels: dict = {}
    server = create_server(app.server, map=channels, sockets=[sock], threads=threads,
                           max_request_body_size=MAX_REQUEST_BYTES, ident="statscope",
                           clear_untrusted_proxy_headers=True)
    return Server(host=host, port=int(sock.getsockname()[1]), _server=server, _map=channels)
