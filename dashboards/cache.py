"""The dashboard's memory: a least-recently-used cache bounded by the bytes it holds."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import xarray as xr

__all__ = ["ByteLRU"]


class ByteLRU:
    """A thread-safe least-recently-used cache bounded by the bytes of its numpy values.

    Args:
        max_bytes: evict the oldest entries once the values held exceed this many bytes.
    """

    def __init__(self, max_bytes: int = 512 * 2**20):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, default: Any = None) -> Any:
        """Return the value under ``key`` and mark it recently used, or ``default``."""
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value``; its size is the sum of ``nbytes`` of the arrays it holds."""
        size = _nbytes(value)
        with self._lock:
            if key in self._items:
                self._bytes -= self._sizes.pop(key)
                del self._items[key]
            self._items[key] = value
            self._sizes[key] = size
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._items) > 1:
                old, _ = self._items.popitem(last=False)
                self._bytes -= self._sizes.pop(old)

    def drop(self, predicate: Callable[[Hashable], bool]) -> None:
        """Remove every entry whose key satisfies ``predicate``."""
        with self._lock:
            for key in [k for k in self._items if predicate(k)]:
                del self._items[key]
                self._bytes -= self._sizes.pop(key)


def _nbytes(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, xr.Dataset):
        return int(value.nbytes)
    size = getattr(value, "nbytes", None)  # results that say what they hold
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        return int(size)
    # Figures and tables: count a megabyte each, so that many of them still evict.
    return 2**20
