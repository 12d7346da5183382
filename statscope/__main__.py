"""``python -m statscope``."""

from statscope.cli import entry

entry()
