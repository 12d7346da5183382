"""``statscope runs`` and ``info`` tell a run being written from one whose writer was killed."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from statscope import schema as S
from statscope.cli import main
from statscope.store import read_attrs

TIMEOUT = 60

# A writer that records 3 steps, commits them and stays, holding the run's lease.
WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from statscope.store import Layout, ProbeInfo
    from statscope.writer import RunWriter

    probe = ProbeInfo(name="norm1", module="norm1", type="synthetic", where="input",
                      channel_dim=-1, channels=4)
    writer = RunWriter(sys.argv[1], Layout(probes=(probe,), stats=("bn_mean", "bn_std")),
                       attrs={"meta": {"experiment": "mnist-fc", "batch_size": 8}},
                       flush_seconds=float("inf"))
    writer.append(np.arange(3), np.ones((3, 1), np.int64),
                  {"bn_mean": np.zeros((3, 4), np.float32), "bn_std": np.ones((3, 4), np.float32)})
    writer.flush()
    print("ready", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def writers(tmp_path):
    """Start a writer of ``tmp_path/runs/NAME`` as its own process; all are killed at the end."""
    started = []

    def start(name):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "runs" / name)],
                                stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline() == "ready\n"
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait(timeout=TIMEOUT)
        proc.stdout.close()


def test_a_run_whose_writer_was_killed_shows_as_stopped_and_a_live_one_as_running(
        tmp_path, writers, capsys):
    # Both used to show as `running`, the killed one for ever.
    live, killed = writers("live"), writers("killed")
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=TIMEOUT)
    for name in ("live", "killed"):
        assert read_attrs(tmp_path / "runs" / name)[S.ATTR_STATUS] == S.STATUS_RUNNING
    assert main(["runs", str(tmp_path / "runs")]) == 0
    captured = capsys.readouterr()
    rows = {row[0]: row[1:4] for row in (line.split() for line in captured.out.splitlines()[1:])}
    assert rows == {"killed": ["stopped", "3", "2"], "live": ["running", "3", "2"]}
    assert captured.err.strip().splitlines() == [
        f"statscope: note: killed is marked running, but its writer, pid {killed.pid} on "
        + captured.err.split(f"pid {killed.pid} on ", 1)[1].split(", has ended")[0]
        + ", has ended: it stopped without closing its store; the same sweep, or run with "
          "--resume, continues it"]
    assert main(["info", str(tmp_path / "runs" / "killed")]) == 0
    status = [line for line in capsys.readouterr().out.splitlines() if line.startswith("status")]
    assert status[0].startswith(f"status    stopped (marked running, but its writer, pid "
                                f"{killed.pid} on ") and status[0].endswith(", has ended)")
    assert main(["info", str(tmp_path / "runs" / "live")]) == 0
    assert "status    running" in capsys.readouterr().out.splitlines()
    assert live.poll() is None


def test_a_running_run_without_a_lease_is_shown_as_marked(tmp_path, writers, capsys):
    # a copy of a run being written, without its lease file: whether a writer lives cannot be
    # told from here (the dashboard says the same: statscope.lease.writer_state)
    import shutil

    writers("r")
    shutil.copytree(tmp_path / "runs" / "r", tmp_path / "copy" / "r")
    assert not os.path.exists(tmp_path / "copy" / "r.lease")
    assert main(["runs", str(tmp_path / "copy")]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[1].split()[:2] == ["r", "running"]
    assert captured.err == ""
