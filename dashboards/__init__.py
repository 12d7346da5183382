"""statscope.dashboards: a Dash app to watch and compare how normalization statistics fluctuate.

Pure figure builders (:mod:`.evolution`, :mod:`.bars`, :mod:`.scatter`, :mod:`.heatmap`) turn
Datasets into plotly figures without importing Dash; :func:`create_app` puts them in a page.
Dash loads only when :func:`create_app` is used.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # visible to type checkers and IDEs; loaded by __getattr__ at run time
    from .app import create_app

__all__ = ["create_app"]


def __getattr__(name):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'statscope.dashboards' has no attribute {name!r}")
