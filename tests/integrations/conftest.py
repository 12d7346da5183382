"""The callback tests read event files back with the export tests' reader."""

import sys
from pathlib import Path

EXPORT_TESTS = str(Path(__file__).resolve().parents[1] / "export")
if EXPORT_TESTS not in sys.path:
    sys.path.append(EXPORT_TESTS)
