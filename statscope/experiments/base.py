"""What an experiment is, what one run of it asks for, and what it returns.

An :class:`Experiment` holds the paper's settings for one setup and knows how to build its model
and augment its batches; a :class:`RunConfig` is one run of it with the user's overrides; a
:class:`RunResult` is what :func:`statscope.experiments.run_experiment` hands back. This module
imports no torch: the registry and the CLI's ``--help`` stay fast.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from statscope import schema as S
from statscope.errors import StatscopeError

if TYPE_CHECKING:
    import torch

__all__ = ["Experiment", "RunConfig", "RunResult", "DEVICES", "MAX_SEED", "MAX_THREADS", "run_name"]

DEVICES = ("auto", "cpu", "cuda")
MAX_SEED = 2**63 - 2
"""The largest seed: torch's generators take signed 64-bit seeds, and augmentation uses seed + 1."""
MAX_THREADS = 1024
"""The most CPU threads a run may ask for (torch crashes creating 100,000)."""


@dataclass(frozen=True)
class Experiment:
    """The fixed settings of one built-in experiment; subclasses add the model and augmentation.

    Attributes:
        name: registry name, e.g. ``"mnist-fc"``.
        summary: one line for ``statscope run --help``.
        datasets: datasets it accepts; the first is the default.
        epochs: default number of epochs.
        base_lr: learning rate at ``base_batch``; other batch sizes scale it linearly.
        base_batch: the batch size ``base_lr`` belongs to.
        momentum: SGD momentum.
        weight_decay: SGD weight decay (L2, coupled, as torch's SGD does it).
        milestones: epochs after which the learning rate is divided by 10 (as fractions of the
            default ``epochs``, so a shortened run keeps the schedule's shape).
    """

    name: str
    summary: str
    datasets: tuple[str, ...]
    epochs: int
    base_lr: float = 0.1
    base_batch: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = ()

    def build_model(self, norm: str, num_classes: int) -> "torch.nn.Module":
        """The network, with ``norm`` after every hidden layer."""
        raise NotImplementedError

    def prepare(self, x: "torch.Tensor", normalize, train: bool) -> "torch.Tensor":
        """The whole training or test set as it is kept in memory for :meth:`batch`.

        Args:
            x: uint8 images, (N, 28, 28) or (N, 3, 32, 32), on the run's device.
            normalize: the dataset's ``normalize`` (training-set mean and std).
            train: the training set (kept for :meth:`batch`) or the test set (fed as it is).

        Returns:
            By default the normalized float32 images.
        """
        return normalize(x)

    def batch(self, x: "torch.Tensor", normalize, generator: "torch.Generator") -> "torch.Tensor":
        """The model's input for rows ``x`` of the prepared training set: by default ``x`` itself;
        an experiment with augmentation draws it from ``generator`` here."""
        return x

    def lr_at(self, epoch: int, epochs: int, lr: float) -> float:
        """The learning rate during ``epoch`` (0-based) of ``epochs``: ÷10 after each milestone."""
        drops = sum(epoch >= round(m * epochs) for m in self.milestones)
        return lr * 0.1 ** drops


def _positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StatscopeError(f"{name}={value!r}: expected a positive int")


def _non_negative(name: str, value: Any, *, positive: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
            or (positive and value == 0) or value == math.inf:
        kind = "positive" if positive else "non-negative"
        raise StatscopeError(f"{name}={value!r}: expected a finite {kind} number")


def _path(name: str, value: Any, expected: str) -> None:
    """Refuse a path setting that is neither None nor a non-empty str or ``os.PathLike`` of str
    (bytes paths, numbers, and ``""``, which would silently mean the current folder)."""
    if value is None:
        return
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str) or not path.strip():
        raise StatscopeError(f"{name}={value!r}: expected {expected}")


@dataclass(frozen=True)
class RunConfig:
    """One run of a built-in experiment. ``None`` means the experiment's default.

    Attributes:
        experiment: a name in :data:`statscope.experiments.EXPERIMENTS`.
        batch_size: examples per step.
        epochs: passes over the training set (default: the experiment's).
        lr: initial learning rate (default: ``base_lr * batch_size / base_batch``).
        momentum: SGD momentum (default: the experiment's, 0.9).
        weight_decay: SGD weight decay (default: the experiment's, 5e-4).
        seed: seeds the weights, the shuffling and the augmentation.
        norm: a name of :data:`statscope.nn.NORM_NAMES`; ``"bn"`` is torch's BatchNorm.
        en_groups: EN groups the probes use for ``en_mean``/``en_std`` (1: the whole layer).
        max_steps: stop after this many steps in all (for smoke tests); None: run every epoch.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        threads: torch intra-op CPU threads for the run (default 1, the fastest for small batches
            on a shared machine; 0 keeps torch's default).
        dataset: a dataset the experiment accepts (default: its first).
        data_dir: read the dataset from this folder only.
        download: allow downloading the dataset into the cache.
        out: the run store (default ``runs/<run_name>``).
        overwrite: replace an existing store at ``out``.
        resume: continue the store at ``out`` after its last recorded step.
    """

    experiment: str
    batch_size: int = 128
    epochs: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    seed: int = 0
    norm: str = "bn"
    en_groups: int = 1
    max_steps: int | None = None
    device: str = "auto"
    threads: int = 1
    dataset: str | None = None
    data_dir: str | None = None
    download: bool = True
    out: str | None = field(default=None)
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self):
        from statscope.experiments import EXPERIMENTS

        if self.experiment not in EXPERIMENTS:
            raise StatscopeError(f"experiment={self.experiment!r}: unknown experiment; known: "
                                 + ", ".join(EXPERIMENTS))
        _positive_int("batch_size", self.batch_size)
        _positive_int("epochs", self.epochs, allow_none=True)
        _positive_int("max_steps", self.max_steps, allow_none=True)
        _positive_int("en_groups", self.en_groups)
        _non_negative("lr", self.lr, positive=True)
        _non_negative("momentum", self.momentum)
        _non_negative("weight_decay", self.weight_decay)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) \
                or not 0 <= self.seed <= MAX_SEED:
            raise StatscopeError(f"seed={self.seed!r}: expected an int in 0..{MAX_SEED} (2**63 - 2: "
                                 "torch's generators take 64-bit seeds, and augmentation uses "
                                 "seed + 1)")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) \
                or not 0 <= self.threads <= MAX_THREADS:
            raise StatscopeError(f"threads={self.threads!r}: expected an int in 0..{MAX_THREADS} "
                                 "(0: torch's default)")
        _path("out", self.out, "a path or URL (None: runs/<run name>)")
        _path("data_dir", self.data_dir, "a folder holding the dataset (None: the cache and "
                                         "$STATSCOPE_DATA)")
        for name in ("download", "overwrite", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise StatscopeError(f"{name}={getattr(self, name)!r}: expected True or False")
        if self.device not in DEVICES:
            raise StatscopeError(f"device={self.device!r}: expected one of {', '.join(DEVICES)}")
        if not isinstance(self.norm, str):
            raise StatscopeError(f"norm={self.norm!r}: expected a norm name")
        object.__setattr__(self, "norm", self.norm.strip().lower())
        exp = EXPERIMENTS[self.experiment]
        if self.dataset is not None and self.dataset not in exp.datasets:
            raise StatscopeError(f"dataset={self.dataset!r}: {self.experiment} takes "
                                 + ", ".join(exp.datasets))
        if self.overwrite and self.resume:
            raise StatscopeError("overwrite=True, resume=True: choose one")

    @property
    def spec(self) -> Experiment:
        """The :class:`Experiment` this run belongs to."""
        from statscope.experiments import EXPERIMENTS

        return EXPERIMENTS[self.experiment]

    def resolved(self) -> "RunConfig":
        """This config with every ``None`` setting replaced by the experiment's default.

        Example:
            >>> RunConfig("mnist-fc", batch_size=4).resolved().lr
            0.003125
        """
        exp = self.spec
        return dataclasses.replace(
            self,
            epochs=exp.epochs if self.epochs is None else self.epochs,
            lr=exp.base_lr * self.batch_size / exp.base_batch if self.lr is None else self.lr,
            momentum=exp.momentum if self.momentum is None else self.momentum,
            weight_decay=exp.weight_decay if self.weight_decay is None else self.weight_decay,
            dataset=exp.datasets[0] if self.dataset is None else self.dataset,
            out=os.path.join("runs", run_name(self)) if self.out is None else os.fspath(self.out))

    def meta(self) -> dict[str, Any]:
        """The settings stored in the run's ``meta`` attribute (resolve first)."""
        return {
            "experiment": self.experiment, S.META_BATCH_SIZE: self.batch_size,
            S.META_LR: self.lr, S.META_EPOCHS: self.epochs, S.META_SEED: self.seed,
            S.META_DATASET: self.dataset, S.META_NORM: self.norm, "momentum": self.momentum,
            "weight_decay": self.weight_decay, "en_groups": self.en_groups,
            "max_steps": self.max_steps, "device": self.device, "threads": self.threads,
            "lr_milestones": [round(m * self.epochs) for m in self.spec.milestones],
        }


# Settings that decide what a run computes, in the order they appear in a run's folder name.
_NAME_PARTS = (("epochs", "ep"), ("lr", "lr"), ("momentum", "mom"), ("weight_decay", "wd"),
               ("en_groups", "eng"), ("max_steps", "max"))


def run_name(config: RunConfig) -> str:
    """A folder name from the settings: experiment, batch size, seed, norm, then what differs
    from the defaults (the dataset too when it is not the experiment's first).

    Example:
        >>> run_name(RunConfig("mnist-fc", batch_size=4, seed=1, norm="hn"))
        'mnist-fc_bs4_seed1_hn'
        >>> run_name(RunConfig("mnist-fc", batch_size=4, epochs=2, max_steps=50))
        'mnist-fc_bs4_seed0_bn_ep2_max50'
    """
    parts = [config.experiment, f"bs{config.batch_size}", f"seed{config.seed}", config.norm]
    exp = config.spec
    default = {"epochs": exp.epochs, "lr": exp.base_lr * config.batch_size / exp.base_batch,
               "momentum": exp.momentum, "weight_decay": exp.weight_decay, "en_groups": 1,
               "max_steps": None}
    for attr, tag in _NAME_PARTS:
        value = getattr(config, attr)
        if value is not None and value != default[attr]:
            parts.append(f"{tag}{value:g}" if isinstance(value, float) else f"{tag}{value}")
    if config.dataset is not None and config.dataset != config.spec.datasets[0]:
        parts.append(config.dataset)
    return "_".join(parts)


@dataclass(frozen=True)
class RunResult:
    """What one run produced.

    Attributes:
        path: the run store (None for a run with ``record=False``).
        dataset: the dataset actually used (e.g. ``"mnist-5k-subset"`` after the fallback).
        test_accuracy: test accuracy after each completed epoch, fractions in [0, 1].
        steps: the run's steps in all, where it ended (a resumed run counts the steps before
            the checkpoint and the replayed ones too).
        wall_seconds: wall time of the training loop, seconds.
        probe_overhead: probe time / other time of the training thread (the recorder's figure).
        resumed_at: for a resumed run, the step recording continued at (the store's last step
            + 1); None for a new run.
        checkpoint_step: the step of the checkpoint the run continued from; None when it
            started from step 0.
        steps_per_epoch: the optimizer steps of one epoch (its last incomplete batch dropped).
        replayed_steps: steps trained again without recording (between the checkpoint, or step
            0, and ``resumed_at``).
    """

    path: str | None
    dataset: str
    test_accuracy: tuple[float, ...]
    steps: int
    wall_seconds: float
    probe_overhead: float | None
    resumed_at: int | None = None
    checkpoint_step: int | None = None
    replayed_steps: int = 0
    steps_per_epoch: int | None = None
