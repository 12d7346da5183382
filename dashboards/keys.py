"""Names of runs and neurons as the dashboard writes and reads them: sort keys, neuron keys in
URLs (``"<layer>:<unit>"``), and each layer's positions along ``neuron``."""

from __future__ import annotations

import re

import numpy as np

from statscope.errors import StatscopeError

__all__ = ["natural_key", "neuron_key", "parse_neuron_key", "layer_slices"]


def natural_key(name: str) -> tuple:
    """Sort key that orders digits by value, so ``bs4`` comes before ``bs128``.

    Example:
        >>> sorted(["bs128", "bs4", "bs16"], key=natural_key)
        ['bs4', 'bs16', 'bs128']
    """
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t)
                 for t in re.split(r"(\d+)", name) if t)


def neuron_key(layer: str, unit: int) -> str:
    """Return the URL-safe key of a neuron, ``"<layer>:<unit>"``.

    Example:
        >>> neuron_key("fc1", 0)
        'fc1:0'
    """
    return f"{layer}:{int(unit)}"


def parse_neuron_key(key: str) -> tuple[str, int]:
    """Split a neuron key into ``(layer, unit)``; the layer may itself contain ``:``.

    Raises:
        StatscopeError: the key does not end in ``:<int>``.

    Example:
        >>> parse_neuron_key("block.0:in:3")
        ('block.0:in', 3)
    """
    layer, sep, unit = str(key).rpartition(":")
    if not sep or not layer or not unit.lstrip("-").isdigit():
        raise StatscopeError(f"neuron={key!r}: expected '<layer>:<unit>', e.g. 'fc1:0'")
    return layer, int(unit)


def layer_slices(layers: np.ndarray) -> dict[str, np.ndarray]:
    """Positions of each layer's neurons, in order of first appearance.

    Layers are contiguous in store order, so one comparison of neighbours finds them all
    (instead of one comparison of every neuron per layer).

    Example:
        >>> {k: v.tolist() for k, v in layer_slices(np.array(["a", "a", "b", "a"])).items()}
        {'a': [0, 1, 3], 'b': [2]}
    """
    layers = np.asarray(layers)
    if not layers.size:
        return {}
    starts = np.concatenate([[0], np.flatnonzero(layers[1:] != layers[:-1]) + 1, [layers.size]])
    out: dict[str, list[np.ndarray]] = {}
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
        out.setdefault(str(layers[a]), []).append(np.arange(a, b))
    return {k: np.concatenate(v) for k, v in out.items()}
