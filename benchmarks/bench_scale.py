"""Stores sized for large models: writer throughput and memory, and bytes on disk, side by side.

    python benchmarks/bench_scale.py [--steps 10000] [--layers 80] [--channels 8192]
                                     [--keep 256] [--block 16]

Part 1 — an LLM-sized layout (80 norm layers × 8,192 channels, 4 statistics), moments fed straight
to the writer (no training), into a store that discards chunk writes (so the disk is not what is
measured): steps/s and the process's peak RSS after each quarter of the run (constant when the
writer's memory does not grow with steps), with ``neurons=keep`` per-step columns per layer and
window summaries of every channel, against all channels per step.

Part 2 — on-disk bytes per 10^4 steps of a small run on the real disk, with and without the size
controls, against the formula of docs/scale.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from contextlib import contextmanager

import numpy as np

import statscope.writer_arrays as W
from statscope.store import Layout, ProbeInfo
from statscope.writer import RunWriter


@contextmanager
def discarding_store():
    """Make the writer's stores keep metadata documents only (chunk writes are dropped)."""
    from zarr.storage import MemoryStore

    class Discard(MemoryStore):
        async def set(self, key, value, byte_range=None):
            if key.endswith("zarr.json"):
                await super().set(key, value)

    real = W.zarr_store
    W.zarr_store = lambda path, read_only=True: Discard()
    try:
        yield
    finally:
        W.zarr_store = real


def layout(layers: int, channels: int, keep: int | None) -> Layout:
    units = None if keep is None or keep >= channels else tuple(range(keep))
    return Layout(tuple(ProbeInfo(f"blocks.{i}.norm", f"blocks.{i}.norm", "LayerNorm", "input",
                                  -1, channels, 1, None, units) for i in range(layers)))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def throughput(args, keep: int | None) -> list[tuple[int, float, float]]:
    lay = layout(args.layers, args.channels, keep)
    rng = np.random.default_rng(0)
    c = lay.n_channels
    base = {s: rng.normal(size=(args.block, c)).astype(np.float32) for s in ("bn_mean", "bn_std")}
    base.update({s: rng.normal(size=(args.block, args.layers)).astype(np.float32)
                 for s in ("en_mean", "en_std")})
    count = np.full((args.block, args.layers), 4096, np.int64)
    out = []
    with discarding_store(), tempfile.TemporaryDirectory() as tmp:
        writer = RunWriter(os.path.join(tmp, "run"), lay, flush_seconds=float("inf"),
                           chunk_steps=1024)
        t0 = time.perf_counter()
        for first in range(0, args.steps, args.block):
            steps = np.arange(first, first + args.block)
            writer.append(steps, count, base)
            if (first // args.block + 1) % max(1, args.steps // (4 * args.block)) == 0:
                out.append((first + args.block, (first + args.block) / (time.perf_counter() - t0),
                            peak_rss_mb()))
        writer.close()
    return out


def disk_bytes(steps: int, layers: int, channels: int, keep: int | None, window: int | None):
    lay = layout(layers, channels, keep)
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "run")
        writer = RunWriter(path, lay, flush_seconds=float("inf"), window_steps=window)
        for first in range(0, steps, 128):
            k = min(128, steps - first)
            data = {s: (1 + np.cumsum(rng.normal(scale=1e-3, size=(k, lay.n_channels)), 0))
                    .astype(np.float32) for s in ("bn_mean", "bn_std")}
            data.update({s: rng.normal(size=(k, layers)).astype(np.float32)
                         for s in ("en_mean", "en_std")})
            writer.append(np.arange(first, first + k), np.full((k, layers), 64), data)
        writer.close()
        files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
        return len(files), sum(os.path.getsize(f) for f in files)


def formula(steps: int, layers: int, channels: int, keep: int | None, window: int | None) -> int:
    """docs/scale.md: raw bytes of a run (before compression)."""
    kept = layers * (channels if keep is None else min(keep, channels))
    per_step = 4 * (2 * kept + 2 * layers) + 8 * layers + 8
    per_window = 4 * 2 * (2 * layers * channels + 2 * layers) + 8 * layers + 8
    return steps * per_step + (-(-steps // window) * per_window if window else 0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--channels", type=int, default=8192)
    ap.add_argument("--keep", type=int, default=256)
    ap.add_argument("--block", type=int, default=16)
    args = ap.parse_args(argv)
    print(f"Part 1: {args.layers} layers × {args.channels} channels, blocks of {args.block} "
          f"steps, writes discarded")
    for keep in (args.keep, None):
        label = f"neurons={keep}" if keep else "all channels"
        for n, rate, rss in throughput(args, keep):
            print(f"  {label:<16} after {n:>6} steps: {rate:8.1f} steps/s, peak RSS {rss:7.0f} MB")
    print("Part 2: bytes per 10^4 steps on disk (8 layers × 1024 channels, 2,000 steps written)")
    print(f"  {'configuration':<34}{'objects':>9}{'MB':>9}{'formula MB':>12}{'ratio':>7}")
    for keep, window in ((None, None), (None, 200), (64, 200)):
        n, b = disk_bytes(2000, 8, 1024, keep, window)
        f = formula(2000, 8, 1024, keep, window)
        label = f"neurons={keep or 'all'}, window_steps={window}"
        print(f"  {label:<34}{n * 5:>9}{b * 5 / 1e6:>9.2f}{f * 5 / 1e6:>12.2f}{b / f:>7.2f}")


if __name__ == "__main__":
    main()
