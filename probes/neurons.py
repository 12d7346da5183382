"""Which channels of a probe keep per-step columns (``record(..., neurons=...)``).

Every channel enters the EN statistics and the window summaries; a wide model's long run may keep
the per-step series of a subset only. The chosen indices are stored with the probe (``units``),
so every reader and analysis knows which channels the per-step columns are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from statscope.errors import StatscopeError

__all__ = ["choose_units", "check_spec"]


def check_spec(spec: Any, where: str = "neurons") -> None:
    """Raise StatscopeError unless ``spec`` is ``"all"``/None, a positive int k (the first k), or
    ``("random", k)`` / ``("random", k, seed)``."""
    if spec is None or spec == "all":
        return
    if isinstance(spec, bool):
        pass
    elif isinstance(spec, int) and spec >= 1:
        return
    elif isinstance(spec, tuple) and len(spec) in (2, 3) and spec[0] == "random" \
            and isinstance(spec[1], int) and not isinstance(spec[1], bool) and spec[1] >= 1 \
            and (len(spec) == 2 or (isinstance(spec[2], int) and not isinstance(spec[2], bool)
                                    and spec[2] >= 0)):
        return
    raise StatscopeError(f"{where}={spec!r}: expected 'all', a positive int k (the first k "
                         "channels), ('random', k) or ('random', k, seed), seed ≥ 0")


def choose_units(spec: Any, channels: int, name: str) -> tuple[int, ...] | None:
    """The kept channel indices of a probe with ``channels`` channels, increasing; None for all.

    Args:
        spec: see :func:`check_spec`. A random choice is seeded by ``seed`` (default 0) and the
            probe's name, so reruns and resumes keep the same channels.
        channels: the probe's channels.
        name: the probe's name.

    Example:
        >>> choose_units(3, 8, "bn1")
        (0, 1, 2)
        >>> len(choose_units(("random", 4, 7), 64, "bn1"))
        4
    """
    check_spec(spec)
    if spec is None or spec == "all":
        return None
    k = spec if isinstance(spec, int) else spec[1]
    if k >= channels:
        return None
    if isinstance(spec, int):
        return tuple(range(k))
    seed = spec[2] if len(spec) == 3 else 0
    rng = np.random.default_rng([seed, *name.encode()])
    return tuple(int(u) for u in np.sort(rng.choice(channels, size=k, replace=False)))
