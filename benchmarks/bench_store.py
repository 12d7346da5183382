"""The run store's costs, side by side in one run: writer throughput, objects on disk, open time.

    python benchmarks/bench_store.py [--steps 100000] [--neurons 512] [--repeats 3]

Writes the same rows (blocks of 128 steps, as the recorder hands them over, flushed every 2048
steps) with three store configurations, alternating repeat after repeat:

- ``format 2``: what statscope writes (sharded, crc32c on every chunk and shard index, every chunk
  written);
- ``no crc32c``: the same without the checksums;
- ``format 1 layout``: unsharded 8192 × 64 chunks, no checksums (how statscope 0.1 stored runs).

Prints steps/s (median over repeats), the ratio to ``format 1 layout``, the objects and bytes per
10^5 steps, and the time of ``open_run`` (which lists the store once to find missing shards).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import contextmanager

import numpy as np

import statscope
import statscope.writer_arrays as W
from statscope.store import Layout, ProbeInfo
from statscope.writer import RunWriter


@contextmanager
def configuration(name: str):
    """Patch the writer to store arrays as ``name`` says (benchmark only)."""
    codecs, create = W._codecs, RunWriter._new_array

    def no_crc():
        from zarr.codecs import BloscCodec
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]

    def unsharded(self, name, shape, dtype, fill, dims):
        from zarr.codecs import BloscCodec
        chunks = (self.chunk_steps,) if len(shape) == 1 else (self.chunk_steps, self.neuron_chunk)
        if dims == ("neuron",):
            chunks = (1 << 16,)
        self._arrays[name] = self._group.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, dimension_names=dims,
            compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")], overwrite=True)

    try:
        if name == "no crc32c":
            W._codecs = no_crc
        elif name == "format 1 layout":
            RunWriter._new_array = unsharded
        yield
    finally:
        W._codecs, RunWriter._new_array = codecs, create


def write(path: str, steps: int, neurons: int, rng) -> float:
    layers = neurons // 128
    probes = tuple(ProbeInfo(f"l{i}", f"l{i}", "BatchNorm1d", "input", 1, 128) for i in range(layers))
    writer = RunWriter(path, Layout(probes), overwrite=True, flush_seconds=float("inf"))
    block = 128
    count = np.full((block, layers), 4, np.int64)
    spent = 0.0
    for first in range(0, steps, block):
        # fresh values for every block (repeated ones would compress unrealistically well),
        # made outside the timed part; statistics of a trained layer drift slowly: a random walk
        data = {s: (np.cumsum(rng.normal(scale=1e-3, size=(block, neurons)), 0) + 1)
                .astype(np.float32) for s in ("bn_mean", "bn_std")}
        data.update({s: rng.normal(size=(block, layers)).astype(np.float32)
                     for s in ("en_mean", "en_std")})
        loss = rng.random(block)
        t0 = time.perf_counter()
        writer.append(np.arange(first, first + block), count, data, {"loss": loss})
        if (first // block) % 16 == 15:
            writer.flush()  # the recorder flushes every few seconds
        spent += time.perf_counter() - t0
    t0 = time.perf_counter()
    writer.close()
    return spent + time.perf_counter() - t0


def footprint(path: str) -> tuple[int, int]:
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    return len(files), sum(os.path.getsize(f) for f in files)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--neurons", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    names = ("format 2", "no crc32c", "format 1 layout")
    times = {n: [] for n in names}
    sizes, opens = {}, {}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                path = os.path.join(tmp, name.replace(" ", "-"))
                with configuration(name):
                    times[name].append(write(path, args.steps, args.neurons, rng))
                sizes[name] = footprint(path)
                t0 = time.perf_counter()
                statscope.open_run(path)
                opens[name] = time.perf_counter() - t0
    base = statistics.median(times["format 1 layout"])
    per = 1e5 / args.steps
    print(f"{args.steps} steps × {args.neurons} neurons, blocks of 128, median of {args.repeats}")
    print(f"{'configuration':<18}{'steps/s':>10}{'time ratio':>12}{'objects/1e5':>13}"
          f"{'MB/1e5':>9}{'open_run s':>12}")
    for name in names:
        t = statistics.median(times[name])
        n, b = sizes[name]
        print(f"{name:<18}{args.steps / t:>10,.0f}{t / base:>12.3f}{n * per:>13,.0f}"
              f"{b * per / 1e6:>9.1f}{opens[name]:>12.3f}")


if __name__ == "__main__":
    main()
