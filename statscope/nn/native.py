"""statscope.nn's C++ kernels: built on first use with torch's extension builder, optional.

In training mode on the CPU, HN, HN_G, EN, EN_G and the per-channel mixtures such as
(BN, BN+EN) run as one C++ autograd Function (``csrc/channel_norm.cpp``), SN, (BN, BN+IN+LN)
and the other norms with per-example sets as another (``csrc/cell_norm.cpp``): the algebra of
:mod:`statscope.nn.channel` and :mod:`statscope.nn.cells` as one fused loop each way, without
the interpreter and torch's per-op dispatch between a dozen small kernels, which were most of a
norm's cost on small inputs (the paper's FC net at batch size 4). Large inputs, CUDA tensors,
eval mode and ``torch.compile`` keep the Python routes, which run on torch's own kernels.

The sources are compiled once per Python and torch version with
:func:`torch.utils.cpp_extension.load` (a C++ compiler and ninja are needed; the build takes
about a minute on two cores) and cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``. Processes that start together build once, and a build killed in
flight leaves nothing that blocks the next. Without a compiler the layers keep their Python
routes: the same values, slower on small inputs. ``STATSCOPE_NATIVE=0`` switches the kernels
off, ``STATSCOPE_NATIVE=1`` makes a failed build an error instead of a warning. :func:`status`
says which is in use.
"""

import os
import pathlib
import threading
import warnings

from statscope.errors import StatscopeError, StatscopeWarning

__all__ = ["kernels", "status"]

_SOURCES = pathlib.Path(__file__).with_name("csrc")
_lock = threading.Lock()
_state: dict = {}


def _mode():
    value = os.environ.get("STATSCOPE_NATIVE", "auto").strip().lower()
    if value not in ("0", "1", "auto"):
        raise StatscopeError(f"STATSCOPE_NATIVE={value!r}: expected 0, 1 or auto")
    return value


def kernels():
    """The compiled module, building it on the first call; None when off or unavailable.

    Returns:
        module | None: has ``channel_norm`` and ``cell_norm``; None if ``STATSCOPE_NATIVE=0`` or the build
        failed (a :class:`StatscopeWarning` says why, once per process).

    Raises:
        StatscopeError: the build failed and ``STATSCOPE_NATIVE=1``.
    """
    if "module" in _state:
        return _state["module"]
    mode = _mode()
    with _lock:
        if "module" in _state:
            return _state["module"]
        module = None
        reason = "switched off (STATSCOPE_NATIVE=0)"
        if mode != "0":
            try:
                module = _build()
                reason = "compiled"
            except Exception as error:  # any build failure leaves the Python routes
                reason = f"build failed: {type(error).__name__}: {error}"
                if mode == "1":
                    raise StatscopeError(
                        f"STATSCOPE_NATIVE=1: statscope.nn's C++ kernels did not build ({reason})"
                    ) from error
                warnings.warn(f"statscope.nn runs without its C++ kernels, slower on small "
                              f"inputs: {reason[:500]}", StatscopeWarning, stacklevel=3)
        _state["reason"] = reason
        _state["module"] = module
        return module


def _build():
    import sys

    import torch
    from torch.utils import cpp_extension

    # one build per Python and torch version: their ABIs are what the binary depends on
    tag = torch.__version__.replace("+", "_").replace(".", "_")
    name = f"statscope_nn_py{sys.version_info[0]}{sys.version_info[1]}_torch_{tag}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    directory = pathlib.Path(root) / name
    directory.mkdir(parents=True, exist_ok=True)
    sources = [str(_SOURCES / f) for f in ("module.cpp", "channel_norm.cpp", "cell_norm.cpp")]
    with _exclusive(directory / "statscope.lock"):
        # torch's own lock file outlives a build killed in flight, and then every later build
        # waits on it forever; holding ours, no other statscope build is running, so it is stale
        (directory / "lock").unlink(missing_ok=True)
        return cpp_extension.load(name=name, sources=sources, build_directory=str(directory),
                                  extra_include_paths=[str(_SOURCES)], extra_cflags=["-O3"],
                                  verbose=False)


class _exclusive:
    """An advisory lock on ``path`` between processes, released by the OS if the holder dies."""

    def __init__(self, path):
        self.path = path
        self.handle = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: torch's lock file alone
            return self
        self.handle = open(self.path, "a")  # noqa: SIM115 (held until __exit__)
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.close()  # closing releases the flock


def status():
    """Whether the C++ kernels are in use, and why not if they are not.

    Returns:
        str: ``"compiled"``, ``"not loaded yet"``, or the reason they are off.
    """
    return _state.get("reason", "not loaded yet")
