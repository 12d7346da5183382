"""Failure paths of real ``statscope`` processes: SIGKILL at chosen and random moments followed by
``--resume``, and sweep workers whose parent is killed.

Every run here is a subprocess (``python -m statscope``), killed for real. The moments are either
events watched from outside (the store's root ``zarr.json`` appears, its commit marker first
moves), injected kill points (the process kills itself inside the writer's commit or inside a
checkpoint's write, through a small wrapper that patches those functions), or random times.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from statscope.store import read_attrs
from statscope import schema as S

from test_experiments_support import alive, offline_env, raw_arrays

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc and relies on POSIX signals")

STEPS = 3000  # 3 epochs of the shipped subset at batch size 4: flushes every 2 s, 3 checkpoints
RUN = ["run", "mnist-fc", "--bs", "4", "--dataset", "mnist-5k-subset", "--max-steps", str(STEPS),
       "-q"]
TIMEOUT = 300

# Runs the CLI after patching the writer's commit of the marker to SIGKILL the process on its
# n-th call (after a flush wrote its rows: "during a flush"; $KILL_AT=commit, $KILL_NTH=n), or a
# checkpoint's file writes to SIGKILL it at the m-th write of the k-th checkpoint (a part of the
# file is on disk: "during a checkpoint"; $KILL_AT=checkpoint, $KILL_NTH=k:m; one mnist-fc
# checkpoint is about 290 writes).
KILLER = '''
import os, signal, sys

point, nth = os.environ["KILL_AT"], os.environ["KILL_NTH"]
count = {"commit": 0, "save": 0, "write": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "commit":
    from statscope.writer import RunWriter
    commit = RunWriter._commit

    def counted_commit(*args, **kwargs):
        count["commit"] += 1
        if count["commit"] == int(nth):
            die()
        return commit(*args, **kwargs)

    RunWriter._commit = counted_commit
elif point == "checkpoint":
    from statscope.experiments.checkpoint import Checkpoint, _Sink
    save, write = Checkpoint.save, _Sink.write
    k, m = (int(v) for v in nth.split(":"))

    def counted_save(*args, **kwargs):
        count["save"] += 1
        count["write"] = 0
        return save(*args, **kwargs)

    def counted_write(*args, **kwargs):
        count["write"] += 1
        if (count["save"], count["write"]) == (k, m):
            die()
        return write(*args, **kwargs)

    Checkpoint.save, _Sink.write = counted_save, counted_write
from statscope.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _env(tmp_path):
    return {**os.environ, **offline_env(tmp_path)}


def _cli(tmp_path, *args, **kwargs):
    return subprocess.run([sys.executable, "-m", "statscope", *args], capture_output=True,
                          text=True, env=_env(tmp_path), timeout=TIMEOUT, **kwargs)


def _attrs(out: Path) -> dict | None:
    """The root attributes as written (None while the file is missing or half written)."""
    try:
        return json.loads((out / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return None


def _wait_for(predicate, proc, limit=120.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.002)
    return False


def _kill_run(tmp_path, out: Path, point: tuple) -> str:
    """Start the run at ``out``, SIGKILL it at ``point``; return what happened, for messages."""
    kind, arg = point
    env = _env(tmp_path)
    if kind in ("commit", "checkpoint"):
        script = tmp_path / "killer.py"
        script.write_text(KILLER)
        cmd = [sys.executable, str(script)]
        env.update(KILL_AT=kind, KILL_NTH=str(arg))
        if kind == "commit":  # inside RunWriter._commit, patched into the training process
            env["STATSCOPE_WRITER"] = "thread"
    else:
        cmd = [sys.executable, "-m", "statscope"]
    # "group": the whole process group at once (training and its writer process), as a batch
    # scheduler or an OOM kill of the job does; the other kinds kill the training process only
    group = kind == "group"
    proc = subprocess.Popen(cmd + [*RUN, "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, start_new_session=group)
    try:
        if kind == "time":
            time.sleep(arg)
        elif kind == "created":  # the root zarr.json exists: before the first commit
            _wait_for(lambda: _attrs(out) is not None, proc)
            time.sleep(arg)
        elif kind in ("committed", "group"):  # the marker moved: after the first commit
            _wait_for(lambda: ((_attrs(out) or {}).get(S.ATTR_N_STEPS) or 0) > 0, proc)
            time.sleep(arg)
        elif kind == "sigint":  # Ctrl-C while training: the loop stops after its step
            _wait_for(lambda: _attrs(out) is not None, proc)
            time.sleep(arg)
            proc.send_signal(signal.SIGINT)
        if group and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        elif kind not in ("commit", "checkpoint", "sigint") and proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode not in (0, -signal.SIGKILL, 130 if kind == "sigint" else 0):
        pytest.fail(f"{point}: the run failed by itself (exit {proc.returncode}): {err[-2000:]}")
    # Every run makes a first commit and 3 checkpoints; later commits depend on the speed.
    if proc.returncode == 0 and (kind == "checkpoint" or point == ("commit", 1)):
        pytest.fail(f"{point}: the kill point was never reached")
    if kind == "sigint" and proc.returncode == 130:
        # the row of the step the Ctrl-C landed in is whole, and a checkpoint was saved at it
        import statscope

        ds = statscope.open_run(out)
        assert ds.attrs["status"] == "failed" and "KeyboardInterrupt" in ds.attrs["error"]
        assert all(bool(ds[name].notnull().all()) for name in ("loss", "lr")), \
            "an interrupted step lost its loss or lr"
        return "interrupted"
    return "completed before the kill" if proc.returncode == 0 else "killed"


def _check_resume(tmp_path, out: Path, point: tuple, reference: dict) -> list[str]:
    """Resume ``out`` until it completes (at most twice); the problems found, as lines."""
    how = _kill_run(tmp_path, out, point)
    attrs = _attrs(out) or {}
    problems = []
    if attrs.get(S.ATTR_STATUS) != S.STATUS_COMPLETED:
        proc = _cli(tmp_path, *RUN, "--out", str(out), "--resume")
        if proc.returncode != 0:
            return [f"{point} ({how}, store {attrs.get(S.ATTR_STATUS)!r} with "
                    f"{attrs.get(S.ATTR_N_STEPS)} steps): --resume exited {proc.returncode}: "
                    f"{proc.stderr.strip()[-500:]}"]
    final = read_attrs(out)
    if final[S.ATTR_STATUS] != S.STATUS_COMPLETED or final[S.ATTR_N_STEPS] != STEPS:
        problems.append(f"{point} ({how}): ended {final[S.ATTR_STATUS]!r} with "
                        f"{final[S.ATTR_N_STEPS]} steps")
    # a completed run is never resumed: no checkpoint, nor the temporary file of one being
    # written when the process was killed, stays beside it. A kill between the store's
    # completion and their removal (the writer process's exit lies between the two) leaves
    # them; the next command on the run (a --resume, refused, or a sweep) removes them.
    left = sorted(p.name for p in out.parent.glob(out.name + ".checkpoint*"))
    if left and how == "killed" and attrs.get(S.ATTR_STATUS) == S.STATUS_COMPLETED:
        proc = _cli(tmp_path, *RUN, "--out", str(out), "--resume")
        if proc.returncode != 2 or "already completed" not in proc.stderr:
            problems.append(f"{point} ({how}): --resume of the completed run exited "
                            f"{proc.returncode}: {proc.stderr.strip()[-300:]}")
        left = sorted(p.name for p in out.parent.glob(out.name + ".checkpoint*"))
    if left:
        problems.append(f"{point} ({how}): left beside the completed store: {left}")
    arrays = raw_arrays(str(out))
    differ = sorted(k for k in reference if arrays.get(k) != reference[k])
    if arrays.keys() != reference.keys() or differ:
        problems.append(f"{point} ({how}): arrays differ from the uninterrupted run's: "
                        f"{differ or sorted(arrays.keys() ^ reference.keys())}")
    return problems


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its arrays and its wall time."""
    tmp = tmp_path_factory.mktemp("reference")
    t0 = time.monotonic()
    proc = _cli(tmp, *RUN, "--out", str(tmp / "ref"))
    assert proc.returncode == 0, proc.stderr
    return raw_arrays(str(tmp / "ref")), time.monotonic() - t0


def _run_points(tmp_path, reference, points):
    arrays, _ = reference
    problems = []
    for i, point in enumerate(points):
        problems += _check_resume(tmp_path, tmp_path / f"run{i}", point, arrays)
    assert not problems, "\n".join(problems)


def test_a_killed_run_resumes_to_the_uninterrupted_data(tmp_path, reference):
    """The CI-sized variant: killed inside the first flush (before the first commit), inside a
    later flush (the thread writer, where the kill can be placed inside the commit), in the
    middle of the second checkpoint's file, and, with the writer process, training alone or
    with its writer process just after the first commit."""
    _run_points(tmp_path, reference, [("commit", 1), ("commit", 3), ("checkpoint", "2:100"),
                                      ("committed", 0.05), ("group", 0.0)])


@pytest.mark.slow
def test_a_run_stopped_by_ctrl_c_keeps_whole_steps_and_resumes_to_the_same_data(tmp_path,
                                                                               reference):
    """Ctrl-C lands inside a step (after the probes, before the loop logs loss and lr): the
    loop stops at the end of that step, saves a checkpoint there, and --resume ends with the
    arrays of the uninterrupted run."""
    _run_points(tmp_path, reference, [("sigint", t) for t in (0.0, 0.4, 1.1)])


@pytest.mark.slow
def test_runs_killed_at_23_moments_resume_to_the_uninterrupted_data(tmp_path, reference):
    """Issue 10's fault injection: SIGKILL at 23 moments (seeded), each resumed with --resume;
    every run must end completed with the arrays of the uninterrupted run."""
    _, wall = reference
    rng = random.Random(10)
    points = ([("time", round(rng.uniform(0.5, wall), 2)) for _ in range(6)]
              + [("created", round(rng.uniform(0, 0.5), 2)) for _ in range(3)]
              + [("committed", round(rng.uniform(0, 0.3), 2)) for _ in range(3)]
              + [("group", round(rng.uniform(0, 0.3), 2)) for _ in range(3)]
              + [("commit", n) for n in (1, 2, 3, 4)]
              + [("checkpoint", km) for km in ("1:1", "1:150", "2:280", "3:100")])
    _run_points(tmp_path, reference, points)


def _children(pid: int) -> list[int]:
    """The live (not zombie) processes whose parent is ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            out.append(int(entry))
    return out


def test_sweep_workers_die_with_their_killed_parent_and_a_rerun_finishes(tmp_path):
    """``kill -9`` of ``sweep --jobs 2``: its workers stop within seconds (their runs marked
    failed, saying why), and the same sweep run again resumes both to completion. The runs are
    long enough (~10 s each on a quiet core) that neither ends before its first commit (~5 s)."""
    STEPS = 8000
    out = tmp_path / "sw"
    argv = ["sweep", "mnist-fc", "--bs", "4", "8", "--dataset", "mnist-5k-subset", "--max-steps",
            str(STEPS), "--out", str(out), "--jobs", "2", "-q"]
    proc = subprocess.Popen([sys.executable, "-m", "statscope", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env(tmp_path))
    names = [f"mnist-fc_bs4_seed0_bn_max{STEPS}_mnist-5k-subset",
             f"mnist-fc_bs8_seed0_bn_max{STEPS}_mnist-5k-subset"]
    try:
        both = _wait_for(lambda: all(((_attrs(out / n) or {}).get(S.ATTR_N_STEPS) or 0) > 0
                                     for n in names), proc, limit=180)
        assert both, "the workers never committed a step"
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers
        proc.kill()
        proc.communicate(timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(p) for p in workers):
            time.sleep(0.1)
        assert not [p for p in workers if alive(p)], "orphaned workers live on"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for name in names:
        attrs = read_attrs(out / name)
        assert attrs[S.ATTR_STATUS] == S.STATUS_FAILED, attrs[S.ATTR_STATUS]
        assert "the sweep process that started this run ended" in attrs[S.ATTR_ERROR]
    again = _cli(tmp_path, *argv)
    assert again.returncode == 0, again.stdout + again.stderr
    assert sorted(line.split()[1] for line in again.stdout.splitlines()) == names
    assert all(line.startswith("done  ") and "(resumed)" in line
               for line in again.stdout.splitlines()), again.stdout
    for name in names:
        attrs = read_attrs(out / name)
        assert (attrs[S.ATTR_STATUS], attrs[S.ATTR_N_STEPS]) == (S.STATUS_COMPLETED, STEPS)


def test_a_sweep_leaves_a_run_another_process_writes_and_reports_it_held(tmp_path, monkeypatch,
                                                                         capsys):
    from statscope.cli import main

    out = tmp_path / "sw"
    held = out / "mnist-fc_bs4_seed0_bn_max3000_mnist-5k-subset"
    writer = subprocess.Popen([sys.executable, "-m", "statscope", *RUN, "--out", str(held)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=_env(tmp_path))
    try:
        assert _wait_for(lambda: _attrs(held) is not None, writer), "the writer never started"
        for key, value in offline_env(tmp_path).items():
            monkeypatch.setenv(key, value)
        code = main(["sweep", "mnist-fc", "--bs", "4", "8", "--dataset", "mnist-5k-subset",
                     "--max-steps", str(STEPS), "--out", str(out), "-q"])
    finally:
        writer.kill()
        writer.wait()
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert code == 0 and len(lines) == 2, captured  # a held run is the other process's to finish
    assert lines[0].startswith(f"held  {held.name}: another process is writing it (path=")
    assert f"pid {writer.pid} on " in lines[0]
    assert lines[1].startswith("done  mnist-fc_bs8_seed0_bn_max3000_mnist-5k-subset")
    assert "1 of 2 runs are held by another process" in captured.err
