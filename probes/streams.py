"""Ordering the writer thread's device work after the training thread's copies, on CUDA.

The training thread copies probed tensors into block buffers on its current stream, which may be
any stream (``with torch.cuda.stream(s):``). At each hand-over it records an event on that stream;
the writer thread makes its own side stream wait for the event before it reads, so its reductions
neither race the copies nor queue behind the training stream's later work. Nothing here waits on
the host. On the CPU every method is a no-op.
"""

from __future__ import annotations

import torch

__all__ = ["StreamOrder"]


class StreamOrder:
    """Events from the training thread's streams, and a side stream per device for the writer."""

    def __init__(self):
        self.devices: frozenset[torch.device] = frozenset()  # replaced, never mutated: read by both threads
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._side: dict[torch.device, torch.cuda.Stream] = {}

    def note(self, device: torch.device) -> None:
        """A probe buffers on ``device`` (training thread, when it allocates)."""
        if device.type == "cuda" and device not in self.devices:
            self.devices = self.devices | {device}

    def remember(self) -> None:
        """Remember the training thread's current streams (at each step's end)."""
        for d in self.devices:
            self._streams[d] = torch.cuda.current_stream(d)

    def mark(self, remembered: bool = False) -> tuple:
        """Events after the copies so far: on the current streams, or on the remembered ones
        (for a hand-over made by the writer thread while training is idle)."""
        events = []
        for d in self.devices:
            stream = self._streams.get(d) if remembered else torch.cuda.current_stream(d)
            if stream is None:
                continue
            ev = torch.cuda.Event()
            ev.record(stream)
            events.append((d, ev))
        return tuple(events)

    def side(self, device: torch.device):
        """The writer thread's stream on ``device`` (created on first use)."""
        if device not in self._side:
            self._side[device] = torch.cuda.Stream(device)
        return self._side[device]

    def wait(self, events: tuple) -> None:
        """Make the writer's side streams wait for ``events`` (writer thread)."""
        for d, ev in events:
            self.side(d).wait_event(ev)

    def writer_context(self):
        """Run the writer's device work on its side streams (a no-op context on the CPU)."""
        import contextlib

        stack = contextlib.ExitStack()
        for d in self.devices:
            stack.enter_context(torch.cuda.stream(self.side(d)))
        return stack
