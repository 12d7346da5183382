"""``--scheduler`` / ``--workers``: the dask.distributed cluster that ``statscope analyze`` and
``statscope report`` run their analyses on (connecting, a local cluster, Ctrl-C)."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

__all__ = ["add_cluster_arguments", "scheduler_of"]


def add_cluster_arguments(p) -> None:
    """``--scheduler ADDRESS`` / ``--workers N``: run the analyses on a dask.distributed cluster."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="run the analyses as dask tasks on this dask.distributed scheduler "
                        "(e.g. tcp://10.0.0.5:8786); its workers must see the runs at the "
                        "same paths")
    g.add_argument("--workers", type=int, metavar="N",
                   help="start a local dask.distributed cluster of N worker processes for the "
                        "analyses")


@contextmanager
def scheduler_of(args):
    """The dask scheduler the analyses run on: None (this process), or a ``distributed.Client``
    of ``--scheduler`` or of a local cluster of ``--workers`` processes, closed on exit. The
    local cluster's processes leave Ctrl-C to this one, whose ``KeyboardInterrupt`` closes them
    without a traceback."""
    import logging

    from statscope.errors import StatscopeError

    address, workers = getattr(args, "scheduler", None), getattr(args, "workers", None)
    if address is None and workers is None:
        yield None
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise StatscopeError(f"--scheduler/--workers: need dask.distributed ({exc}); pip "
                             f"install 'statscope[dask]'") from None
    if address is not None:
        # dask logs a lost scheduler as tracebacks at ERROR; the command says it in one line
        with _dask_logs_at(logging.CRITICAL), _connect(Client, address) as client:
            yield client
        return
    if workers < 1:
        raise StatscopeError(f"--workers {workers}: expected at least 1")
    quiet = ExitStack()
    with quiet, ExitStack() as stack:
        with _ctrl_c_held():
            # The scheduler's HTTP server takes port 8787 unless told otherwise, and warns when
            # that is taken (another cluster on the machine): a free port instead.
            cluster = stack.enter_context(LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                silence_logs=logging.ERROR))
            client = stack.enter_context(Client(cluster, set_as_default=False))
        try:
            yield client
        except BaseException:
            # Closed in the middle of its tasks (Ctrl-C), the scheduler can log at CRITICAL,
            # with a traceback, a cancellation it could not tell the client that left first;
            # the command says in one line why it stopped.
            quiet.enter_context(_dask_logs_at(logging.CRITICAL + 1))
            raise


@contextmanager
def _dask_logs_at(level: int):
    """Inside, dask.distributed's loggers in this process log at ``level`` and above only."""
    import logging

    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == "distributed" or name.startswith("distributed.")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextmanager
def _ctrl_c_held():
    """Inside, SIGINT is blocked in this thread, and so in every thread and process started
    from it: a local cluster's event loop, its worker processes (also those it restarts) and
    their children. The terminal sends Ctrl-C to its whole process group; this process's
    ``KeyboardInterrupt`` closes the cluster, which stops the workers and their tasks, whereas
    a worker process that took the Ctrl-C would die printing tracebacks. A Ctrl-C that came
    inside is delivered here on exit, none is lost. (A mask rather than ``SIG_IGN``: that would
    drop a Ctrl-C during the cluster's start.)"""
    import signal
    from multiprocessing import resource_tracker

    if not hasattr(signal, "pthread_sigmask"):  # Windows has no signal masks
        yield
        return
    # Started now if it is not yet: the first spawned process starts it, and it blocks SIGINT
    # while it starts and then unblocks it, which in the cluster's event loop would undo ours.
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _connect(Client, address: str):
    """A ``Client`` of the scheduler at ``address``, or a :class:`StatscopeError` within dask's
    connect timeout (``distributed.comm.timeouts.connect``) plus a grace.

    The address is checked before any client is made (a half-made one waits out the timeout
    again in its ``__del__``), and the connection is made on a daemon thread with a deadline:
    a port where something else listens (the cluster's dashboard, a web server) never completes
    dask's handshake, and ``Client``'s own timeout does not end that wait.
    """
    import threading

    import dask
    from dask.utils import parse_timedelta
    from distributed.comm import resolve_address

    from statscope.errors import StatscopeError
    from statscope.storage import first_line

    try:
        resolve_address(address)
    except ValueError as exc:  # an unknown scheme, a malformed address, no port
        raise StatscopeError(f"--scheduler {address}: {exc}") from None
    timeout = float(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s"))
    box: dict = {}

    def connect() -> None:
        try:
            box["client"] = Client(address, set_as_default=False, timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = exc

    thread = threading.Thread(target=connect, daemon=True, name="statscope-connect")
    thread.start()
    thread.join(timeout + _CONNECT_GRACE)
    if thread.is_alive():
        raise StatscopeError(f"--scheduler {address}: no dask scheduler answered within "
                             f"{timeout + _CONNECT_GRACE:.0f} s (something listens there, but "
                             f"not a scheduler: its dashboard's port?)")
    error = box.get("error")
    if isinstance(error, ValueError):
        raise StatscopeError(f"--scheduler {address}: {error}") from None
    if isinstance(error, (OSError, TimeoutError)):
        raise StatscopeError(f"--scheduler {address}: cannot connect ({error})") from None
    if error is not None:
        raise StatscopeError(f"--scheduler {address}: cannot connect "
                             f"({first_line(error)})") from None
    return box["client"]


_CONNECT_GRACE = 10.0
"""Seconds beyond dask's connect timeout that a connection may take (its handshake)."""
