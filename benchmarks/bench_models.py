"""Probe overhead on real models: plain and probed copies trained side by side, ABBA.

    python benchmarks/bench_models.py [--device cpu|cuda] [--rows NAME ...] [--rounds 7]
        [--block-seconds 0.6] [--threads 1] [--contenders statscope generic]
        [--compile [BACKEND]]
    python benchmarks/bench_models.py --candidates [--device cpu|cuda]

Each row builds one model, copies it once per contender (same weights), and trains every copy on
the same in-memory batches with SGD (momentum 0.9). The copies take turns in blocks of steps,
in the order A B C … C B A within a round (so drift within a round affects all alike; the
contenders B, C, … turn places from round to round, the plain copy A stays first); the ratio
of a contender in a round is its two blocks' time over the plain copy's two blocks'. The table
shows per row the plain ms/step and, per contender, the median ratio over rounds with its
spread (min–max), and the median ratio of the training thread's CPU time (``thread_time``), which
load from other processes disturbs less (it leaves out the time the thread waits for the GIL or a
core). Contenders:

- ``statscope``: ``statscope.record`` with its defaults (the BatchNorm fast path where it
  applies);
- ``generic``: the same with the BatchNorm fast path switched off (every probe reduces the tensor
  itself), to show what the fast path buys;
- ``pyprobe``: ``statscope`` with the BatchNorm fast path's probe in Python instead of its C++
  probe (``statscope/csrc/bn_probe.cpp``), as without a compiler: what the C++ probe buys;
- ``prehook``: a ten-line forward pre-hook that computes ``var_mean`` over every dim but the
  channels into a preallocated buffer, the issue's strawman;
- ``nowriter``: ``statscope`` whose writer thread drops every block unread (nothing reaches the
  store; BatchNorm probes on the CPU skip the extra mean sum, as the writer decides for rows with
  a small |mean|/std, as every row here has): the difference to ``statscope`` is what the writer
  costs the training thread, through the GIL and the shared cores;
- ``thread``: ``statscope`` with ``writer="thread"``: the store is written by the writer
  thread itself instead of a writer process (the default before 2026-11-28); the difference
  to ``statscope`` is what the zarr work costs training through the GIL;
- ``neighbour``: no probes; while it trains, another process spins a pure-Python loop (on
  another core where there is one): what any background work, the writer's included, can cost
  the training thread on this machine through cores that share a physical core, caches or
  memory bandwidth (on the 2-vCPU VM of docs/performance.md it cost the FC net 3–18 %);
- ``raw64``: ``statscope`` with ``raw_bytes=64 MiB`` (default 16 MiB): tensors up to 512 KiB
  are copied into the block buffer each step and reduced by the writer thread per block instead
  of per step on the training thread.

With ``--compile``, every copy (the plain one too) trains through ``torch.compile`` of its model
(inductor unless a backend is named), compiled after the probes are attached; the probes then
run inside the compiled graph (:mod:`statscope.probes.compiled`).

For the statscope contenders the table also shows the time inside the probes on the training
thread (``Recorder.probe_seconds``) and the writer thread's CPU time, in µs per step.

CPU rows: a small BasicBlock ResNet (32 px, channels_last) at batch size 8 and 64, a 2-layer
``nn.TransformerEncoder`` (d 128, 4 heads, batch 16 × 64 tokens), the paper's FC net at batch
size 4 and 128, and the project's CIFAR ResNet-18 at batch size 8. CUDA adds torchvision
``resnet18`` (224 px, bs 8, fp32), ``resnet50`` (channels_last, bf16 autocast, bs 64 and 256)
and timm ``vit_small_patch16_224`` (bf16 autocast, bs 128) where those packages import; rows
whose package is missing are skipped with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from bench_probes import fc_net  # the paper's FC net, as bench_probes times it (same folder)


@dataclass(frozen=True)
class Row:
    """One benchmark row: how to build the model and its batches."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    channels_last: bool = False
    autocast: torch.dtype | None = None
    devices: tuple[str, ...] = ("cpu", "cuda")


def basic_resnet(widths=(16, 32, 64), blocks=2, classes=10) -> nn.Module:
    """A small CIFAR-style ResNet of BasicBlocks (ResNet-14 at the defaults)."""

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = nn.Sequential()
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                           nn.BatchNorm2d(cout))

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + self.short(x))

    layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    cin = widths[0]
    for i, w in enumerate(widths):
        for j in range(blocks):
            layers.append(Block(cin, w, 2 if i and not j else 1))
            cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Token embedding, a 2-layer ``nn.TransformerEncoder`` (d 128) and a mean-pooled head."""

    def __init__(self, d=128, layers=2, vocab=1000, classes=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def images(bs, px=32, classes=10):
    return lambda g: (torch.randn(bs, 3, px, px, generator=g),
                      torch.randint(0, classes, (bs,), generator=g))


def _cifar_resnet18():
    from statscope.experiments.cifar_resnet import resnet18

    return resnet18("bn")


def _torchvision(name):
    def build():
        import torchvision

        return getattr(torchvision.models, name)(num_classes=1000)

    return build


def _timm_vit():
    import timm

    return timm.create_model("vit_small_patch16_224", num_classes=1000)


ROWS = [
    Row("small ResNet bs 8", basic_resnet, images(8), channels_last=True),
    Row("small ResNet bs 64", basic_resnet, images(64), channels_last=True),
    Row("TransformerEncoder 16x64", Encoder,
        lambda g: (torch.randint(0, 1000, (16, 64), generator=g),
                   torch.randint(0, 10, (16,), generator=g))),
    Row("FC net bs 4", fc_net, lambda g: (torch.randn(4, 784, generator=g),
                                          torch.randint(0, 10, (4,), generator=g))),
    Row("FC net bs 128", fc_net, lambda g: (torch.randn(128, 784, generator=g),
                                            torch.randint(0, 10, (128,), generator=g))),
    Row("CIFAR ResNet-18 bs 8", _cifar_resnet18, images(8), devices=("cpu",)),
    Row("CIFAR ResNet-18 bs 128", _cifar_resnet18, images(128), devices=("cuda",)),
    Row("resnet18 224px bs 8 fp32", _torchvision("resnet18"), images(8, 224, 1000),
        devices=("cuda",)),
    Row("resnet50 bs 64 bf16 CL", _torchvision("resnet50"), images(64, 224, 1000),
        channels_last=True, autocast=torch.bfloat16, devices=("cuda",)),
    Row("resnet50 bs 256 bf16 CL", _torchvision("resnet50"), images(256, 224, 1000),
        channels_last=True, autocast=torch.bfloat16, devices=("cuda",)),
    Row("vit_small bs 128 bf16", _timm_vit, images(128, 224, 1000), autocast=torch.bfloat16,
        devices=("cuda",)),
]


class PreHook:
    """The issue's strawman: ``var_mean`` of every norm input into a preallocated buffer."""

    def __init__(self, model: nn.Module, steps: int = 128):
        from statscope.probes.selection import select

        self.handles, self.slot, self.steps = [], 0, steps
        for t in select(model):
            buf = {}

            def hook(module, args, t=t, buf=buf):
                x = args[0].detach()
                dims = tuple(d for d in range(x.ndim) if d != t.channel_dim % x.ndim)
                var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
                if "b" not in buf:
                    buf["b"] = torch.empty(self.steps, 2, mean.numel(), device=x.device)
                buf["b"][self.slot % self.steps, 0].copy_(mean)
                buf["b"][self.slot % self.steps, 1].copy_(var)

            self.handles.append(t.module.register_forward_pre_hook(hook))

    def step(self):
        self.slot += 1

    def close(self):
        for h in self.handles:
            h.remove()


def _spin(go, stop) -> None:
    while not stop.is_set():
        if not go.wait(0.05):
            continue
        deadline = time.perf_counter() + 0.002
        x = 0
        while time.perf_counter() < deadline:
            x = (x * 31 + 7) % 1000003


class Neighbour:
    """A process that spins a pure-Python loop while this context is entered."""

    def __init__(self):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._go, self._stop = ctx.Event(), ctx.Event()
        self._proc = ctx.Process(target=_spin, args=(self._go, self._stop), daemon=True)
        self._proc.start()

    def __enter__(self):
        self._go.set()

    def __exit__(self, *exc):
        self._go.clear()

    def close(self) -> None:
        self._stop.set()
        self._proc.join(5)


class Arm:
    """One copy of the model, its optimizer and its instrumentation."""

    def __init__(self, name: str, model: nn.Module, row: Row, device: str, tmp: str,
                 backend: str | None = None):
        self.name, self.model, self.row, self.device = name, model, row, device
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.rec = self.hook = self.neighbour = None
        self._generic = contextlib.nullcontext()
        if name in ("statscope", "generic", "nowriter", "raw64", "thread", "pyprobe"):
            import statscope

            if name == "generic":
                from statscope.probes import hooks, recorder

                self._generic = _no_fast_path(recorder, hooks)
            elif name == "pyprobe":
                from statscope.probes import hooks

                self._generic = _python_probe(hooks)
            # raw64: buffer tensors up to 64 MiB per probe and block raw (default 16 MiB), so
            # that more probes take one copy per step and leave the reduction to the writer
            extra = {"raw_bytes": 64 << 20} if name == "raw64" else {}
            if name == "thread":
                extra = {"writer": "thread"}
            with self._generic:
                self.rec = statscope.record(model, f"{tmp}/{name}", overwrite=True,
                                            **extra).start()
            if name == "nowriter":
                self.rec._worker.filer.file = _dropper(self.rec._worker.filer)
                for cap in self.rec.captures:  # what a writer decides for these rows
                    cap.sum_bn_mean = False
        elif name == "prehook":
            self.hook = PreHook(model)
        elif name == "neighbour":
            self.neighbour = Neighbour()
        # compiled after the probes are attached, as statscope.record's docs ask
        self.forward = torch.compile(model, backend=backend) if backend else model

    def steps(self, batches, n: int, first: int) -> None:
        with self.neighbour or contextlib.nullcontext():
            self._steps(batches, n, first)

    def _steps(self, batches, n: int, first: int) -> None:
        loss_fn = nn.CrossEntropyLoss()
        ac = (torch.autocast(self.device, dtype=self.row.autocast) if self.row.autocast
              else contextlib.nullcontext())
        for i in range(first, first + n):
            x, y = batches[i % len(batches)]
            with ac:
                loss = loss_fn(self.forward(x), y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if self.rec is not None:
                self.rec.log(loss=loss)
            if self.hook is not None:
                self.hook.step()

    def close(self) -> None:
        if self.rec is not None:
            with warnings.catch_warnings():
                if self.name == "nowriter":  # its dropped blocks leave the store without steps
                    warnings.filterwarnings("ignore", "statscope: no training step was recorded")
                self.rec.close()
        if self.hook is not None:
            self.hook.close()
        if self.neighbour is not None:
            self.neighbour.close()

    def probe_us(self) -> float:
        return self.rec.probe_seconds * 1e6 if self.rec is not None else 0.0

    def writer_us(self) -> float:
        if self.rec is None:
            return 0.0
        return time.clock_gettime(time.pthread_getcpuclockid(self.rec._worker._thread.ident)) * 1e6


@contextlib.contextmanager
def _no_fast_path(*modules):
    # the path the run records (recorder) and the hook each probe gets (hooks)
    saved = [m.probe_path for m in modules]
    for m in modules:
        m.probe_path = lambda *a, **k: "generic"
    try:
        yield
    finally:
        for m, probe_path in zip(modules, saved):
            m.probe_path = probe_path


@contextlib.contextmanager
def _python_probe(hooks):
    # the recorder's BatchNorm probes keep their Python function, as where the kernels are off
    saved = hooks._install_native

    def python_only(rec, cap, cell, fallback, building):
        building[0] = False

    hooks._install_native = python_only
    try:
        yield
    finally:
        hooks._install_native = saved


def _dropper(filer):
    def file(block):
        if block.owned:
            for pair in block.buffers():
                filer.pool.give(pair)
        return []

    return file


def measure(row: Row, device: str, contenders: list[str], rounds: int, block_seconds: float,
            tmp: str, backend: str | None = None) -> dict:
    torch.manual_seed(0)
    base = row.build()
    fmt = torch.channels_last if row.channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        x, y = row.batch(gen)
        x = x.to(device)
        if x.is_floating_point() and x.ndim == 4:
            x = x.contiguous(memory_format=fmt)
        batches.append((x, y.to(device)))
    arms = []
    for name in ["plain", *contenders]:
        model = copy.deepcopy(base).to(device).to(memory_format=fmt).train()
        arms.append(Arm(name, model, row, device, tmp, backend))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        for arm in arms:  # warm-up: compilation, allocator, autotuning, the first block
            arm.steps(batches, 3, 0)
        sync()
        t0 = time.perf_counter()
        for arm in arms:
            arm.steps(batches, 3, 0)
        sync()
        per_step = (time.perf_counter() - t0) / (3 * len(arms))
        n = max(2, int(block_seconds / per_step))
        for arm in arms:
            arm.steps(batches, n, 3)
        sync()
        times = {a.name: [] for a in arms}
        cpu = {a.name: [] for a in arms}
        probe = {a.name: 0.0 for a in arms}
        writer = {a.name: 0.0 for a in arms}
        first = 3 + n
        for r in range(rounds):
            elapsed = {a.name: 0.0 for a in arms}
            used = {a.name: 0.0 for a in arms}
            # the contenders' order turns each round, so that none always runs next to the plain
            # copy or twice in a row: a contender's place in a round may change its time (on the
            # FC net at bs 4 three identical contenders differed by up to 1.5 points in one run)
            k = r % (len(arms) - 1)
            order = arms[:1] + arms[1 + k:] + arms[1:1 + k]
            for arm in order + order[::-1]:
                t0, c0 = time.perf_counter(), time.thread_time()
                p0, w0 = arm.probe_us(), arm.writer_us()
                arm.steps(batches, n, first)
                sync()
                elapsed[arm.name] += time.perf_counter() - t0
                used[arm.name] += time.thread_time() - c0
                probe[arm.name] += arm.probe_us() - p0
                writer[arm.name] += arm.writer_us() - w0
            first += n
            for k in elapsed:
                times[k].append(elapsed[k] / (2 * n))
                cpu[k].append(used[k] / (2 * n))
    finally:
        for arm in arms:
            arm.close()
    plain = times["plain"]
    steps = 2 * n * rounds
    out = {"plain_ms": statistics.median(plain) * 1e3, "steps_per_block": n}
    for name in contenders:
        ratios = [b / a for a, b in zip(plain, times[name])]
        out[name] = (statistics.median(ratios), min(ratios), max(ratios))
        out[name + ":cpu"] = statistics.median(b / a for a, b in zip(cpu["plain"], cpu[name]))
        out[name + ":probe"] = probe[name] / steps
        out[name + ":writer"] = writer[name] / steps
    return out


def candidates(device: str, repeats: int = 30) -> None:
    """Per-step reductions of one probed tensor, timed alone: µs per call (the fastest fifth of
    ``repeats`` blocks) and the largest error of the std against float64, in stds."""
    import statscope.probes.reduce as R

    def shifted_sums(x2):
        x0 = x2[:8].median(0).values.float()
        s = x0.abs().clamp_min(1.0)
        u = torch.sub(x2, x0).div_(s)
        return x0, s, u.sum(0), u.square_().sum(0)

    compiled = None
    try:
        compiled = torch.compile(shifted_sums, dynamic=False)
    except Exception as exc:  # noqa: BLE001 - a missing compiler is a result here
        print(f"torch.compile unavailable: {exc!r}")

    ways = {
        "var_mean(x.float()) (before)": lambda x2: torch.var_mean(x2.float(), 0, correction=0),
        "step_entry (statscope now)": lambda x2: R.step_entry(x2, -1, 2),
        "shifted sums, plain ops": shifted_sums,
        "copy into a buffer (raw)": lambda x2: x2.float().clone(),
        "batch_norm_update_stats": lambda x2: torch.batch_norm_update_stats(x2, None, None, 0.),
    }
    if device == "cuda":
        ways["batch_norm_stats"] = lambda x2: torch.batch_norm_stats(x2, 1e-30)
    if compiled is not None:
        ways["shifted sums, torch.compile"] = compiled
    shapes = {"small ResNet bs 8, stage 1 (8·32·32, 16)": (8 * 32 * 32, 16),
              "TransformerEncoder LN input (16·64, 128)": (16 * 64, 128),
              "ViT-S LN input (128·197, 384)": (128 * 197, 384)}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    print("| tensor | dtype | " + " | ".join(ways) + " |")
    print("|---|---|" + "---|" * len(ways))
    for label, shape in shapes.items():
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(0)
            x = (torch.randn(shape, generator=gen) * 3 + 100).to(device=device, dtype=dtype)
            ref = x.double().std(0, correction=0)
            cells = []
            for name, fn in ways.items():
                try:
                    out = fn(x)
                    sync()
                    n = 20
                    best = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        for _ in range(n):
                            fn(x)
                        sync()
                        best.append((time.perf_counter() - t0) / n * 1e6)
                    err = _std_error(name, out, x, ref)
                    cells.append(f"{statistics.median(sorted(best)[:max(1, repeats // 5)]):.0f}"
                                 + (f" ({err:.0e})" if err is not None else ""))
                except RuntimeError as exc:
                    cells.append(f"n/a ({type(exc).__name__})")
            print(f"| {label} | {str(dtype).split('.')[-1]} | " + " | ".join(cells) + " |",
                  flush=True)


def _std_error(name, out, x, ref):
    import statscope.probes.reduce as R

    if name.startswith("step_entry"):
        std = torch.from_numpy(R.entry_moments([out], x.shape[1], 2)[1][0]).sqrt()
    elif name.startswith("shifted"):
        x0, s, s1, s2 = (t.double().cpu() for t in out)
        a = s1 / x.shape[0]
        std = ((s2 / x.shape[0] - a * a).clamp_min(0) * s * s).sqrt()
    elif name.startswith("var_mean") or name == "batch_norm_update_stats":
        v = out[0] if name.startswith("var_mean") else out[1]
        std = v.double().cpu().clamp_min(0).sqrt()
    elif name == "batch_norm_stats":
        std = 1 / out[1].double().cpu()
    else:
        return None
    return float(((std - ref.cpu()).abs() / ref.cpu()).max())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--rows", nargs="*", help="substrings of row names to run (default: all)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--block-seconds", type=float, default=0.6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--contenders", nargs="+", default=["statscope", "generic"],
                    choices=("statscope", "generic", "pyprobe", "prehook", "nowriter", "raw64", "thread",
                             "neighbour"))
    ap.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                    help="time every arm's model under torch.compile (default backend inductor)")
    ap.add_argument("--candidates", action="store_true",
                    help="time the per-step reductions of one tensor instead of the models")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.candidates:
        candidates(args.device)
        return
    where = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() \
        or platform.machine()
    print(f"torch {torch.__version__}, Python {sys.version.split()[0]}, {where}, "
          f"{args.threads} torch thread(s), {args.rounds} rounds of blocks of ~"
          f"{args.block_seconds} s" + (f", torch.compile({args.compile!r})" if args.compile
                                         else ""))
    head = " | ".join(f"{c} wall (min–max) | train CPU | probes µs | writer µs"
                      for c in args.contenders)
    print(f"| row | plain ms/step | {head} |")
    print("|---|---|" + "---|---|---|---|" * len(args.contenders))
    with tempfile.TemporaryDirectory() as tmp:
        for row in ROWS:
            if args.device not in row.devices:
                continue
            if args.rows and not any(s in row.name for s in args.rows):
                continue
            try:
                res = measure(row, args.device, args.contenders, args.rounds,
                              args.block_seconds, tmp, args.compile)
            except ImportError as exc:
                print(f"| {row.name} | skipped: {exc} |")
                continue
            cells = " | ".join(f"{res[c][0]:.3f}× ({res[c][1]:.2f}–{res[c][2]:.2f}) | "
                               f"{res[c + ':cpu']:.3f}× | {res[c + ':probe']:.0f} | "
                               f"{res[c + ':writer']:.0f}" for c in args.contenders)
            print(f"| {row.name} | {res['plain_ms']:.2f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
