"""The writer process's side of :mod:`statscope.writer_process`: a fresh interpreter, started with
``python -c "... serve(fd)"``, that opens the run with a :class:`~statscope.writer.RunWriter`,
computes the rows of each gathered block in numpy (:mod:`statscope.rows`) and writes them, until
the pipe closes. It imports no torch."""

from __future__ import annotations

import pickle
import signal
import warnings
from multiprocessing.connection import Connection

import numpy as np

from statscope import schema as S
from statscope.errors import StatscopeError
from statscope.rows import compute_rows, file_columns
from statscope.writer import RunWriter

__all__ = ["serve"]


def _payload(exc: BaseException):
    """``exc`` as it can cross the pipe: itself when it pickles, else its type name and text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any unpicklable exception travels as text
        return (type(exc).__name__, str(exc))


def serve(fd: int) -> None:
    """The writer process: open the run, then write what comes down the pipe until ``close``.

    It ends when the pipe closes without ``close`` (training ended or was killed), after the
    write in progress: rows not yet written are dropped, as they would be with the thread.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for training, which closes us
    conn = Connection(fd)
    try:
        _, setup, path, layout, kwargs = conn.recv()
    except (EOFError, OSError):
        return
    from statscope import lease, storage

    lease.WRITING_FOR = setup["parent"]
    storage._OPTIONS.update(setup["options"])
    if setup["fsspec"]:
        import fsspec

        fsspec.config.conf.update(setup["fsspec"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            writer = RunWriter(path, layout, **kwargs)
        except BaseException as exc:
            _report(conn, caught)
            conn.send(("error", _payload(exc)))
            return
        try:
            _report(conn, caught)
            conn.send(("ready", writer.layout, writer.next_step, dict(writer.nonfinite)))
            _loop(conn, writer, caught)
        except (BrokenPipeError, ConnectionResetError):
            return  # training is gone


def _report(conn, caught: list) -> None:
    """Send the warnings caught so far, for the writer thread to warn."""
    for w in caught:
        conn.send(("warn", str(w.message), w.category))
    caught.clear()


def _loop(conn, writer: RunWriter, caught: list) -> None:
    failed: str | None = None  # the error that stopped writing
    tick = min(1.0, max(0.01, writer.flush_seconds / 4))
    with np.errstate(all="ignore"):
        while True:
            try:
                msg = conn.recv() if conn.poll(tick) else None
            except (EOFError, OSError):
                return  # training ended without close (killed): write nothing more
            try:
                if msg is None:
                    if failed is None:
                        writer.heartbeat()
                        if writer.flush_due():
                            writer.flush()
                elif msg[0] == "close":
                    _close(conn, writer, msg[1], msg[2], failed, caught)
                    return
                elif failed is None:
                    _handle(conn, writer, msg)
            except BaseException as exc:
                failed = f"writer: {exc!r}"
                _report(conn, caught)
                conn.send(("error", _payload(exc)))
            _report(conn, caught)


def _handle(conn, writer: RunWriter, msg) -> None:
    kind = msg[0]
    if kind == "gathered":
        rows = compute_rows(msg[1])
        conn.send(("advice", rows.advice))  # before the write: the probes act on it sooner
        steps, count, stats = file_columns(rows, msg[2], writer.layout)
        bad = writer.append(steps, count, stats, rows.scalars)
        conn.send(("filed", bad, dict(writer.nonfinite)))
    elif kind == "append":
        writer.append(*msg[1:])
    elif kind == "amend":
        writer.amend_scalars(msg[1])
    elif kind == "add":
        writer.add_probes(msg[1], msg[2])
        conn.send(("added", writer.layout))
    elif kind == "attrs":
        writer.set_attrs(**msg[1])
    elif kind == "flush":
        writer.flush()
        conn.send(("flushed",))
    else:
        raise StatscopeError(f"writer process: unknown message {kind!r}")


def _close(conn, writer: RunWriter, status: str, error: str | None, failed: str | None,
           caught: list) -> None:
    if failed is not None:
        status, error = S.STATUS_FAILED, error or failed
    try:
        writer.close(status, error)
    except BaseException as exc:
        _report(conn, caught)
        conn.send(("error", _payload(exc)))
        return
    _report(conn, caught)
    conn.send(("closed",))
