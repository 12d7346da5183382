"""Benchmark statscope.nn on CPU: HN against torch's BatchNorm2d, and fused against unfused inference.

Reports ratios measured in one run, interleaving the contenders so that load from other processes
hits both alike. Times are process CPU time (``time.process_time``, all torch threads summed),
which other jobs on a shared machine inflate far less than wall time. Run: ``python benchmarks/bench_nn.py [--threads 2] [--compile]``.
"""

import argparse
import statistics
import time

import torch
from torch import nn

from statscope.nn import fuse, make_norm

SHAPE = (32, 64, 32, 32)


def _time(fn, repeats):
    samples = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        samples.append(time.process_time() - start)
    return statistics.median(samples)


def _interleaved(fns, rounds, repeats):
    """Median seconds per call of each function, measured in alternating rounds."""
    for fn in fns.values():
        fn()
        fn()
    results = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            results[name].append(_time(fn, repeats))
    return {name: statistics.median(values) for name, values in results.items()}


def forward_backward(layer, x):
    def step():
        x.grad = None
        layer(x).sum().backward()
    return step


def norm_timings(compiled, rounds, repeats):
    x = torch.randn(SHAPE, requires_grad=True)
    layers = {"torch BatchNorm2d": nn.BatchNorm2d(SHAPE[1]), "bn": make_norm("bn", SHAPE[1]),
              "hn": make_norm("hn", SHAPE[1]), "hn_g32": make_norm("hn_g32", SHAPE[1]),
              "bn+en": make_norm("bn+en", SHAPE[1]), "gn": make_norm("gn", SHAPE[1]),
              "sn": make_norm("sn", SHAPE[1])}
    if compiled:
        layers = {name: torch.compile(layer) for name, layer in layers.items()}
    return _interleaved({n: forward_backward(m, x) for n, m in layers.items()}, rounds, repeats)


def fusion_timings(rounds, repeats):
    torch.manual_seed(0)
    blocks = []
    for cin, cout in ((3, 64), (64, 64), (64, 64), (64, 64)):
        blocks += [nn.Conv2d(cin, cout, 3, padding=1), make_norm("hn", cout), nn.ReLU()]
    model = nn.Sequential(*blocks)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    model.eval()
    fused = fuse(model)
    x = torch.randn(8, 3, 32, 32)
    error = (fused(x) - model(x)).abs().max().item()
    with torch.no_grad():
        times = _interleaved({"unfused": lambda: model(x), "fused": lambda: fused(x)},
                             rounds, repeats)
    return times, error


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time under torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, input {SHAPE}, CPU")
    modes = [False, True] if args.compile else [False]
    for compiled in modes:
        times = norm_timings(compiled, args.rounds, args.repeats)
        base = times["torch BatchNorm2d"]
        label = "torch.compile" if compiled else "eager"
        print(f"\nforward+backward, {label} (median CPU ms, ratio to torch BatchNorm2d {label})")
        for name, seconds in times.items():
            print(f"  {name:18s} {seconds * 1e3:8.2f} ms  {seconds / base:5.2f}x")
    times, error = fusion_timings(args.rounds, args.repeats)
    print("\ninference, 4 x (Conv2d 3x3 + HN + ReLU), batch 8x3x32x32 (median CPU ms)")
    for name, seconds in times.items():
        print(f"  {name:18s} {seconds * 1e3:8.2f} ms  {seconds / times['unfused']:5.2f}x")
    print(f"  max |fused - unfused| = {error:.2e}")


if __name__ == "__main__":
    main()
