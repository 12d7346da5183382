"""``statscope.integrations`` and ``statscope.export`` load their frameworks only when used."""

import subprocess
import sys

import pytest

from statscope.errors import StatscopeError
from statscope.integrations import LiveExport

HEAVY = ("torch", "lightning", "transformers", "tensorboard", "xarray")


def test_importing_the_packages_loads_no_framework():
    code = ("import sys, statscope.integrations, statscope.export.sinks; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    # the export's summaries need xarray (never torch); the integrations need nothing yet
    assert out.stdout.strip() == "['xarray']"


@pytest.mark.parametrize("kwargs, message", [
    ({"every": 0}, "LiveExport(every=0): expected an int of at least 1"),
    ({"window": 1}, "LiveExport(window=1): expected an int of at least 2"),
    ({"every": True}, "LiveExport(every=True)"),
    ({"to": "csv"}, "LiveExport(to='csv'): expected one of tensorboard"),
])
def test_live_export_settings_are_checked(kwargs, message):
    with pytest.raises(StatscopeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LiveExport("tb", **kwargs)
