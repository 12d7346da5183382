"""statscope: record, analyse and view how normalization statistics fluctuate while a network trains.

``import statscope`` stays light: torch, dash and plotly load only when a name that needs them
is used.
"""

from typing import TYPE_CHECKING

from statscope.errors import (RecordingError, RunCompletedError, StatscopeError, StatscopeWarning,
                              StoreDamagedError, StoreError, StoreLockedError)

if TYPE_CHECKING:  # visible to type checkers and IDEs; loaded by __getattr__ at run time
    from statscope.probes import open_recorders, record
    from statscope.store import open_run, open_runs

__all__ = ["StatscopeError", "StatscopeWarning", "StoreError", "StoreDamagedError",
           "StoreLockedError", "RunCompletedError", "RecordingError", "record", "open_recorders", "open_run",
           "open_runs", "__version__"]

__version__ = "0.1.0"

_LAZY = {
    "record": ("statscope.probes", "record"),
    "open_recorders": ("statscope.probes", "open_recorders"),
    "open_run": ("statscope.store", "open_run"),
    "open_runs": ("statscope.store", "open_runs"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        if module == "statscope.store":
            importlib.import_module("statscope.analyses")  # registers the ds.statscope accessor
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'statscope' has no attribute {name!r}")
