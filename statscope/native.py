"""statscope's C++ kernels: built on first use with torch's extension builder, optional.

- ``channel_norm`` and ``cell_norm`` (``csrc/channel_norm.cpp``, ``csrc/cell_norm.cpp``): in
  training mode on the CPU, HN, HN_G, EN, EN_G and the per-channel mixtures such as (BN, BN+EN),
  and SN, (BN, BN+IN+LN) and the other norms with per-example sets, each as one C++ autograd
  Function: the algebra of :mod:`statscope.nn.channel` and :mod:`statscope.nn.cells` as one fused
  loop each way, without the interpreter and torch's per-op dispatch between a dozen small
  kernels, which were most of a norm's cost on small inputs (the paper's FC net at batch size 4).
  Large inputs, CUDA tensors, eval mode and ``torch.compile`` keep the Python routes, which run
  on torch's own kernels.
- ``shifted_sums`` (``csrc/moments.cpp``): the probes' generic path on the CPU
  (:func:`statscope.probes.reduce.step_entry`), a tensor's per-channel shifted power sums in one
  read of it, in its own dtype, instead of a float copy and four passes.
- ``make_bn_probe`` (``csrc/bn_probe.cpp``): the BatchNorm fast path's probe on the CPU as one
  C call (:mod:`statscope.probes.hooks`), which copies BatchNorm's (C,) statistics into the
  block's buffer and leaves every case but the common one to the Python probe.

The sources are compiled once per Python and torch version with
:func:`torch.utils.cpp_extension.load` (a C++ compiler is needed; the build takes about a
minute on two cores) and cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``. Processes that start together build once, and a build killed in
flight leaves nothing that blocks the next. Without a compiler everything keeps its torch-op
route: the same values, slower on small inputs. ``STATSCOPE_NATIVE=0`` switches the kernels
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
_lock = threading.Lock()  # held while building or loading
_start_lock = threading.Lock()  # held while starting the background build
_state: dict = {}


def _mode():
    value = os.environ.get("STATSCOPE_NATIVE", "auto").strip().lower()
    if value not in ("0", "1", "auto"):
        raise StatscopeError(f"STATSCOPE_NATIVE={value!r}: expected 0, 1 or auto")
    return value


def kernels(wait: bool = True):
    """The compiled module, building it on the first call; None when off or unavailable.

    Args:
        wait: build (or load) now if that has not happened yet; with False, start it on a
            background thread and return None until it is done (the probes: a training step
            never waits for a compiler).

    Returns:
        module | None: has ``channel_norm``, ``cell_norm``, ``shifted_sums`` and
            ``make_bn_probe``; None if
        ``STATSCOPE_NATIVE=0``, the build failed (a :class:`StatscopeWarning` says why, once
        per process, to the first caller that waits) or, with ``wait=False``, it is not done.

    Raises:
        StatscopeError: the build failed and ``STATSCOPE_NATIVE=1`` (callers that wait).
    """
    if "module" in _state:
        module = _state["module"]
        if module is None and wait and not _state.get("told", True):
            _state["told"] = True
            _warn(_state["reason"])
        return module
    mode = _mode()
    if not wait:
        # never _lock here: the build holds it for a minute
        with _start_lock:
            if "module" not in _state and "thread" not in _state:
                _state["thread"] = threading.Thread(target=_load, args=(mode, True), daemon=True,
                                                    name="statscope-native-build")
                _state["thread"].start()
        return _state.get("module")
    return _load(mode, False)


def _load(mode, quiet):
    with _lock:
        if "module" in _state:
            return _state["module"]
        module = None
        reason = "switched off (STATSCOPE_NATIVE=0)"
        if mode != "0":
            try:
                module = _build()
                reason = "compiled"
            except Exception as error:  # any build failure leaves the torch-op routes
                reason = f"build failed: {type(error).__name__}: {error}"
                if mode == "1" and not quiet:
                    raise StatscopeError(
                        f"STATSCOPE_NATIVE=1: statscope's C++ kernels did not build ({reason})"
                    ) from error
                if not quiet:
                    _warn(reason)
        _state["reason"] = reason
        _state["told"] = not quiet or module is not None or mode == "0"
        _state["module"] = module
        return module


def _warn(reason):
    warnings.warn(f"statscope runs without its C++ kernels (statscope.nn's norms and the probes "
                  f"are slower on the CPU): {reason[:500]}", StatscopeWarning,
                  stacklevel=4)


def _build():
    import sys

    import torch
    from torch.utils import cpp_extension

    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 4):
        # before 2.4 c10::optional is not std::optional, and an autograd Function would take
        # the kernels' optional weight and bias for constants: no gradient, silently
        raise RuntimeError(f"torch {torch.__version__}: the kernels need torch >= 2.4")

    # one build per Python and torch version: their ABIs are what the binary depends on
    tag = torch.__version__.replace("+", "_").replace(".", "_")
    name = f"statscope_native_py{sys.version_info[0]}{sys.version_info[1]}_torch_{tag}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    directory = pathlib.Path(root) / name
    directory.mkdir(parents=True, exist_ok=True)
    sources = [str(_SOURCES / f) for f in ("module.cpp", "channel_norm.cpp", "cell_norm.cpp",
                                           "moments.cpp", "bn_probe.cpp")]
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
