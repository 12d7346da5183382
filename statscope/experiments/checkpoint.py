"""Checkpoints of a built-in experiment's training loop, so that ``--resume`` continues a run
from where it stopped instead of replaying it from step 0.

A checkpoint holds everything the loop needs to go on bit-exactly on the CPU: the model's and the
optimizer's state dicts (weights, BatchNorm running statistics, momentum buffers), the position
(global step, epoch, learning rate), the state of the shuffling generator at the start of that
epoch (its permutation is drawn again), the augmentation generator's and torch's global RNG
states, the test accuracy of the completed epochs, and the settings that must match to continue.

It lives *beside* the run store, not in it: ``runs/<name>.checkpoint.pt`` for the store
``runs/<name>``. zarr-python 3 warns about every file inside a group that is not a zarr node
whenever the group's members are listed (``group.arrays()``, and the writer's resume does), so a
file inside the store would not be invisible. The previous checkpoint is kept as
``<name>.checkpoint.prev.pt``: the store lags the training by a few seconds of buffered steps, so
after a hard kill the newest checkpoint can be ahead of the store and only the previous one
usable. A run that completes deletes them (it is never resumed), and a run started from step 0
deletes stale ones. Both are written atomically (the temporary file
``<name>.checkpoint.pt.tmp-<pid>``, ``fsync``, ``os.replace``); a temporary file whose process is
gone (killed while writing it) goes with the checkpoints, and when a run starts or resumes. They
are read with ``torch.load(weights_only=True)``: only tensors and plain containers, no code. A
checkpoint that cannot be written (a full disk, a permission) is a :class:`CheckpointWriteError`
naming the file and the reason; the training loop then stops and the run is marked ``failed``
with that reason, every step committed to the store before it kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from statscope.errors import StatscopeError, StoreError

__all__ = ["Checkpoint", "CheckpointWriteError", "checkpoint_paths", "load_checkpoint",
           "remove_checkpoints", "remove_stale_temps"]

FORMAT = 1
_SUFFIXES = (".checkpoint.pt", ".checkpoint.prev.pt")
_TMP = ".tmp-"  # a checkpoint being written: <current>.tmp-<pid of the writer>


def checkpoint_paths(out: str) -> tuple[str, ...]:
    """The checkpoint files of the store ``out``, newest first; () for a URL (not checkpointed).

    Example:
        >>> checkpoint_paths("runs/mnist-fc_bs4/")
        ('runs/mnist-fc_bs4.checkpoint.pt', 'runs/mnist-fc_bs4.checkpoint.prev.pt')
        >>> checkpoint_paths("s3://bucket/run")
        ()
    """
    from statscope.storage import is_url as _is_url

    if _is_url(out):
        return ()
    base = os.path.normpath(out.removeprefix("file://"))
    return tuple(base + suffix for suffix in _SUFFIXES)


class CheckpointWriteError(StatscopeError):
    """A checkpoint could not be written (a full disk, a permission, a vanished folder).

    A failure of the machine at run time, not of the input: the command line exits 1.
    """

    exit_code = 1


@dataclass(frozen=True)
class Checkpoint:
    """The training loop's state after ``step`` steps.

    Attributes:
        step: steps done, in all.
        epoch: the 0-based epoch the loop continues in (``step`` may lie inside it).
        lr: learning rate of that epoch.
        test_accuracy: test accuracy after each of the ``epoch`` completed epochs, in [0, 1].
        config: the settings that must match to continue (``RunConfig.meta()`` less
            ``device``, ``threads``, ``max_steps``) and ``steps_per_epoch``.
        model: the model's ``state_dict()``.
        optimizer: the optimizer's ``state_dict()``.
        shuffle: shuffling generator state before epoch ``epoch``'s permutation, uint8 tensor.
        augment: augmentation generator state, uint8 tensor.
        torch_rng: ``torch.get_rng_state()``.
        cuda_rng: ``torch.cuda.get_rng_state()`` on CUDA runs, else None.
        path: the file it was read from (not saved).
    """

    step: int
    epoch: int
    lr: float
    test_accuracy: tuple[float, ...]
    config: dict[str, Any]
    model: dict[str, Any]
    optimizer: dict[str, Any]
    shuffle: Any
    augment: Any
    torch_rng: Any
    cuda_rng: Any = None
    path: str | None = None

    def save(self, out: str) -> str | None:
        """Write this checkpoint beside the store ``out``; the newest one before it becomes the
        previous. Returns the path written (None for a URL ``out``)."""
        import torch

        paths = checkpoint_paths(out)
        if not paths:
            return None
        current, previous = paths
        tmp = f"{current}{_TMP}{os.getpid()}"
        payload = {"format": FORMAT, **{f: getattr(self, f) for f in self.__dataclass_fields__
                                        if f != "path"}}
        payload["test_accuracy"] = list(self.test_accuracy)
        try:
            with open(tmp, "wb") as handle:
                sink = _Sink(handle)
                try:
                    torch.save(payload, sink)
                except RuntimeError:
                    if sink.error is None:
                        raise
                    raise sink.error from None  # torch reports a failed write as "unexpected pos"
                handle.flush()
                os.fsync(handle.fileno())
            if os.path.exists(current):
                os.replace(current, previous)
            os.replace(tmp, current)
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise CheckpointWriteError(f"checkpoint {current!r}: cannot be written ({reason})") \
                from exc
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return current


class _Sink:
    """A file for ``torch.save`` that keeps the ``OSError`` of a failed write: torch turns it
    into a ``RuntimeError`` that no longer says why (ENOSPC reads "unexpected pos 704 vs 598")."""

    def __init__(self, handle):
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def load_checkpoint(out: str, config: dict[str, Any], max_step: int) -> tuple[Checkpoint | None,
                                                                             str | None]:
    """The newest checkpoint of the store ``out`` with ``step <= max_step``.

    Args:
        out: the run store.
        config: the settings the checkpoint must have been made with (see :class:`Checkpoint`).
        max_step: the step the store records next (its last step + 1).

    Returns:
        (checkpoint, None), or (None, why none was usable: none found, or each one ahead of the
        store).

    Raises:
        StoreError: a checkpoint file that cannot be read, is of an unknown format, or was made
            with other settings; the message names the file.
    """
    import torch

    ahead = []
    for path in checkpoint_paths(out):
        if not os.path.exists(path):
            continue
        fix = "delete it to resume by replaying the run from step 0"
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a damaged or foreign file
            first = (str(exc).splitlines() or [""])[0]
            raise StoreError(f"checkpoint {path!r}: cannot be read ({type(exc).__name__}: "
                             f"{first}); {fix}") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise StoreError(f"checkpoint {path!r}: format {found!r}, expected {FORMAT}; {fix}")
        fields = Checkpoint.__dataclass_fields__
        missing = sorted(set(fields) - set(payload) - {"cuda_rng", "path"})
        if missing:
            raise StoreError(f"checkpoint {path!r}: missing {', '.join(missing)}; {fix}")
        stored = payload["config"]
        differ = [f"{k}: checkpoint {stored.get(k)!r}, now {v!r}" for k, v in config.items()
                  if stored.get(k) != v]
        if differ:
            raise StoreError(f"checkpoint {path!r}: made with other settings than this run ("
                             + "; ".join(differ) + f"); {fix}")
        if payload["step"] > max_step:
            ahead.append(f"{os.path.basename(path)} is at step {payload['step']}")
            continue
        payload["test_accuracy"] = tuple(payload["test_accuracy"])
        return Checkpoint(**{k: v for k, v in payload.items() if k in fields and k != "path"},
                          path=path), None
    if ahead:
        return None, "ahead of the store's next step " + str(max_step) + " (" + \
            ", ".join(ahead) + ")"
    return None, "no checkpoint"


def remove_checkpoints(out: str) -> None:
    """Delete the checkpoints of the store ``out`` (a run started again from step 0, or
    completed) and the temporary files of writers that are gone (see
    :func:`remove_stale_temps`)."""
    for path in checkpoint_paths(out):
        if os.path.exists(path):
            os.remove(path)
    remove_stale_temps(out)


def remove_stale_temps(out: str) -> list[str]:
    """Delete the half-written checkpoints beside the store ``out`` whose writer is gone.

    A checkpoint is written to ``<name>.checkpoint.pt.tmp-<pid>`` and moved into place; a
    process killed while writing (``kill -9``) leaves that file behind. It is stale when no
    process with that pid lives on this machine; a live process's file is left alone (it may
    be writing it now), as is every file where liveness cannot be told (Windows).

    Returns:
        The paths removed.

    Example:
        >>> import os, subprocess, sys, tempfile
        >>> out = os.path.join(tempfile.mkdtemp(), "run")
        >>> gone = subprocess.Popen([sys.executable, "-c", "pass"])
        >>> _ = gone.wait()  # its pid names no live process now
        >>> for pid in (gone.pid, os.getpid()):
        ...     open(f"{out}.checkpoint.pt.tmp-{pid}", "wb").close()
        >>> [os.path.basename(p) for p in remove_stale_temps(out)] == [
        ...     f"run.checkpoint.pt.tmp-{gone.pid}"]
        True
        >>> os.listdir(os.path.dirname(out)) == [f"run.checkpoint.pt.tmp-{os.getpid()}"]
        True
    """
    from statscope.lease import pid_alive

    paths = checkpoint_paths(out)
    if not paths:
        return []
    folder, prefix = os.path.split(paths[0] + _TMP)
    try:
        names = os.listdir(folder or ".")
    except OSError:  # no folder yet, or one we may not list: nothing of ours there
        return []
    removed = []
    for name in names:
        pid = name[len(prefix):]
        if not (name.startswith(prefix) and pid.isdigit()) or pid_alive(int(pid)):
            continue
        path = os.path.join(folder, name)
        try:
            os.remove(path)
        except FileNotFoundError:
            continue  # another process removed it first
        removed.append(path)
    return removed
