"""Verified downloads: stream into a temporary file, check the md5, then rename atomically.

A download that fails or does not match its checksum leaves nothing behind, so a file that exists
under its final name in the cache has been verified once.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from statscope.errors import StatscopeError

__all__ = ["ChecksumError", "UnreachableError", "download", "md5sum"]

_CHUNK = 1 << 20


class UnreachableError(StatscopeError):
    """No mirror could deliver a file (no network, refused, HTTP error); the message lists them."""


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
        timeout: seconds to wait for a connection or a read before trying the next mirror.

    Returns:
        Path of the verified file, ``dest_dir / filename``.

    Raises:
        ChecksumError: some mirror answered but no answer matched ``md5``.
        UnreachableError: no mirror answered; the message lists the URLs and reasons.
        StatscopeError: ``dest_dir`` cannot be created or written.
    """
    dest_dir = Path(dest_dir)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StatscopeError(f"dest_dir={str(dest_dir)!r}: cannot create ({exc.strerror})") from exc
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
            unreachable.append(f"{url} ({reason})")
            continue
        if got is None:
            return dest_dir / filename
        mismatched.append(f"{url} gave md5 {got}")
    if mismatched:
        raise ChecksumError(f"{filename}: expected md5 {md5}, but " + "; ".join(mismatched)
                            + f"; nothing was written to {str(dest_dir)!r}")
    tried = "; ".join(unreachable) or "no mirrors given"
    raise UnreachableError(f"{filename}: could not be downloaded; tried {tried}")


def _fetch(url: str, dest_dir: Path, filename: str, md5: str, quiet: bool,
           timeout: float) -> str | None:
    """Download ``url`` to ``dest_dir/filename``; ``None`` on success, else the md5 received."""
    from tqdm.auto import tqdm

    try:
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{filename}.", suffix=".part")
    except OSError as exc:
        raise StatscopeError(f"dest_dir={str(dest_dir)!r}: cannot write ({exc.strerror})") from exc
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            with tqdm(total=resp.length, unit="B", unit_scale=True, desc=filename,
                      disable=quiet, leave=False) as bar:
                for chunk in iter(lambda: resp.read(_CHUNK), b""):
                    digest.update(chunk)
                    _write(out, chunk, dest_dir)
                    bar.update(len(chunk))
        if digest.hexdigest() != md5:
            return digest.hexdigest()
        os.replace(tmp, dest_dir / filename)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write(out, chunk: bytes, dest_dir: Path) -> None:
    # A full disk is our problem, not the mirror's: it must not read as "try the next mirror".
    try:
        out.write(chunk)
    except OSError as exc:
        raise StatscopeError(f"dest_dir={str(dest_dir)!r}: cannot write ({exc.strerror})") from exc
