"""Probe overhead and writer throughput, measured side by side in one run.

    python benchmarks/bench_probes.py [--steps 3000] [--repeats 5] [--threads 1]

Prints, for the paper's 4-layer FC net (128 neurons, BatchNorm1d + ReLU) on CPU at batch size 4
and 128, the time of a training step with and without statscope's probes and their ratio (goal
<= 1.05), and the writer's throughput in steps/s for 512 neurons (goal >= 50,000). The training thread's CPU time and the writer thread's are shown
beside the wall time. Probed and
plain loops alternate, repeat after repeat; each ratio is the median over repeats of the ratio
within a pair, so drift of the machine affects both sides alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from torch import nn

import statscope
from statscope.store import Layout, ProbeInfo
from statscope.writer import RunWriter


def fc_net() -> nn.Module:
    layers, width = [], 784
    for _ in range(4):
        layers += [nn.Linear(width, 128), nn.BatchNorm1d(128), nn.ReLU()]
        width = 128
    return nn.Sequential(*layers, nn.Linear(128, 10))


def time_steps(bs: int, steps: int, probed: bool, tmp: str,
               device: str = "cpu") -> tuple[float, float, float, float]:
    """Seconds per step: wall, training-thread CPU, writer-thread CPU, and the CPU of every other
    thread of the process (zarr's I/O and event-loop threads, which encode and write the store)."""
    torch.manual_seed(0)
    model = fc_net().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    data = torch.randn(steps + 100, bs, 784, device=device)
    target = torch.randint(0, 10, (steps + 100, bs), device=device)
    loss_fn = nn.CrossEntropyLoss()
    rec = statscope.record(model, f"{tmp}/run", overwrite=True).start() if probed else None

    def step(i):
        loss = loss_fn(model(data[i]), target[i])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rec is not None:
            rec.log(loss=loss)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for i in range(100):
        step(i)
    sync()
    t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
    w0 = _thread_cpu(rec)
    for i in range(steps):
        step(100 + i)
    sync()
    elapsed, cpu = time.perf_counter() - t0, time.thread_time() - c0
    worker = _thread_cpu(rec) - w0
    others = max(0.0, time.process_time() - p0 - cpu - worker)
    if rec is not None:
        rec.close()
    return elapsed / steps, cpu / steps, worker / steps, others / steps


def _thread_cpu(rec) -> float:
    if rec is None:
        return 0.0
    return time.clock_gettime(time.pthread_getcpuclockid(rec._worker._thread.ident))


def writer_throughput(neurons: int, steps: int, tmp: str) -> float:
    layers = 4
    probes = tuple(ProbeInfo(f"l{i}", f"l{i}", "BatchNorm1d", "input", 1, neurons // layers)
                   for i in range(layers))
    layout = Layout(probes)
    rng = np.random.default_rng(0)
    block = 128
    stats = {s: rng.normal(size=(block, neurons)).astype(np.float32) for s in ("bn_mean", "bn_std")}
    stats.update({s: rng.normal(size=(block, layers)).astype(np.float32)
                  for s in ("en_mean", "en_std")})
    count = np.full((block, layers), 4)
    scalars = {"loss": rng.normal(size=block)}
    writer = RunWriter(f"{tmp}/writer", layout, overwrite=True)
    t0 = time.perf_counter()
    for first in range(0, steps, block):
        writer.append(np.arange(first, first + block), count, stats, scalars)
    writer.close()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {where}, {args.threads} thread(s), {args.steps} steps x "
          f"{args.repeats} repeats")
    with tempfile.TemporaryDirectory() as tmp:
        for bs in (4, 128):
            plain, probed = [], []
            for _ in range(args.repeats):
                plain.append(time_steps(bs, args.steps, False, tmp, args.device))
                probed.append(time_steps(bs, args.steps, True, tmp, args.device))
            med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
            ratio = lambda i: statistics.median(  # noqa: E731
                b[i] / a[i] for a, b in zip(plain, probed))
            print(f"FC net bs {bs:>3}: wall plain {med(plain, 0) * 1e3:.3f} ms/step, probed "
                  f"{med(probed, 0) * 1e3:.3f}, ratio {ratio(0):.3f}x | training-thread CPU "
                  f"plain {med(plain, 1) * 1e3:.3f}, probed {med(probed, 1) * 1e3:.3f}, ratio "
                  f"{ratio(1):.3f}x | writer thread {med(probed, 2) * 1e3:.3f} ms/step, other "
                  f"threads {med(probed, 3) * 1e3:.3f} ms/step")
        rates = [writer_throughput(512, 200_000, tmp) for _ in range(3)]
        print(f"writer, 512 neurons: {statistics.median(rates):,.0f} steps/s "
              f"(median of 3; goal >= 50,000)")


if __name__ == "__main__":
    main()
