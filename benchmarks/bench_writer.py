"""What the writer process does per block, beside what the training step costs, in one run.

    python benchmarks/bench_writer.py [--rows "FC net bs 4" "small ResNet bs 8"] [--blocks 12]

For each row of ``bench_models.py`` (CPU), trains the model with a recorder whose writer runs in
the training process (``writer="thread"``), keeps each block as the writer process would receive
it (a pickled :class:`statscope.rows.Gathered`), and then replays those blocks through the
writer process's work, timing each part: unpickling, :func:`statscope.rows.compute_rows`,
:func:`statscope.rows.file_columns` and :meth:`statscope.writer.RunWriter.append` (window
summaries, the non-finite count, staging), and the CPU of all the process's threads until the store
is closed (zarr's writes included). Printed per block and per training step, with the ratio of the
writer's CPU to the plain training step's time measured in the same run: on a machine whose cores
are hyperthreads of one (the project's VM), that share of a core runs beside the training thread.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import tempfile
import time
import warnings

import torch

import statscope
from statscope import rows as R
from statscope.probes import worker
from statscope.writer import RunWriter

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_models import ROWS, Row  # noqa: E402 - the rows bench_models times (same folder)


def record_blocks(row: Row, blocks: int, tmp: str) -> tuple[list, float]:
    """Train ``row``'s model for ``blocks`` blocks of 128 steps with a recorder; return each block
    as the writer process receives it (pickled, with its columns and layout) and the plain step's
    seconds, timed first on a copy of the model."""
    got = []
    append = worker.Filer._append

    def keep(filer, gathered):
        got.append((pickle.dumps(gathered, protocol=5), dict(filer.column), filer.writer.layout))
        return append(filer, gathered)

    gen = torch.Generator().manual_seed(0)
    batches = [row.batch(gen) for _ in range(8)]
    if row.channels_last:
        batches = [(x.to(memory_format=torch.channels_last), y) for x, y in batches]
    loss_fn = torch.nn.CrossEntropyLoss()

    def train(model, n, rec=None):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for i in range(n):
            x, y = batches[i % len(batches)]
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if rec is not None:
                rec.log(loss=loss)

    model = row.build()
    if row.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train(model, 20)
    t0 = time.perf_counter()
    train(model, 128)
    plain = (time.perf_counter() - t0) / 128
    worker.Filer._append = keep
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rec = statscope.record(model, f"{tmp}/rec", writer="thread").start()
            train(model, 128 * blocks, rec)
            rec.close()
    finally:
        worker.Filer._append = append
    return got[2:], plain  # the first blocks: until the writer's first advice


def replay(blocks: list, tmp: str, times_over: int) -> tuple[dict[str, float], float]:
    """Median CPU seconds per block of each part of the writer process's work on its main
    thread, and the CPU seconds per block of all its threads (zarr's among them) from the first
    block to the store's close; the blocks replayed ``times_over`` times, so that the store's
    flushes come as often as in a run (every shard, ``chunk_steps`` rows)."""
    blocks = blocks * times_over
    layout = blocks[0][2]
    writer = RunWriter(f"{tmp}/replay", layout, overwrite=True)
    times: dict[str, list[float]] = {"unpickle": [], "compute_rows": [], "file_columns": [],
                                     "append": []}
    start = time.process_time()
    for data, column, _ in blocks:
        t0 = time.thread_time()
        gathered = pickle.loads(data)
        t1 = time.thread_time()
        rows = R.compute_rows(gathered)
        t2 = time.thread_time()
        steps, count, stats = R.file_columns(rows, column, layout)
        t3 = time.thread_time()
        writer.append(steps - steps[0] + writer.next_step, count, stats, rows.scalars)
        t4 = time.thread_time()
        for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[name].append(dt)
    writer.close()
    total = (time.process_time() - start) / len(blocks)
    return {name: statistics.median(v) for name, v in times.items()}, total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=["FC net bs 4", "FC net bs 128",
                                                      "small ResNet bs 8"])
    parser.add_argument("--blocks", type=int, default=12, help="blocks recorded")
    parser.add_argument("--times-over", type=int, default=10, help="replays of them")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 torch thread, blocks of 128 steps; the writer's parts: "
          "median CPU time of its main thread per block; all: CPU of all its threads per step, "
          "store writes and close included")
    print("| row | plain ms/step | unpickle | compute_rows | file_columns | append | all, µs/step "
          "| all / plain step |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.rows:
        row = next(r for r in ROWS if r.name.startswith(name) and "cpu" in r.devices)
        with tempfile.TemporaryDirectory() as tmp:
            blocks, plain = record_blocks(row, args.blocks, tmp)
            t, total = replay(blocks, tmp, args.times_over)
        per_step = total / 128
        print(f"| {row.name} | {plain * 1e3:.2f} | " + " | ".join(
            f"{t[k] * 1e3:.2f} ms" for k in ("unpickle", "compute_rows", "file_columns", "append"))
            + f" | {per_step * 1e6:.1f} | {per_step / plain:.3f} |", flush=True)


if __name__ == "__main__":
    main()
