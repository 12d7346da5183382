"""Start-up time of the ``statscope`` command: whole processes, timed from outside, side by side.

    python benchmarks/bench_startup.py [--repeats 10] [--baseline REV] [--tarpit]

Each contender is a whole command (Python start-up, imports, data, training, the store written)
run as a subprocess; wall time comes from a monotonic clock around it, CPU time (user + system)
from ``getrusage(RUSAGE_CHILDREN)``. Contenders of a pair run alternately, A B B A, so drift of
a shared machine hits both alike; the report gives medians and the median of the pairwise
ratios. Pairs:

- ``help``: ``statscope --help`` against ``python -c pass`` (the interpreter's own start-up).
- ``run 50, download remembered`` against ``run 50, download tried``: ``statscope run mnist-fc
  --max-steps 50`` with the dataset's download failure remembered in the cache (what every run
  after the first does offline) and with the marker removed before each run (the first run, and
  every run before statscope remembered failures). The mirrors are the real ones, so the
  difference is what this machine's network makes of them; ``--tarpit`` points them instead at a
  local server that accepts connections and never answers, as a firewall that drops packets does
  (each mirror then costs the download timeout, 30 s).
- ``floor``: ``python -c "import torch, torch._dynamo"`` against ``statscope run mnist-fc
  --max-steps 50`` (remembered): the share of a short run that is torch's own import. torch's
  optimizers import ``torch._dynamo`` on their first ``step()``, so no statscope change avoids it.
- with ``--baseline REV``: ``help`` and ``run 50`` (download remembered) against those of the git
  revision REV, exported with ``git archive`` to a temporary folder and put first on
  ``PYTHONPATH`` (a revision that does not remember failed downloads tries the mirrors at every
  run).

Without ``--baseline`` the commands run the installed ``statscope`` (this tree, when it is
installed with ``pip install -e .``), with a temporary cache.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = ".download-failed"
PAIRS = ("help", "run", "floor", "baseline")


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``cmd`` run to its end; its output is discarded."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def compare(name: str, a: tuple[str, callable], b: tuple[str, callable], repeats: int) -> None:
    """Run ``a`` and ``b`` (label, thunk returning (wall, cpu)) ABBA and print the medians."""
    runs = {0: [], 1: []}
    for r in range(repeats):
        for side in ((0, 1) if r % 2 == 0 else (1, 0)):
            runs[side].append((a, b)[side][1]())
    ratio = {k: statistics.median(x[k] / y[k] for x, y in zip(runs[0], runs[1])) for k in (0, 1)}
    print(f"\n{name}  ({repeats} runs each, medians)")
    for side, (label, _) in enumerate((a, b)):
        wall = statistics.median(w for w, _ in runs[side])
        cpu = statistics.median(c for _, c in runs[side])
        print(f"  {'AB'[side]}  {label:<44} wall {wall:7.2f} s   cpu {cpu:6.2f} s")
    print(f"  A/B  wall {ratio[0]:.3f}   cpu {ratio[1]:.3f}")


@contextlib.contextmanager
def tarpit():
    """A local TCP server that accepts connections and never answers; yields its URL."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def export(rev: str, into: Path) -> Path:
    """The git revision ``rev`` of this repository as an importable tree (``statscope.probes``
    and friends linked into the package, as the installed distribution maps them)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    for package in ("probes", "analyses", "dashboards"):
        (into / "statscope" / package).symlink_to(into / package)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="runs of each contender")
    parser.add_argument("--baseline", metavar="REV",
                        help="also compare with this git revision (e.g. a commit before a change)")
    parser.add_argument("--tarpit", action="store_true",
                        help="mirrors that accept and never answer, instead of the real ones")
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS),
                        help="which pairs to measure (default all; baseline needs --baseline)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        env = {**os.environ, "STATSCOPE_CACHE": str(tmp / "cache")}
        env.pop("STATSCOPE_DATA", None)
        if args.tarpit:
            url = stack.enter_context(tarpit())
            env["STATSCOPE_MNIST_URL"] = f"{url}a/ {url}b/"
        py = [sys.executable]
        run50 = ["-m", "statscope", "run", "mnist-fc", "--max-steps", "50", "-q", "--overwrite"]
        marker = tmp / "cache" / "mnist" / MARKER

        def command(argv, environment=env):
            return lambda: timed(py + argv, environment)

        def tried():
            marker.unlink(missing_ok=True)
            return timed(py + run50 + ["--out", str(tmp / "tried")], env)

        timed(py + run50 + ["--out", str(tmp / "warm")], env)  # warms caches, writes the marker
        if not marker.exists():
            print("note: the download succeeded or was not tried; the 'remembered' pair "
                  "compares equal runs")
        remembered = ("run 50, download remembered", command(run50 + ["--out", str(tmp / "r")]))
        if "help" in args.pairs:
            compare("help", ("statscope --help", command(["-m", "statscope", "--help"])),
                    ("python -c pass", command(["-c", "pass"])), args.repeats)
        if "run" in args.pairs:
            compare("run 50", remembered, ("run 50, download tried", tried), args.repeats)
        if "floor" in args.pairs:
            compare("floor", ("python -c 'import torch, torch._dynamo'",
                              command(["-c", "import torch, torch._dynamo"])), remembered,
                    args.repeats)
        if args.baseline and "baseline" in args.pairs:
            old = {**env, "PYTHONPATH": str(export(args.baseline, tmp / "baseline"))}
            compare(f"help against {args.baseline}",
                    ("statscope --help (this tree)", command(["-m", "statscope", "--help"])),
                    (f"statscope --help ({args.baseline})",
                     command(["-m", "statscope", "--help"], old)), args.repeats)
            compare(f"run 50 against {args.baseline}", remembered,
                    (f"run 50 ({args.baseline})",
                     command(run50 + ["--out", str(tmp / "old")], old)), args.repeats)


if __name__ == "__main__":
    main()
