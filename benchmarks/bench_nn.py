"""Whole training steps with statscope.nn norms against the torch norm each one generalizes.

    python benchmarks/bench_nn.py [--device cpu|cuda] [--threads 1] [--rounds 7] [--norms hn,gn]
                                  [--nets fc4,fc128,conv4,conv64] [--compile]

A step is forward, cross-entropy, backward and an SGD update (momentum 0.9) of one of two nets,
each with the norm after every hidden layer:

- ``fc``: the paper's §4.6 net, 784→128, 3×128→128 (Linear + norm + ReLU), 128→10, at batch
  size 4 and 128;
- ``conv``: Conv 3→32, Conv 32→32 (3×3, padding 1, + norm + ReLU) on 16×16 images, average
  pooling, Linear 32→10, at batch size 4 and 64.

Each statscope norm is timed against its counterpart (BN, EN, HN, their _G forms, SN and the
mixtures against ``BatchNorm1d/2d``; ``gn`` against ``GroupNorm``; ``ln`` against ``LayerNorm`` on
``(N, C)`` and ``GroupNorm(1, C)`` on images; ``in`` against ``InstanceNorm2d(affine=True)``) in
ABBA rounds: torch, statscope, statscope, torch, each block a fixed number of steps. The ratio of
a round is statscope's time over torch's; the table shows the median ratio over the rounds, the
lowest and highest, and the median ms per step of each. On the CPU, time is the training thread's
CPU time (``time.thread_time``), which other jobs on a shared machine inflate far less than wall
time; on CUDA it is wall time with a synchronize at the end of each block.
"""

import argparse
import statistics
import time

import torch
from torch import nn

from statscope.nn import make_norm

POOL = 32
"""Batches each net cycles through."""

NETS = {"fc4": ("fc", 4), "fc128": ("fc", 128), "conv4": ("conv", 4), "conv64": ("conv", 64)}
NORMS = ("bn", "gn", "ln", "in", "en", "en_g8", "hn", "hn_g8", "hn_g32", "sn", "bn+en",
         "bn+in+ln")
GOALS = {"bn": 1.05, "gn": 1.05, "ln": 1.05, "in": 1.05, "sn": 1.5, "bn+en": 1.5,
         "bn+in+ln": 1.5}
"""Goal of issue 15 per norm (1.15 for the rest)."""


def counterpart(name, channels, image):
    """The torch norm a statscope norm is timed against."""
    base = name.split("_g")[0]
    if base == "gn":
        return nn.GroupNorm(32 if "_g" not in name else int(name.split("_g")[1]), channels)
    if base == "ln":
        return nn.GroupNorm(1, channels) if image else nn.LayerNorm(channels)
    if base == "in":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.BatchNorm2d(channels) if image else nn.BatchNorm1d(channels)


def applies(name, kind):
    """Whether the norm is defined on the net's activations (IN and SN need spatial pixels)."""
    return kind == "conv" or name not in ("in", "sn", "bn+in+ln")


def build(kind, norm):
    """The net with ``norm(channels)`` after each hidden layer."""
    if kind == "fc":
        layers, width = [], 784
        for _ in range(4):
            layers += [nn.Linear(width, 128), norm(128), nn.ReLU()]
            width = 128
        return nn.Sequential(*layers, nn.Linear(128, 10))
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), norm(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), norm(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def stepper(model, kind, batch, device, compiled):
    """A function running one training step on fixed data."""
    torch.manual_seed(0)
    model = model.to(device).train()
    if compiled:
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # A pool of batches, one per step in turn: a single fixed batch lets training converge on it
    # and some gradients and momentum buffers decay into float32's denormal range, where every
    # SGD update (and any op touching them) runs several times slower on x86 (EN's FC step at
    # batch size 4 measured 1.49 ms on one fixed batch, 1.16 ms with denormals flushed).
    shape = (batch, 784) if kind == "fc" else (batch, 3, 16, 16)
    xs = torch.randn((POOL, *shape), device=device)
    ys = torch.randint(0, 10, (POOL, batch), device=device)
    loss_fn = nn.CrossEntropyLoss()
    turn = iter(range(1 << 62))

    def step():
        i = next(turn) % POOL
        x, y = xs[i], ys[i]
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return step


def block_time(step, steps, device):
    """Seconds per step over ``steps`` steps."""
    if device == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps
    start = time.thread_time()
    for _ in range(steps):
        step()
    return (time.thread_time() - start) / steps


def abba(reference, contender, rounds, device, budget):
    """Per-round ratios and per-step seconds of ``contender`` against ``reference``."""
    for step in (reference, contender):
        for _ in range(5):
            step()
    probe = block_time(reference, 5, device)
    steps = max(5, int(budget / max(probe, 1e-6)))
    ratios, times = [], ([], [])
    for _ in range(rounds):
        a1 = block_time(reference, steps, device)
        b1 = block_time(contender, steps, device)
        b2 = block_time(contender, steps, device)
        a2 = block_time(reference, steps, device)
        ratios.append((b1 + b2) / (a1 + a2))
        times[0].append((a1 + a2) / 2)
        times[1].append((b1 + b2) / 2)
    return ratios, times


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--budget", type=float, default=0.15,
                        help="seconds per timed block (default 0.15)")
    parser.add_argument("--norms", default=",".join(NORMS))
    parser.add_argument("--nets", default=",".join(NETS))
    parser.add_argument("--compile", action="store_true", help="torch.compile both nets")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name = (torch.cuda.get_device_name() if args.device == "cuda"
            else f"CPU, {args.threads} torch thread(s)")
    print(f"torch {torch.__version__}, {name}, {args.rounds} ABBA rounds"
          f"{', torch.compile' if args.compile else ''}")
    print("| net | norm | torch ms/step | statscope ms/step | ratio (median) | range | goal |")
    print("|---|---|---|---|---|---|---|")
    for net in args.nets.split(","):
        kind, batch = NETS[net]
        for norm in args.norms.split(","):
            if not applies(norm, kind):
                continue
            image = kind == "conv"
            reference = stepper(build(kind, lambda c, n=norm, i=image: counterpart(n, c, i)), kind,
                                batch,
                                args.device, args.compile)
            contender = stepper(build(kind, lambda c, n=norm: make_norm(n, c)), kind, batch,
                                args.device, args.compile)
            ratios, (ref, ours) = abba(reference, contender, args.rounds, args.device,
                                       args.budget)
            goal = GOALS.get(norm, 1.15)
            ratio = statistics.median(ratios)
            print(f"| {kind} bs {batch} | `{norm}` | {statistics.median(ref) * 1e3:.3f} | "
                  f"{statistics.median(ours) * 1e3:.3f} | **{ratio:.2f}×** | "
                  f"{min(ratios):.2f}–{max(ratios):.2f} | ≤ {goal:.2f} "
                  f"{'met' if ratio <= goal else 'missed'} |", flush=True)


if __name__ == "__main__":
    main()
