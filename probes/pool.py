"""Reusable device buffers for blocks of steps, bounded in bytes per device.

The training thread takes buffers when a probe starts a block (or changes shape), the writer
thread gives them back once it has read them. Each buffer travels with the list of its row
views, made once: creating K views per block costs as much on the training thread as the copies
themselves at small batch sizes. A buffer that would take a device over its budget is refused
(the probe then reduces each step at once instead of buffering it raw); free buffers of shapes not
asked for lately are released first, so shapes that change step after step (dynamic padding) do
not pile up.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

__all__ = ["BufferPool", "Pair"]

Pair = tuple[torch.Tensor, list[torch.Tensor]]


class BufferPool:
    """Buffers by (shape, dtype, device), shared by the training and the writer thread.

    Args:
        budget: the most bytes of buffers, in use and free, held per device.
    """

    def __init__(self, budget: int):
        self.budget = int(budget)
        self._lock = threading.Lock()
        self._free: OrderedDict[tuple, list[Pair]] = OrderedDict()
        self._held: dict[torch.device, int] = {}

    def held(self, device: torch.device) -> int:
        """Bytes of buffers this pool holds on ``device`` (in use or free)."""
        return self._held.get(device, 0)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
             ) -> Pair | None:
        """A buffer of this shape: a free one, or a new one within the budget, else None."""
        key = (tuple(shape), dtype, device)
        with self._lock:
            free = self._free.get(key)
            if free:
                self._free.move_to_end(key)
                return free.pop()
            size = _nbytes(shape, dtype)
            while self._held.get(device, 0) + size > self.budget and self._evict(device, key):
                pass
            if self._held.get(device, 0) + size > self.budget:
                return None
            self._held[device] = self._held.get(device, 0) + size
        buf = torch.empty(shape, dtype=dtype, device=device)
        return buf, list(buf.unbind(0))

    def give(self, pair: Pair) -> None:
        """Return a buffer taken from this pool; it is reused or released later."""
        buf = pair[0]
        key = (tuple(buf.shape), buf.dtype, buf.device)
        with self._lock:
            self._free.setdefault(key, []).append(pair)
            self._free.move_to_end(key)

    def _evict(self, device: torch.device, keep: tuple) -> bool:
        """Release the least recently used free buffer on ``device``; False when there is none."""
        for key, free in self._free.items():
            if key[2] == device and key != keep and free:
                buf = free.pop()[0]
                if not free:
                    del self._free[key]
                self._held[device] -= buf.nbytes
                return True
        return False


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n
