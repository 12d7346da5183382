"""Record where users already train: a Lightning callback and a Hugging Face TrainerCallback.

Both record the trainer's model into a statscope run at every optimizer step (gradient
accumulation counted right, evaluation left out, one store per rank), log the trainer's loss and
learning rate into it, close it at the end of training or on a failure, and can export
TensorBoard summaries live (:class:`LiveExport`). The callbacks load their framework only when
named: ``import statscope.integrations`` stays light. See ``docs/integrations.md``.

>>> from statscope.integrations import LiveExport
>>> LiveExport("tb", every=100).every
100
"""

from typing import TYPE_CHECKING

from statscope.integrations.session import LiveExport

if TYPE_CHECKING:  # visible to type checkers and IDEs; loaded lazily at run time
    from statscope.integrations.hf import StatscopeTrainerCallback
    from statscope.integrations.lightning import StatscopeCallback

__all__ = ["StatscopeCallback", "StatscopeTrainerCallback", "LiveExport"]

_LAZY = {
    "StatscopeCallback": "statscope.integrations.lightning",
    "StatscopeTrainerCallback": "statscope.integrations.hf",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'statscope.integrations' has no attribute {name!r}")
