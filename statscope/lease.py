"""One writer per run: the lease a writer holds while it writes a run store.

The lease lives beside the store, at ``<run>.lease`` (a file or an object), so the store itself
holds only zarr documents. What it guarantees depends on where the store is:

- **Local disk**: an exclusive ``fcntl.flock`` on the lease file, held for the writer's life. The
  kernel releases it when the process ends in any way (``kill -9`` included), so a lease is never
  stale: a second writer is refused while the first lives and succeeds at once after it died. The
  file also holds the holder's host, pid, start time and owner id, for the error message.
- **Object stores** (any fsspec URL but ``file://``): a JSON object with the holder and a
  heartbeat time that the writer renews every ``ttl / 3`` seconds. A lease whose heartbeat is
  older than ``ttl`` is stale and is taken over with a warning; a holder on this host whose pid no
  longer exists is stale at once. Object stores have no compare-and-swap that every backend
  offers, so two writers that take over the same stale lease within the same instant can both
  believe they hold it; each re-reads the lease after writing it and before each renewal, and
  the one that finds another owner stops (its run is marked ``failed``). That window is a few
  milliseconds; outside it the lease is exclusive.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
import warnings
from dataclasses import asdict, dataclass

from statscope.errors import StatscopeError, StatscopeWarning, StoreError, StoreLockedError

__all__ = ["Holder", "Lease", "lease_path", "pid_alive", "read_holder", "writer_state"]

SUFFIX = ".lease"
DEFAULT_TTL = 60.0

_HELD_FDS: set[int] = set()
WRITING_FOR: int | None = None
"""In a writer process (:mod:`statscope.writer_process`), the pid of the training process it
writes for; its leases name it as ``parent``."""
_ENDING_WAIT = 10.0  # seconds to wait for a writer process whose training process died


def close_at_fork(fds: set[int]) -> None:
    """Close the descriptors in ``fds`` (as it is then) in every child this process forks (a
    ``DataLoader`` worker, say), which must not keep them open."""
    def close() -> None:
        for fd in list(fds):
            try:
                os.close(fd)
            except OSError:
                pass
        fds.clear()

    os.register_at_fork(after_in_child=close)


# A forked child shares the lock's open file description; closing its copies lets the lease end
# with the writer's process, not with its longest-lived child.
close_at_fork(_HELD_FDS)


@dataclass(frozen=True)
class Holder:
    """Who holds a lease.

    Attributes:
        host: the holder's host name.
        pid: its process id.
        started: when it took the lease, ISO 8601 UTC.
        owner: a random id of this lease, unique per writer.
        heartbeat: UNIX time of the last renewal (object stores), else the time taken.
        ttl: seconds after the last heartbeat at which the lease is stale (object stores).
        parent: for a writer process, the pid of the training process it writes for.
    """

    host: str
    pid: int
    started: str
    owner: str
    heartbeat: float
    ttl: float
    parent: int | None = None

    def describe(self) -> str:
        if self.parent is not None:
            return (f"pid {self.parent} on {self.host} (its writer process {self.pid}), since "
                    f"{self.started}")
        return f"pid {self.pid} on {self.host}, since {self.started}"

    def ending(self) -> bool:
        """A writer process on this host whose training process is gone: it ends within the
        write in progress (it learns it from its pipe)."""
        return (self.parent is not None and self.host == socket.gethostname()
                and pid_alive(self.pid) and not pid_alive(self.parent))

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Holder | None":
        try:
            return cls(**json.loads(data.decode()))
        except (ValueError, TypeError, UnicodeDecodeError):
            return None  # being written, or not ours: no holder to name


def lease_path(path: str) -> str:
    """Where the lease of the run at ``path`` lives: beside it, as ``<run>.lease``. A local
    path is resolved first, so that a run reached through a symlink (or ``..``) has the one
    lease of the folder it names: two writers by two names would otherwise both get in."""
    if _is_url(path):
        scheme, _, rest = path.partition("://")
        rest = rest.rstrip("/")
        if scheme.lower() in _BUCKETED and (rest.startswith("/") or "/" not in rest):
            # rest.startswith("/"): no bucket at all (``s3:///run``)
            bucket = rest.strip("/").split("/")[0] if not rest.startswith("/") else ""
            example = f"{scheme}://{bucket or 'bucket'}/run"
            raise StatscopeError(f"path={path!r}: a run needs a folder of its own below the "
                                 f"bucket (its lease lives beside it), e.g. {example}")
        return f"{scheme}://{rest}{SUFFIX}"
    return os.path.realpath(path.removeprefix("file://").rstrip("/") or "/") + SUFFIX


_BUCKETED = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"}
"""URL schemes whose first path element is a bucket (a run cannot be a bucket itself)."""


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _now_iso() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _what_to_do(held: Holder | None) -> str:
    """What a StoreLockedError tells the user to do: wait for the other writer or stop it;
    where that writer is this very process, close the recorder it left open."""
    ours = WRITING_FOR if WRITING_FOR is not None else os.getpid()  # the training process
    if held is not None and held.host == socket.gethostname() and ours in (held.pid, held.parent):
        return ("it is this process: a recorder of this run is still open here (a notebook "
                "cell run again?); close it first (statscope.open_recorders() lists them)")
    return "wait for it to finish or stop it first"


def read_holder(path: str) -> Holder | None:
    """The holder recorded in the lease of the run at ``path`` (None when there is none).

    For a local store this names the last holder, whether or not it still holds the lock.
    """
    where = lease_path(path)
    try:
        if _is_url(where):
            from statscope.storage import filesystem

            fs, p = filesystem(where)
            fs.invalidate_cache(p)
            return Holder.from_bytes(fs.cat_file(p)) if fs.exists(p) else None
        with open(where.removeprefix("file://"), "rb") as f:
            return Holder.from_bytes(f.read())
    except FileNotFoundError:
        return None


def writer_state(path: str) -> str:
    """Whether a writer is behind the run at ``path`` now, without touching its lease.

    A reader (the dashboard) asks this of a run whose status says ``running``: a writer killed
    with ``kill -9`` never marks its run ``failed``. The lease is only read, never locked, so
    a writer that starts at that moment is not refused.

    Args:
        path: the run folder or fsspec URL (one store: each rank of a distributed run has its
            own lease).

    Returns:
        ``"live"``: a writer holds the lease (a local holder whose process runs; an
        object-store lease whose heartbeat is fresh). ``"dead"``: the holder is gone (a local
        holder on this host whose process has ended, or a writer process whose training
        process has; an object-store lease that is stale, as :meth:`Lease.acquire` would take
        it over). ``"unknown"``: it cannot be told: no lease (the run was copied here
        without it, or no holder was recorded), a holder on another host (a run synced from
        a cluster), or the lease cannot be read.

    Example:
        >>> writer_state("/no/such/run")
        'unknown'
    """
    try:
        held = read_holder(path)
    except (OSError, StatscopeError):
        return "unknown"
    if held is None:
        return "unknown"
    if _is_url(path):
        return "dead" if _stale(held)[0] else "live"
    if held.host != socket.gethostname():
        return "unknown"
    # a writer process whose training process is gone writes nothing more (Holder.ending)
    alive = pid_alive(held.pid) and not _zombie(held.pid) \
        and (held.parent is None or pid_alive(held.parent))
    return "live" if alive else "dead"


def _zombie(pid: int) -> bool:
    """True for a process that ended and waits to be reaped (it holds no lock any more)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):  # no /proc (macOS), or gone meanwhile
        return False


def _lock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (a zombie counts: see ``writer_state``).

    Another user's process counts as alive. On Windows, which has no signal 0 (``os.kill``
    would end the process), every pid counts as alive: callers fall back on their own rules
    (an age, a heartbeat)."""
    if pid == os.getpid() or os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class Lease:
    """The exclusive right to write one run store; take it with :meth:`acquire`.

    Args: see :meth:`acquire`.
    """

    def __init__(self, path: str, holder: Holder, fd: int | None, fs=None, key: str | None = None):
        self.path = path
        self.holder = holder
        self._fd = fd
        self._fs, self._key = fs, key
        self.released = False

    @classmethod
    def acquire(cls, path: str, *, ttl: float = DEFAULT_TTL) -> "Lease":
        """Take the lease of the run at ``path`` or raise naming who holds it.

        Args:
            path: the run folder or fsspec URL.
            ttl: seconds without a heartbeat after which an object-store lease is stale.

        Raises:
            StoreLockedError: another live writer holds it.
            StoreError: the lease cannot be created (e.g. the folder is not writable).
        """
        holder = Holder(host=socket.gethostname(), pid=os.getpid(), started=_now_iso(),
                        owner=uuid.uuid4().hex, heartbeat=time.time(), ttl=float(ttl),
                        parent=WRITING_FOR)
        if _is_url(path):
            return cls._acquire_object(path, holder)
        return cls._acquire_file(path, holder)

    @classmethod
    def _acquire_file(cls, path: str, holder: Holder) -> "Lease":
        where = lease_path(path)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(where)), exist_ok=True)
            fd = os.open(where, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"path={path!r}: cannot create the run's lease {where!r}: "
                             f"{exc.strerror or exc}") from None
        if not _lock(fd):
            held = read_holder(path)
            if held is not None and held.ending():
                deadline = time.monotonic() + _ENDING_WAIT
                while time.monotonic() < deadline and not _lock(fd):
                    time.sleep(0.02)
        if not _lock(fd):
            os.close(fd)
            held = read_holder(path)
            who = held.describe() if held else "another process"
            raise StoreLockedError(f"path={path!r}: another writer holds this run ({who}); "
                                   f"{_what_to_do(held)}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.to_bytes(), 0)
        _HELD_FDS.add(fd)
        return cls(path, holder, fd)

    @classmethod
    def _acquire_object(cls, path: str, holder: Holder) -> "Lease":
        from statscope.storage import filesystem

        fs, key = filesystem(lease_path(path))
        fs.invalidate_cache(key)
        held = Holder.from_bytes(fs.cat_file(key)) if fs.exists(key) else None
        if held is not None and held.ending():
            deadline = time.monotonic() + _ENDING_WAIT
            while time.monotonic() < deadline and pid_alive(held.pid):
                time.sleep(0.02)
            fs.invalidate_cache(key)
            held = Holder.from_bytes(fs.cat_file(key)) if fs.exists(key) else None
        if held is not None:
            stale, why = _stale(held)
            if not stale:
                raise StoreLockedError(f"path={path!r}: another writer holds this run "
                                       f"({held.describe()}, heartbeat "
                                       f"{time.time() - held.heartbeat:.0f} s ago; stale, and "
                                       f"taken over, once it is {held.ttl:.0f} s old); "
                                       f"{_what_to_do(held)}")
            warnings.warn(f"statscope: path={path!r}: taking over a stale lease of "
                          f"{held.describe()} ({why})", StatscopeWarning, stacklevel=4)
        fs.pipe_file(key, holder.to_bytes())
        lease = cls(path, holder, None, fs, key)
        lease.check()
        return lease

    def check(self) -> None:
        """Raise StoreLockedError if another writer has taken this lease over (object stores)."""
        if self._fs is None or self.released:
            return
        self._fs.invalidate_cache(self._key)
        held = Holder.from_bytes(self._fs.cat_file(self._key)) if self._fs.exists(self._key) \
            else None
        if held is None or held.owner != self.holder.owner:
            who = held.describe() if held else "nobody (the lease was deleted)"
            raise StoreLockedError(f"path={self.path!r}: this writer lost the run's lease to "
                                   f"{who}; it stopped writing")

    def renew(self) -> None:
        """Renew the heartbeat if a third of the ttl has passed (object stores; no-op locally).

        Raises:
            StoreLockedError: another writer took the lease over.
        """
        if self._fs is None or self.released:
            return
        now = time.time()
        if now - self.holder.heartbeat < self.holder.ttl / 3:
            return
        self.check()
        self.holder = Holder(**{**asdict(self.holder), "heartbeat": now})
        self._fs.pipe_file(self._key, self.holder.to_bytes())

    def release(self) -> None:
        """Give the lease up. The local lease file stays (holding the last holder's name)."""
        if self.released:
            return
        self.released = True
        if self._fd is not None:
            _HELD_FDS.discard(self._fd)
            os.close(self._fd)  # closing the descriptor drops the flock
        elif self._fs is not None:
            try:
                held = Holder.from_bytes(self._fs.cat_file(self._key))
                if held is not None and held.owner == self.holder.owner:
                    self._fs.rm_file(self._key)
            except (OSError, FileNotFoundError):
                pass  # nothing to give back

    def __del__(self):
        if not getattr(self, "released", True) and self._fd is not None:
            self.release()


def _stale(held: Holder) -> tuple[bool, str]:
    age = time.time() - held.heartbeat
    if age > held.ttl:
        return True, f"no heartbeat for {age:.0f} s, ttl {held.ttl:.0f} s"
    if held.host == socket.gethostname() and not pid_alive(held.pid):
        return True, f"pid {held.pid} no longer runs on this host"
    return False, ""
