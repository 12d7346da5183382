"""Where a run lives: a local folder or an fsspec URL, and the few file operations statscope needs.

Every other module goes through these functions to tell URLs from paths, list a run's objects,
and remove a run, so local and object stores behave alike.

Object stores are reached through fsspec, which takes credentials and endpoints from the usual
places (``AWS_*`` environment variables and ``~/.aws`` for s3fs, ``FSSPEC_S3_ENDPOINT_URL``,
``fsspec.config``). ``storage_options=`` given to ``record``/``open_run``/... is registered here
for the URL's prefix and applies to every later access under it in this process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from statscope.errors import StatscopeError, StoreError

__all__ = ["is_url", "local_path", "zarr_store", "exists", "list_keys", "remove_tree",
           "remove_partials", "use_options", "filesystem", "store_errors", "client_error",
           "first_line", "unusable", "is_unusable"]

_OPTIONS: dict[str, dict] = {}  # URL prefix -> fsspec storage options


def is_url(path: str) -> bool:
    """True for an fsspec URL other than ``file://`` (``s3://``, ``memory://``, ...)."""
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> Path:
    """A local path or ``file://`` URL as a Path."""
    return Path(path.removeprefix("file://"))


# packages whose exceptions say that an object store cannot be used as asked (credentials,
# endpoint, bucket, network): they leave the store's client, never statscope's own code
_CLIENT_PACKAGES = {"botocore", "aiobotocore", "boto3", "s3fs", "aiohttp", "gcsfs", "google",
                    "adlfs", "azure", "fsspec", "urllib3", "requests"}


@contextlib.contextmanager
def store_errors(path):
    """Inside, what an object store's client raises for the URL ``path`` (no credentials, a
    missing bucket, an endpoint nobody answers at, a misspelt storage option) becomes a
    :class:`StoreError` that names ``path`` and what to check; local paths are left alone."""
    path = os.fspath(path)
    if not is_url(path):
        yield
        return
    try:
        yield
    except StatscopeError:
        raise
    except Exception as exc:  # noqa: BLE001 - sorted below by where it came from
        if not client_error(exc):
            raise
        raise unusable(path, exc) from exc


def unusable(path: str, exc: BaseException) -> StoreError:
    """The :class:`StoreError` for a client error ``exc`` met at the URL ``path``; raise it
    ``from exc`` (:func:`is_unusable` tells it by that)."""
    return StoreError(f"path={path!r}: the object store cannot be used ({first_line(exc)}); "
                      f"check storage_options (endpoint_url, key, secret, ...), "
                      f"the credentials in the environment and that the bucket exists")


def is_unusable(exc: BaseException) -> bool:
    """Whether ``exc`` is a StoreError saying that the object store could not be reached or
    used (:func:`store_errors`), rather than what is, or is not, in it."""
    return isinstance(exc, StoreError) and exc.__cause__ is not None \
        and client_error(exc.__cause__)


def first_line(exc: BaseException) -> str:
    """``TypeName: the message's first line`` (300 characters at most), for one-line errors."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}"


def client_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an object store client's answer (a connection, a permission, a
    missing bucket, a misspelt storage option) rather than a fault of statscope's own."""
    if isinstance(exc, (OSError, TimeoutError)):
        return True  # a missing bucket, a permission, a connection: the store's answer
    if isinstance(exc, TypeError) and "unexpected keyword argument" in str(exc):
        return True  # a misspelt storage option reaches the client's constructor
    return any(k.__module__.split(".")[0] in _CLIENT_PACKAGES for k in type(exc).__mro__)


def use_options(path, storage_options):
    """Use ``storage_options`` (fsspec keyword arguments) for every URL under ``path``.

    Returns:
        A function that puts back what was registered for ``path`` before: the caller's call
        when the store could not be used with these options (a misspelt one must not stay).
    """
    key = str(path).rstrip("/")
    before = _OPTIONS.get(key)
    if storage_options:
        if not isinstance(storage_options, dict):
            raise StoreError(f"storage_options={storage_options!r}: expected a dict of fsspec "
                             "options, e.g. {'endpoint_url': 'http://127.0.0.1:9000'}")
        _OPTIONS[key] = dict(storage_options)

    def restore() -> None:
        if before is None:
            _OPTIONS.pop(key, None)
        else:
            _OPTIONS[key] = before

    return restore


def _options(path: str) -> dict:
    # a run's options also serve its lease, which lives beside it as ``<run>.lease``
    from statscope.lease import SUFFIX

    best = max((p for p in _OPTIONS if path in (p, p + SUFFIX) or path.startswith(p + "/")),
               key=len, default=None)
    return _bounded(path, _OPTIONS[best] if best is not None else {})


S3_TIMEOUTS = {"connect_timeout": 5, "read_timeout": 15}
"""Seconds s3fs's client waits to connect and for each answer (s3fs's own defaults, made
explicit); ``storage_options={"config_kwargs": {...}}`` overrides them."""
S3_ATTEMPTS = 3
"""Tries of one request by botocore (its ``standard`` retry mode: backoff with jitter, on
throttling, 5xx answers, timeouts and lost connections), unless ``AWS_MAX_ATTEMPTS``,
``AWS_RETRY_MODE`` or ``config_kwargs={"retries": ...}`` say otherwise."""
S3FS_RETRIES = 1
"""Tries of those tries by s3fs (1: botocore's retries are enough)."""


def _bounded(path: str, options: dict) -> dict:
    """``options`` for an ``s3://`` URL with a bound on how long one request may wait.

    Left alone, botocore tries a request 5 times and s3fs tries that 5 times, each try
    waiting up to ``read_timeout``: an endpoint that accepts connections and never answers held
    ``statscope info`` for more than 6 minutes. Bounded, one request gives up after about
    ``S3FS_RETRIES * S3_ATTEMPTS * read_timeout`` seconds (45 s), see :func:`_retries`."""
    scheme = path.partition("://")[0].lower()
    if scheme not in ("s3", "s3a"):
        return options
    from fsspec.config import conf  # ``fsspec.config`` and ``FSSPEC_S3_*``: ours would hide it

    options = {**conf.get(scheme, {}), **options}
    config = {**S3_TIMEOUTS, **(options.get("config_kwargs") or {})}
    if not (os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE")):
        config.setdefault("retries", {"max_attempts": S3_ATTEMPTS, "mode": "standard"})
    return {**options, "config_kwargs": config}


def _retries(fs):
    """``fs`` with s3fs's own retries bounded (a class attribute no keyword sets; the cached
    instance carries :func:`_bounded`'s options, so it is statscope's own)."""
    if type(fs).__module__.split(".")[0] == "s3fs" and getattr(fs, "retries", 0) > S3FS_RETRIES:
        fs.retries = S3FS_RETRIES
    return fs


def filesystem(path: str):
    """The fsspec filesystem of a URL and the path in it, with the URL's storage options."""
    import fsspec

    try:
        fs, p = fsspec.core.url_to_fs(path, **_options(path))
        return _retries(fs), p
    except (ValueError, ImportError) as exc:
        raise StoreError(f"path={path!r}: unknown URL scheme or missing package: {exc}") from None


_fs = filesystem


def zarr_store(path: str | os.PathLike, *, read_only: bool = True):
    """Return the zarr store for a local path or an fsspec URL (``s3://``, ``memory://``, ...)."""
    from zarr.storage import FsspecStore, LocalStore

    path = os.fspath(path)
    if is_url(path):
        try:
            store = FsspecStore.from_url(path, read_only=read_only,
                                         storage_options=_options(path) or None)
            _retries(store.fs)
            return store
        except (ValueError, ImportError) as exc:
            raise StoreError(f"path={path!r}: cannot open this URL ({exc}); a known fsspec "
                             "protocol with its package installed is needed, e.g. s3:// with "
                             "s3fs") from None
    return LocalStore(local_path(path), read_only=read_only)


def exists(path: str) -> bool:
    """True when something non-empty is at ``path``."""
    if is_url(path):
        fs, p = _fs(path)
        fs.invalidate_cache(p)
        return fs.exists(p) and bool(fs.ls(p))
    p = local_path(path)
    try:
        return p.exists() and (not p.is_dir() or any(p.iterdir()))
    except PermissionError:
        raise StoreError(f"path={path!r}: permission denied") from None


def list_keys(path: str) -> dict[str, int]:
    """Every object below ``path`` and its size in bytes, by key relative to ``path`` with ``/``
    separators (one listing).

    Temporary files that zarr leaves when a write was interrupted (``*.partial``) are left out.
    """
    if is_url(path):
        fs, root = _fs(path)
        root = root.rstrip("/")
        fs.invalidate_cache(root)  # a run being written grows: never trust a cached listing
        found = fs.find(root, detail=True)
        return {k[len(root) + 1:]: int(info.get("size") or 0) for k, info in found.items()
                if not k.endswith(".partial")}
    base = local_path(path)
    out = {}
    for dirpath, _, files in os.walk(base, onerror=_raise):
        rel = os.path.relpath(dirpath, base)
        for f in files:
            if not f.endswith(".partial"):
                key = f if rel == "." else f"{rel}/{f}".replace(os.sep, "/")
                out[key] = os.stat(os.path.join(dirpath, f)).st_size
    return out


def _raise(exc: OSError) -> None:
    raise exc


def remove_partials(path: str) -> int:
    """Delete the temporary ``*.partial`` files a killed write left below a local run (zarr's
    local store writes each object to one and renames it into place); the caller holds the run's
    lease, so no write is in progress. Left in place, zarr's own listing of the group warns about
    each one. Object stores write whole objects and leave none. Returns how many were removed."""
    if is_url(path):
        return 0
    removed = 0
    for dirpath, _, files in os.walk(local_path(path)):
        for f in files:
            if f.endswith(".partial"):
                try:
                    os.unlink(os.path.join(dirpath, f))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def remove_tree(path: str) -> None:
    """Delete everything at ``path`` (the caller has checked that it is a run)."""
    if is_url(path):
        fs, p = _fs(path)
        fs.rm(p, recursive=True)
        return
    p = local_path(path)
    if p.is_symlink():
        # A symlinked run: empty the folder it points to, keep the link the user made.
        p = p.resolve()
    for child in p.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
