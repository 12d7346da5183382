"""``statscope sweep --scheduler/--workers``: runs as tasks on a dask.distributed cluster.

Every cluster here is a ``LocalCluster`` of 2 worker processes with one thread each. The runs
are compared byte for byte with the same runs made in this process (``--jobs 1``): same seeds,
same bytes on the CPU. Workers and run processes are killed for real.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from statscope import schema as S
from statscope.cli import main
from statscope.store import read_attrs

from test_experiments_support import offline_env, raw_arrays

distributed = pytest.importorskip("distributed")

pytestmark = [pytest.mark.usefixtures("offline"),
              pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="reads /proc and relies on POSIX signals")]

TIMEOUT = 300
# Two epochs of the shipped subset at batch size 8: a checkpoint at step 500, the end at 1000.
KILLED = ["mnist-fc", "--bs", "8", "--dataset", "mnist-5k-subset", "--max-steps", "1000", "-q"]
# Four and eight epochs: room to kill a run after its first checkpoint, and after the store has
# caught up with it (the recorder commits up to 5 s behind training).
LONG = [*KILLED[:-2], "2000", "-q"]
LONGER = [*KILLED[:-2], "4000", "-q"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 2-worker LocalCluster whose workers see the offline environment; its scheduler address
    and a client."""
    tmp = tmp_path_factory.mktemp("cluster")
    with pytest.MonkeyPatch.context() as mp:
        offline_env(tmp, mp)  # the workers inherit it when they start
        with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                      dashboard_address=":0") as lc, \
                distributed.Client(lc, set_as_default=False) as client:
            yield lc.scheduler_address, client


def _sweep_cli(tmp_path, *args):
    return subprocess.Popen([sys.executable, "-m", "statscope", "sweep", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **offline_env(tmp_path)})


def _attrs(run: Path) -> dict:
    try:
        return json.loads((run / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):  # not there yet, or being replaced
        return {}


def _holder(run: Path) -> int | None:
    """The pid of the run process the lease file names (its last or current writer; the
    training process of a writer process)."""
    try:
        held = json.loads(Path(f"{run}.lease").read_text())
        return held.get("parent") or held["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stopped_after_commit(run: Path, pid: int, proc, rows: int, limit=180.0) -> bool:
    """Stop the run's process (SIGSTOP) with at least ``rows`` rows committed to its store, so
    that a kill lands mid-run however fast the machine trains: the store commits every few
    seconds (a 4000-step run can end before its first commit), and while training is stopped its
    writer process still commits the blocks it was sent. Where those are too few, training
    goes on a little and is stopped again."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        os.kill(pid, signal.SIGSTOP)
        if _wait_for(lambda: (_attrs(run).get(S.ATTR_N_STEPS) or 0) >= rows, proc, limit=8.0):
            return _attrs(run).get(S.ATTR_STATUS) == S.STATUS_RUNNING
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.3)
    return False


def _wait_for(predicate, proc, limit=180.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def _lease_held(run: Path) -> bool:
    from statscope.errors import StoreLockedError
    from statscope.lease import Lease

    try:
        Lease.acquire(str(run)).release()
    except StoreLockedError:
        return True
    return False


def test_a_sweep_on_a_local_cluster_writes_the_stores_of_jobs_1_and_is_restartable(
        tmp_path, mnist_dir, capsys):
    """``--workers 2`` (a LocalCluster of this command's own) against ``--jobs 1``: the same
    arrays, byte for byte; run again, every run is skipped."""
    grid = ["mnist-fc", "--bs", "4", "8", "--max-steps", "20", "--data-dir", mnist_dir, "-q"]
    assert main(["sweep", *grid, "--out", str(tmp_path / "local"), "--jobs", "1"]) == 0
    capsys.readouterr()
    assert main(["sweep", *grid, "--out", str(tmp_path / "dask"), "--workers", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = sorted(os.listdir(tmp_path / "local"))
    runs = [n for n in names if not n.endswith(".lease")]
    assert len(runs) == 2 and sorted(os.listdir(tmp_path / "dask")) == names
    assert sorted(line.split()[1].rstrip(":") for line in lines) == runs
    assert all(line.startswith("done  ") and "test accuracy " in line and "20 steps in" in line
               for line in lines), lines
    for name in runs:
        attrs = read_attrs(tmp_path / "dask" / name)
        assert (attrs[S.ATTR_STATUS], attrs[S.ATTR_N_STEPS]) == (S.STATUS_COMPLETED, 20)
        assert raw_arrays(str(tmp_path / "dask" / name)) == \
            raw_arrays(str(tmp_path / "local" / name)), name
    assert main(["sweep", *grid, "--out", str(tmp_path / "dask"), "--workers", "2"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["skip"] * 2


def test_a_killed_worker_s_run_resumes_on_another_worker_to_the_uninterrupted_data(
        tmp_path, cluster):
    """SIGKILL of the worker process whose run has saved its first checkpoint: its run
    process stops, the scheduler gives the task to another worker, which resumes the run from
    the checkpoint. The dead worker's run process is held stopped (SIGSTOP) for a few seconds,
    keeping the lease: the new attempt waits for it rather than calling the run held."""
    address, client = cluster
    workers = set(client.run(os.getpid).values())
    out = tmp_path / "sw"
    name = "mnist-fc_bs8_seed0_bn_max1000_mnist-5k-subset"
    run = out / name
    proc = _sweep_cli(tmp_path, *KILLED, "--seeds", "0", "1", "--out", str(out),
                      "--scheduler", address)
    try:
        assert _wait_for(lambda: Path(f"{run}.checkpoint.pt").exists(), proc), \
            "the run never saved a checkpoint"
        child = _holder(run)
        worker = _parent(child)
        assert worker in workers, (child, worker, workers)
        os.kill(child, signal.SIGSTOP)  # a run process that lingers after its worker died
        os.kill(worker, signal.SIGKILL)
        time.sleep(3)
        assert _alive(child) and _lease_held(run) and proc.poll() is None
        os.kill(child, signal.SIGCONT)  # now it gets its parent-death SIGTERM and stops
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stdout + stderr
    lines = sorted(stdout.splitlines())
    assert len(lines) == 2 and lines[0].startswith(f"done  {name} (resumed) (attempt 2): ")
    assert "from the checkpoint at step " in lines[0], lines[0]
    assert lines[1].startswith("done  mnist-fc_bs8_seed0_bn_max1000_mnist-5k-subset".replace(
        "seed0", "seed1"))
    attrs = read_attrs(run)
    assert (attrs[S.ATTR_STATUS], attrs[S.ATTR_N_STEPS]) == (S.STATUS_COMPLETED, 1000)
    assert f" sweep {' '.join(KILLED)} --seeds 0 1 " in attrs[S.ATTR_COMMAND]  # the sweep's own
    assert main(["run", *KILLED, "--out", str(tmp_path / "ref")]) == 0
    assert raw_arrays(str(run)) == raw_arrays(str(tmp_path / "ref"))


@pytest.mark.slow
def test_a_killed_run_process_is_retried_by_dask_and_resumes(tmp_path, cluster):
    """SIGKILL of the run's own process (not its worker): the task fails, dask's ``retries``
    starts it again, and the run resumes to the uninterrupted data."""
    address, _ = cluster
    out = tmp_path / "sw"
    name = "mnist-fc_bs8_seed0_bn_max4000_mnist-5k-subset"
    proc = _sweep_cli(tmp_path, *LONGER, "--out", str(out), "--scheduler", address)
    try:
        assert _wait_for(lambda: Path(f"{out / name}.checkpoint.pt").exists(), proc), \
            "the run never saved a checkpoint"
        pid = _holder(out / name)
        assert _stopped_after_commit(out / name, pid, proc, 500), \
            "the run ended before its store caught up with its first checkpoint"
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stdout + stderr
    assert stdout.startswith(f"done  {name} (resumed) (attempt 2): "), stdout
    assert "from the checkpoint at step " in stdout
    assert main(["run", *LONGER, "--out", str(tmp_path / "ref")]) == 0
    assert raw_arrays(str(out / name)) == raw_arrays(str(tmp_path / "ref"))


@pytest.mark.slow
def test_a_run_whose_process_dies_with_no_retries_left_is_reported_failed(tmp_path, cluster):
    """``retries=0``: the run's process killed once fails the run, with why, and the other run
    of the sweep goes on."""
    import threading

    from statscope.experiments import RunConfig
    from statscope.experiments.sweep import plan_sweep, run_sweep

    _, client = cluster
    base = RunConfig("mnist-fc", dataset="mnist-5k-subset", max_steps=1000)
    items = plan_sweep(base, tmp_path / "sw", batch_sizes=[8], seeds=[0, 1])
    run = tmp_path / "sw" / items[0].name
    killed = []

    def kill_its_process():
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and not killed:
            pid = _holder(run)
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.01)

    killer = threading.Thread(target=kill_its_process, daemon=True)
    killer.start()
    outcomes = run_sweep(items, client=client, retries=0)
    killer.join(timeout=10)
    assert killed, "the run's process was never seen"
    first, second = outcomes
    assert first.result is None and first.attempts == 1
    assert first.error.startswith(f"RunProcessDied: the run's process {killed[0]} on tcp://")
    assert first.error.endswith("was killed by SIGKILL"), first.error
    assert second.error is None and second.result.steps == 1000


@pytest.mark.slow
def test_runs_stop_when_the_sweep_process_dies_and_a_rerun_finishes_them(tmp_path, cluster):
    """``kill -9`` of the sweep's own process: the scheduler drops its tasks, each task stops
    its run (checkpoint, run marked failed), and the same sweep run again completes them."""
    address, _ = cluster
    out = tmp_path / "sw"
    names = [f"mnist-fc_bs8_seed{s}_bn_max2000_mnist-5k-subset" for s in (0, 1)]
    argv = [*LONG, "--seeds", "0", "1", "--out", str(out), "--scheduler", address]
    proc = _sweep_cli(tmp_path, *argv)
    try:
        assert _wait_for(lambda: all(Path(f"{out / n}.checkpoint.pt").exists() for n in names),
                         proc)
        children = [_holder(out / n) for n in names]
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_alive(c) for c in children):
        time.sleep(0.1)
    assert not [c for c in children if _alive(c)], "run processes live on"
    for name in names:
        attrs = read_attrs(out / name)
        assert attrs[S.ATTR_STATUS] == S.STATUS_FAILED
        assert "the sweep process that started this run ended" in attrs[S.ATTR_ERROR]
    again = _sweep_cli(tmp_path, *argv)
    stdout, stderr = again.communicate(timeout=TIMEOUT)
    assert again.returncode == 0, stdout + stderr
    assert all(line.startswith("done  ") and "(resumed)" in line
               for line in stdout.splitlines()), stdout
    for name in names:
        assert read_attrs(out / name)[S.ATTR_N_STEPS] == 2000


# A run process: a parent with idle threads starts it from one of them; the child asks for the
# parent-death signal, then "trains" (steps of 10 ms, stop_if_asked between two) and writes how
# it ended. Argument: the marker file.
RUN_PROCESS = """
import os, subprocess, sys, threading, time
if sys.argv[1] == "parent":
    for _ in range(8):
        threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
    child = threading.Thread(target=lambda: subprocess.run([sys.executable, __file__, "child",
                                                            sys.argv[2], str(os.getpid())]))
    child.start()
    child.join()
else:
    from statscope.experiments.worker import ParentGone, init_worker, running, stop_if_asked
    init_worker(int(sys.argv[3]))
    with running(defer=True):
        open(sys.argv[2], "w").write("running")
        try:
            while True:
                time.sleep(0.01)
                stop_if_asked()
        except ParentGone:
            time.sleep(0.5)  # saving a checkpoint, closing the store
            open(sys.argv[2], "w").write("stopped cleanly")
            os._exit(143)
"""


@pytest.mark.parametrize("parent_dies", [True, False])
def test_a_run_process_stops_cleanly_however_many_parent_death_signals_come(tmp_path,
                                                                             parent_dies):
    """Linux sends the parent-death signal again each time a dead thread's children pass to
    another thread of a multithreaded parent (a dask worker, the sweep's process): repeats
    must not cut the clean stop short; a second SIGTERM still ends the process at once."""
    from statscope.experiments.worker import PARENT_DEATH_SIGNAL

    script, marker = tmp_path / "run_process.py", tmp_path / "marker"
    script.write_text(RUN_PROCESS)
    parent = subprocess.Popen([sys.executable, str(script), "parent", str(marker)],
                              env={**os.environ, **offline_env(tmp_path)})
    try:
        assert _wait_for(marker.exists, parent, limit=120), "the run process never started"
        child = next(int(e) for e in os.listdir("/proc") if e.isdigit() and _alive(int(e))
                     and _parent(int(e)) == parent.pid)
        if parent_dies:
            parent.kill()
            parent.wait()
        for sig in [PARENT_DEATH_SIGNAL] * 3 if parent_dies else [signal.SIGTERM] * 2:
            os.kill(child, sig)  # repeats of the parent-death signal, or "stop now"
            time.sleep(0.05)
        deadline = time.monotonic() + 30
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(child), "the run process did not end"
    finally:
        parent.kill()
        parent.wait()
    assert marker.read_text() == ("stopped cleanly" if parent_dies else "running")


def test_a_scheduler_nobody_listens_on_is_one_error_line(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "statscope", "sweep", "mnist-fc", "--bs", "8",
                           "--out", str(tmp_path / "sw"), "--scheduler", address],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **offline_env(tmp_path),
                               "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"statscope: error: --scheduler {address}: cannot connect (Timed out trying to connect "
        f"to {address} after 2 s)"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "sw").exists()


def test_a_malformed_scheduler_address_is_bad_input(tmp_path, capsys):
    assert main(["sweep", "mnist-fc", "--bs", "8", "--out", str(tmp_path / "sw"),
                 "--scheduler", "nonsense://x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("statscope: error: --scheduler nonsense://x: unknown address scheme")


@pytest.mark.parametrize("flags, message", [
    (["--scheduler", "tcp://127.0.0.1:1", "--workers", "2"],
     "argument --workers: not allowed with argument --scheduler"),
    (["--scheduler", "tcp://127.0.0.1:1", "--jobs", "1"],
     "argument --jobs/-j: not allowed with argument --scheduler"),
    (["--workers", "2", "-j", "2"], "argument --jobs/-j: not allowed with argument --workers"),
    (["--workers", "0"], "argument --workers: '0': expected a positive integer"),
])
def test_scheduler_workers_and_jobs_exclude_each_other(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "mnist-fc", "--bs", "8", "--out", str(tmp_path / "sw"), *flags])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err, err
    assert not (tmp_path / "sw").exists()


def test_api_checks_its_arguments():
    from statscope.errors import StatscopeError
    from statscope.experiments.cluster import run_on_cluster
    from statscope.experiments.sweep import run_sweep

    with pytest.raises(StatscopeError, match=r"jobs=2 with a client"):
        run_sweep([], jobs=2, client=object())
    with pytest.raises(StatscopeError, match=r"retries=-1: expected a non-negative int"):
        run_on_cluster(object(), [], retries=-1)
