"""What a built-in run checks about its store: before training, that ``out`` may be written
(and, resuming, continued), the device and that the norm takes the batch's shapes, and after it,
that the store ended ``completed`` with every step; and what a sweep checks about its grid
before any of its runs starts.

Every check before training raises before anything is written, so a refused run changes nothing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from typing import Iterable

from statscope import schema as S
from statscope.errors import (RecordingError, StatscopeError, StatscopeWarning, StoreError,
                              StoreLockedError)
from statscope.experiments.base import RunConfig

__all__ = ["RESUMABLE", "check_out", "check_resume", "check_recorded", "check_grid",
           "check_shapes", "resolve_device"]

RESUMABLE = ("device", "threads", "max_steps")
"""Settings a resumed run may change: they do not alter what is computed (max_steps only where
the run stops)."""


def _check_out(cfg: RunConfig) -> int:
    """The step recording starts at, once ``cfg.out`` is known not to be in the way.

    Args:
        cfg: the resolved run.

    Returns:
        0 for a new or overwritten run, else the stored run's last step + 1.

    Raises:
        StoreError: ``out`` exists and neither ``overwrite`` nor ``resume`` is set; it holds
            something that is not a run; no run can be created there; resuming, the run is
            completed or was recorded with other settings.
        StoreLockedError: another process is writing the run.
    """
    from statscope.destination import check_path
    from statscope.discovery import enclosing_run
    from statscope.lease import Lease
    from statscope.storage import exists, is_url
    from statscope.store import read_attrs

    # what is at out already says what it is; a URL's bucket is checked below (lease_path)
    parent = None if is_url(cfg.out) or exists(cfg.out) else enclosing_run(cfg.out)
    if parent is not None:
        raise StoreError(f"out={cfg.out!r}: inside the run {parent!r}; write the run "
                         "elsewhere (it would sit among that run's files, and go when "
                         "that run is overwritten)")
    # overwrite=True asks only whether something is there, a run or a path a run can be made at
    if not check_path(cfg.out, overwrite=True, resume=False):
        if cfg.resume:  # a typo in --out, or a run removed: say that nothing was continued
            warnings.warn(f"statscope: --resume: no run at out={cfg.out!r}; a new run starts "
                          "there", StatscopeWarning, stacklevel=3)
        return 0
    if not (cfg.overwrite or cfg.resume):
        raise StoreError(f"out={cfg.out!r}: already exists; pass --overwrite to replace it or "
                         "--resume to continue it")
    attrs = read_attrs(cfg.out)  # never replace or continue something that is not a run
    # Refuse a run another process is writing now, before loading data or replaying steps (the
    # recorder takes the lease for good when recording starts).
    Lease.acquire(cfg.out).release()
    if cfg.overwrite:
        return 0
    if attrs.get(S.ATTR_STATUS) == S.STATUS_COMPLETED:
        raise StoreError(f"out={cfg.out!r}: the run is already completed "
                         f"({attrs.get(S.ATTR_N_STEPS)} steps); nothing to resume, pass "
                         "--overwrite to run it again")
    stored = attrs.get(S.ATTR_META) or {}
    compared = {k: v for k, v in cfg.meta().items() if k not in RESUMABLE and k != S.META_DATASET}
    if "experiment" not in stored:  # every run of statscope run stores which it is
        raise StoreError(f"out={cfg.out!r}: not a run that statscope run recorded (no "
                         "experiment among its stored settings: recorded through the Python "
                         "API?); --resume continues only runs of statscope run")
    differ = [f"{k}: stored {stored.get(k)!r}, now {v!r}" for k, v in compared.items()
              if stored.get(k) != v]
    if differ:
        raise StoreError(f"out={cfg.out!r}: --resume with other settings than the stored run ("
                         + "; ".join(differ) + ")")
    last = attrs.get(S.ATTR_LAST_STEP)
    return 0 if last is None else int(last) + 1


def check_resume(cfg: RunConfig, start_step: int, total: int) -> None:
    """Refuse to resume a run recorded on another dataset, or one holding more steps than this
    run takes."""
    from statscope.store import read_attrs
    from statscope.storage import exists as _exists

    if not _exists(cfg.out):
        return
    stored = (read_attrs(cfg.out).get(S.ATTR_META) or {}).get(S.META_DATASET)
    if stored is not None and stored != cfg.dataset:
        raise StoreError(f"out={cfg.out!r}: --resume with dataset {cfg.dataset!r}, but the run "
                         f"was recorded on {stored!r}")
    if start_step > total:
        raise StoreError(f"out={cfg.out!r}: the store holds steps 0..{start_step - 1}, more than "
                         f"the {total} steps this run takes (max_steps={cfg.max_steps}); pass "
                         "--overwrite to run it again")


def check_recorded(out: str, attrs: dict, steps: int) -> None:
    """Raise unless the store at ``out`` ended ``completed`` with all ``steps`` steps: a training
    that succeeded must not pass for a recording that did not.

    Args:
        out: the run store.
        attrs: its root attributes, read after training.
        steps: the steps trained in all.

    Raises:
        RecordingError: the store is not ``completed``, or holds another number of steps.

    Example:
        >>> check_recorded("runs/r", {"status": "completed", "n_steps": 5}, 5)
        >>> check_recorded("runs/r", {"status": "failed", "n_steps": 3,
        ...                           "error": "writer: OSError(28)"}, 5)
        Traceback (most recent call last):
        ...
        statscope.errors.RecordingError: out='runs/r': training finished but the recording failed: the store is 'failed' with 3 steps committed (writer: OSError(28)); continue it with --resume
    """
    status, n = attrs.get(S.ATTR_STATUS), attrs.get(S.ATTR_N_STEPS)
    if status == S.STATUS_COMPLETED and n == steps:
        return
    why = attrs.get(S.ATTR_ERROR) or (f"it holds {n} of the {steps} steps trained"
                                      if status == S.STATUS_COMPLETED else "no reason recorded")
    first = (str(why).splitlines() or [""])[0]
    raise RecordingError(f"out={out!r}: training finished but the recording failed: the store is "
                         f"{status!r} with {n} steps committed ({first}); "
                         "continue it with --resume")


def check_grid(base: RunConfig, batch_sizes: Iterable[int], norms: Iterable[str], *,
               quiet: bool = True) -> None:
    """Refuse, before any run of a sweep starts, settings that some of its runs cannot run: what
    each run would refuse after loading its data, here once for the whole grid.

    Checks that CUDA is available when ``device`` asks for it, that no batch size is larger than
    the training set (the dataset is loaded once, as the runs will load it) and that each norm
    normalizes the model's shapes at the smallest batch size (one forward pass on the CPU of a
    batch of the training set, as each run makes on its device).

    Args:
        base: the shared settings of the sweep's runs.
        batch_sizes: the grid's batch sizes.
        norms: the grid's norm names.
        quiet: no download progress bar.

    Raises:
        StatscopeError: the first of those a run would refuse, in the run's words.

    Example:
        >>> check_grid(RunConfig("mnist-fc", dataset="mnist-5k-subset"), [4, 8], ["bn", "hn"])
        >>> check_grid(RunConfig("mnist-fc", dataset="mnist-5k-subset"), [4, 99999], ["bn"])
        Traceback (most recent call last):
        ...
        statscope.errors.StatscopeError: batch_size=99999: larger than the training set of mnist-5k-subset (4000 images)
    """
    import torch

    from statscope.experiments.datasets import load_dataset

    cfg = base.resolved()
    resolve_device(cfg.device)
    data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, quiet=quiet)
    sizes = sorted(set(batch_sizes))
    n_train = len(data.train_y)
    if sizes[-1] > n_train:
        raise StatscopeError(f"batch_size={sizes[-1]}: larger than the training set of "
                             f"{data.name} ({n_train} images)")
    exp, cpu = cfg.spec, torch.device("cpu")
    train_x = exp.prepare(data.train_x[:sizes[0]], data.normalize, True)
    with torch.random.fork_rng(devices=[]):  # the models' initialisation draws from it
        for norm in dict.fromkeys(norms):
            model = exp.build_model(norm, data.num_classes)
            check_shapes(dataclasses.replace(cfg, norm=norm, batch_size=sizes[0]), exp, model,
                         train_x, data.normalize, cpu)


def check_out(cfg: RunConfig) -> int:
    """The step recording starts at (:func:`_check_out`); when it refuses to resume a
    completed run, the checkpoints that run left beside it (killed between its completion and
    their removal) go first: a completed run is never resumed."""
    from statscope.experiments.checkpoint import remove_checkpoints
    from statscope.store import read_attrs

    try:
        return _check_out(cfg)
    except StoreLockedError:
        raise
    except StoreError:
        if cfg.resume:
            with contextlib.suppress(StatscopeError, OSError):  # not a run: nothing of ours
                if read_attrs(cfg.out).get(S.ATTR_STATUS) == S.STATUS_COMPLETED:
                    remove_checkpoints(cfg.out)
        raise


def resolve_device(name: str):
    """The torch device of ``--device`` (``auto``: CUDA where available)."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise StatscopeError(f"device='cuda': CUDA is not available to this torch "
                             f"({torch.__version__}); use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def check_shapes(cfg: RunConfig, exp, model, train_x, normalize, device) -> None:
    """One forward of a copy of the model on a training batch: a norm that cannot normalize the
    shapes, or a batch too small for it, fails here, before the store exists."""
    import torch

    probe = copy.deepcopy(model).train()
    xb = exp.batch(train_x[:cfg.batch_size], normalize, torch.Generator(device=device))
    try:
        with torch.no_grad():
            probe(xb)
    except StatscopeError as exc:
        raise StatscopeError(f"norm={cfg.norm!r} with batch_size={cfg.batch_size}: {exc}") from None
    except (ValueError, RuntimeError) as exc:
        raise StatscopeError(f"norm={cfg.norm!r} with batch_size={cfg.batch_size}: "
                             f"{str(exc).splitlines()[0]}") from None
