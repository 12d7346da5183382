"""Symbolic links that leave the dashboard's folder: a run reached through one is not served."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["outside_links"]


def outside_links(path: str | os.PathLike, root: str | os.PathLike, *, most: int = 3) -> list[str]:
    """Entries of the run folder ``path`` that resolve outside ``root``, relative to ``path``.

    The folder itself counts (``"."``); below it, every symbolic link, at any depth, is
    resolved; folders reached through a link inside ``root`` are searched too (each once).
    Hard links cannot be told from ordinary files and are not detected.

    Args:
        path: a run folder.
        root: the folder nothing may resolve outside of (already resolved).
        most: stop after this many findings.

    Returns:
        Up to ``most`` relative names, e.g. ``["bn_mean/c/0/0"]``; empty when every entry stays
        inside ``root``.
    """
    root = Path(root)
    base = Path(path)
    if not base.resolve().is_relative_to(root):
        return ["."]
    found: list[str] = []
    seen: set[str] = set()
    stack = [base]
    while stack and len(found) < most:
        folder = stack.pop()
        real_folder = os.path.realpath(folder)
        if real_folder in seen:  # reached again through a link: searched once
            continue
        seen.add(real_folder)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            if e.is_symlink():
                real = os.path.realpath(e.path)
                if not Path(real).is_relative_to(root):
                    found.append(os.path.relpath(e.path, base))
                    if len(found) >= most:
                        break
                elif os.path.isdir(real):
                    stack.append(Path(e.path))
            elif e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
    return found
