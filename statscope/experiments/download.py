"""Verified downloads: stream into a temporary file, check the md5, then rename atomically.

A download that fails or does not match its checksum leaves nothing behind, so a file that exists
under its final name in the cache has been verified once.

A download that could not reach any mirror is remembered in the folder it was for, in a small
JSON file ``.download-failed`` (when, from which mirrors, why): for :func:`retry_seconds` (a day
unless ``$STATSCOPE_DOWNLOAD_RETRY`` says otherwise; 0 always retries) the same download from the
same mirrors is not tried again, so an offline machine does not wait on the network at every run.
Deleting the file, or a download that succeeds, forgets it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from statscope.errors import StatscopeError
from statscope.lease import pid_alive

__all__ = ["CacheNotWritableError", "ChecksumError", "UnreachableError", "FailedDownload", "download", "md5sum",
           "recent_failure", "remember_failure", "forget_failure", "retry_seconds",
           "FAILED_MARKER", "RETRY_ENV", "RETRY_SECONDS"]

_CHUNK = 1 << 20
FAILED_MARKER = ".download-failed"
"""The file, in the folder a download was for, that remembers its failure."""
RETRY_ENV = "STATSCOPE_DOWNLOAD_RETRY"
"""Seconds after which a failed download is tried again; 0: always."""
RETRY_SECONDS = 86400.0
"""The default of ``$STATSCOPE_DOWNLOAD_RETRY``: one day."""


class UnreachableError(StatscopeError):
    """No mirror could deliver a file (no network, refused, HTTP error); the message lists them.

    Attributes:
        tried: (url, reason) of each mirror tried, in order.
    """

    def __init__(self, message: str, tried: Sequence[tuple[str, str]] = ()):
        super().__init__(message)
        self.tried = tuple(tried)

    def __reduce__(self):  # keep ``tried`` across processes (sweep workers)
        return type(self), (str(self), self.tried)


class CacheNotWritableError(StatscopeError):
    """The folder a download was for cannot be created or written (a read-only cache)."""


class ChecksumError(StatscopeError):
    """A mirror delivered a file whose md5 differs from the expected one; nothing was kept."""


def md5sum(path: str | os.PathLike) -> str:
    """The md5 of a file as 32 lowercase hex digits.

    Example:
        >>> import pathlib, tempfile
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "empty"
        >>> _ = f.write_bytes(b"")
        >>> md5sum(f)
        'd41d8cd98f00b204e9800998ecf8427e'
    """
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(filename: str, md5: str, mirrors: Sequence[str], dest_dir: str | os.PathLike, *,
             quiet: bool = False, timeout: float = 30.0) -> Path:
    """Fetch ``<mirror>/<filename>`` from the first mirror that delivers the expected md5.

    The bytes go to a hidden temporary file in ``dest_dir``, which is renamed to ``filename``
    only after its md5 matched; on any failure the temporary file is removed.

    Args:
        filename: the file name, appended to each mirror's base URL.
        md5: the expected md5, 32 hex digits.
        mirrors: base URLs tried in order (``http://``, ``https://`` or ``file://``).
        dest_dir: the folder the file lands in; created if missing.
        quiet: no progress bar (otherwise tqdm on stderr).
        timeout: seconds to wait for a connection or a read before trying the next mirror. A
            transfer that receives less than 1 KiB in 30 s, or fewer bytes than the server
            announced, also counts as that mirror failing.

    Returns:
        Path of the verified file, ``dest_dir / filename``.

    Raises:
        ChecksumError: some mirror answered but no answer matched ``md5``.
        UnreachableError: no mirror answered; the message lists the URLs and reasons.
        CacheNotWritableError: ``dest_dir`` cannot be created or written.
    """
    dest_dir = Path(dest_dir)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheNotWritableError(f"dest_dir={str(dest_dir)!r}: cannot create "
                                    f"({exc.strerror})") from exc
    unreachable, mismatched = [], []
    for base in mirrors:
        url = f"{base.rstrip('/')}/{filename}"
        try:
            got = _fetch(url, dest_dir, filename, md5.lower(), quiet, timeout)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            if isinstance(exc, StatscopeError):
                raise
            reason = (f"HTTP {exc.code}" if isinstance(exc, urllib.error.HTTPError)
                      else getattr(exc, "reason", None) or exc)
            unreachable.append((url, str(reason)))
            continue
        if got is None:
            return dest_dir / filename
        mismatched.append(f"{url} gave md5 {got}")
    if mismatched:
        raise ChecksumError(f"{filename}: expected md5 {md5}, but " + "; ".join(mismatched)
                            + f"; nothing was written to {str(dest_dir)!r}")
    tried = "; ".join(f"{url} ({reason})" for url, reason in unreachable) or "no mirrors given"
    raise UnreachableError(f"{filename}: could not be downloaded; tried {tried}", unreachable)


class _Stalled(OSError):
    """A mirror that delivers less than :data:`LOW_SPEED_BYTES` in :data:`LOW_SPEED_SECONDS`, or
    fewer bytes than its ``Content-Length``: a failed mirror (the next one is tried)."""


LOW_SPEED_BYTES = 1024
LOW_SPEED_SECONDS = 30.0
"""A transfer that receives fewer than ``LOW_SPEED_BYTES`` over any ``LOW_SPEED_SECONDS`` is
abandoned, as curl's ``--speed-limit``/``--speed-time`` would: a mirror that trickles bytes never
lets a per-read timeout fire."""


def _fetch(url: str, dest_dir: Path, filename: str, md5: str, quiet: bool,
           timeout: float) -> str | None:
    """Download ``url`` to ``dest_dir/filename``; ``None`` on success, else the md5 received."""
    from tqdm.auto import tqdm

    _sweep_parts(dest_dir, filename)
    try:
        # the pid in the name lets a later download remove what a killed one left
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{filename}.{os.getpid()}.",
                                   suffix=_PART)
    except OSError as exc:
        raise CacheNotWritableError(f"dest_dir={str(dest_dir)!r}: cannot write "
                                    f"({exc.strerror})") from exc
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            length = _content_length(resp)
            received = 0
            window_start, window_bytes = time.monotonic(), 0
            with tqdm(total=length, unit="B", unit_scale=True, desc=filename,
                      disable=quiet, leave=False) as bar:
                # read1: whatever has arrived (up to a chunk), so that a slow mirror is seen
                read = getattr(resp, "read1", resp.read)
                for chunk in iter(lambda: read(_CHUNK), b""):
                    digest.update(chunk)
                    _write(out, chunk, dest_dir)
                    bar.update(len(chunk))
                    received += len(chunk)
                    window_bytes += len(chunk)
                    now = time.monotonic()
                    if now - window_start >= LOW_SPEED_SECONDS:
                        if window_bytes < LOW_SPEED_BYTES:
                            raise _Stalled(f"stalled: {window_bytes} bytes in the last "
                                           f"{now - window_start:.0f} s")
                        window_start, window_bytes = now, 0
            if length is not None and received != length:
                raise _Stalled(f"the transfer ended after {received} of {length} bytes")
        if digest.hexdigest() != md5:
            return digest.hexdigest()
        os.replace(tmp, dest_dir / filename)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_PART = ".part"


def _content_length(resp) -> int | None:
    """The length the server announced (``file://`` answers have no ``length`` attribute)."""
    value = resp.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _sweep_parts(dest_dir: Path, filename: str) -> None:
    """Remove the temporary files of ``filename`` that a download killed outright (``kill -9``,
    where no ``finally`` runs) left: those whose process is gone, or, from another machine on a
    shared folder (or an older statscope without a pid in the name), a day old."""
    try:
        parts = list(dest_dir.glob(f".{filename}.*{_PART}"))
    except OSError:
        return
    for part in parts:
        pid_text = part.name[len(filename) + 2:].split(".", 1)[0]
        try:
            stale = (not pid_alive(int(pid_text)) if pid_text.isdigit()
                     else time.time() - part.stat().st_mtime > 86400)
            if stale:
                part.unlink()
        except OSError:
            continue  # gone already, or not ours to remove


def _write(out, chunk: bytes, dest_dir: Path) -> None:
    # A full disk is our problem, not the mirror's: it must not read as "try the next mirror".
    try:
        out.write(chunk)
    except OSError as exc:
        raise CacheNotWritableError(f"dest_dir={str(dest_dir)!r}: cannot write "
                                    f"({exc.strerror})") from exc


@dataclass(frozen=True)
class FailedDownload:
    """A download into a folder that reached no mirror, remembered in that folder.

    Attributes:
        when: UNIX time of the failure.
        mirrors: the base URLs that were tried.
        reason: why, one line (the first mirror's reason).
        path: the marker file.
    """

    when: float
    mirrors: tuple[str, ...]
    reason: str
    path: Path

    def ago(self, now: float | None = None) -> str:
        """How long ago it failed, e.g. ``"3 min ago"``.

        Example:
            >>> FailedDownload(0.0, (), "", Path(".")).ago(now=7500.0)
            '2 h ago'
        """
        age = max(0.0, (time.time() if now is None else now) - self.when)
        for unit, seconds in (("d", 86400), ("h", 3600), ("min", 60)):
            if age >= seconds:
                return f"{int(age // seconds)} {unit} ago"
        return f"{int(age)} s ago"


def retry_seconds() -> float:
    """Seconds a failed download is remembered: ``$STATSCOPE_DOWNLOAD_RETRY``, else a day.

    Raises:
        StatscopeError: the variable is set to something other than a non-negative number.
    """
    text = os.environ.get(RETRY_ENV, "").strip()
    if not text:
        return RETRY_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:
        raise StatscopeError(f"${RETRY_ENV}={text!r}: expected seconds, a non-negative number "
                             "(0: always try the download again)")
    return value


def recent_failure(dest_dir: str | os.PathLike, mirrors: Sequence[str]) -> FailedDownload | None:
    """The failure of a download from ``mirrors`` into ``dest_dir`` within :func:`retry_seconds`,
    None when there is none (or it was from other mirrors, or its marker is unreadable)."""
    ttl = retry_seconds()
    path = Path(dest_dir) / FAILED_MARKER
    try:
        record = json.loads(path.read_text())
        failure = FailedDownload(when=float(record["when"]), mirrors=tuple(record["mirrors"]),
                                 reason=str(record["reason"]), path=path)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if failure.mirrors != tuple(mirrors) or not 0 <= time.time() - failure.when < ttl:
        return None
    return failure


def remember_failure(dest_dir: str | os.PathLike, mirrors: Sequence[str], reason: str) -> None:
    """Write the marker of a failed download into ``dest_dir`` (nothing when it cannot be
    written: remembering is a convenience, never a new error)."""
    dest_dir = Path(dest_dir)
    record = {"when": time.time(), "mirrors": list(mirrors), "reason": reason,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = dest_dir / f"{FAILED_MARKER}.{os.getpid()}.tmp"
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, dest_dir / FAILED_MARKER)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def forget_failure(dest_dir: str | os.PathLike) -> None:
    """Remove the marker of a failed download from ``dest_dir``, if there is one."""
    try:
        (Path(dest_dir) / FAILED_MARKER).unlink(missing_ok=True)
    except OSError:
        pass
