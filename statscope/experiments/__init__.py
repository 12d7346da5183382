"""The built-in experiments: the paper's setups, runnable in one call, recorded by the probes.

>>> sorted(EXPERIMENTS)
['cifar-resnet18', 'mnist-fc']
>>> EXPERIMENTS["mnist-fc"].epochs
20

``run_experiment(RunConfig("mnist-fc", batch_size=4))`` trains and records one run; a new
experiment is one module defining an :class:`Experiment` and one line in :data:`EXPERIMENTS`.
Importing this package does not import torch.
"""

from statscope.experiments.base import Experiment, RunConfig, RunResult, run_name
from statscope.experiments.cifar_resnet import CIFAR_RESNET18
from statscope.experiments.mnist_fc import MNIST_FC

__all__ = ["EXPERIMENTS", "Experiment", "RunConfig", "RunResult", "run_experiment", "run_name"]

EXPERIMENTS = {e.name: e for e in (MNIST_FC, CIFAR_RESNET18)}
"""Experiment name -> :class:`Experiment`."""


def __getattr__(name):
    if name == "run_experiment":  # imports torch
        from statscope.experiments.train import run_experiment

        return run_experiment
    raise AttributeError(f"module 'statscope.experiments' has no attribute {name!r}")
