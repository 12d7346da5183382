"""The writer process (statscope.writer_process): the same store as the writer thread, errors
that cross the pipe, a writer process that dies, a training process that dies, and the lease
between them. Every wait has a timeout."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import statscope
from statscope import schema as S
from statscope.errors import NonFiniteWarning, RecordingError, StatscopeError, StoreLockedError
from statscope.lease import Holder, Lease, read_holder
from statscope.store import Layout, ProbeInfo, open_windows, read_attrs
from statscope.writer import RunWriter
from statscope.writer_process import WriterProcess, open_writer, resolve_mode

TIMEOUT = 60


def _train(model, rec, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen) * 3 + 1
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        rec.log(loss=loss)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4),
                         nn.LayerNorm(4))


def _train_until_recording_stops(model, rec):
    """Train until the writer's failure reaches the training thread (it warns there)."""
    deadline = time.monotonic() + TIMEOUT
    while rec._on:
        assert time.monotonic() < deadline, "the writer's failure never came back"
        _train(model, rec, 2)
        time.sleep(0.02)


def _pid_gone(pid: int, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.02)
    return False


def test_the_writer_process_writes_the_store_the_thread_writes(tmp_path):
    """Same model, same batches: every array and the data attributes agree (statistics to
    float32 rounding: when the writer thread tells a BatchNorm probe that its mean needs no
    extra sum depends on the threads' timing, in both modes)."""
    runs = {}
    for mode in ("process", "thread"):
        model = _net()
        with statscope.record(model, tmp_path / mode, writer=mode, block_steps=16,
                              window_steps=10, meta={"m": 1}) as rec:
            _train(model, rec, 70)
        runs[mode] = statscope.open_run(tmp_path / mode)
    a, b = runs["process"], runs["thread"]
    assert a.sizes == b.sizes and a.sizes["step"] == 70
    for name in b.data_vars:
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-6, atol=1e-6,
                                   err_msg=name)
    for key in (S.ATTR_N_STEPS, S.ATTR_STATUS, S.ATTR_PROBES, S.ATTR_NONFINITE, S.ATTR_SCALARS):
        assert a.attrs[key] == b.attrs[key], key
    wa, wb = open_windows(tmp_path / "process"), open_windows(tmp_path / "thread")
    for name in wb.data_vars:
        np.testing.assert_allclose(wa[name].values, wb[name].values, rtol=1e-6, atol=1e-6,
                                   err_msg=name)


def test_a_run_is_readable_while_the_writer_process_writes_it(tmp_path):
    model = _net()
    rec = statscope.record(model, tmp_path / "r", block_steps=4, flush_seconds=0.05).start()
    try:
        _train(model, rec, 12)  # the 12th step ends at the next forward or at close
        deadline = time.monotonic() + TIMEOUT
        while statscope.open_run(tmp_path / "r").sizes["step"] < 11:
            assert time.monotonic() < deadline, "rows never reached the store"
            time.sleep(0.05)
        assert statscope.open_run(tmp_path / "r").attrs[S.ATTR_STATUS] == S.STATUS_RUNNING
    finally:
        rec.close()
    assert statscope.open_run(tmp_path / "r").attrs[S.ATTR_STATUS] == S.STATUS_COMPLETED


def test_a_held_run_is_refused_at_start_naming_the_holder(tmp_path):
    holder = RunWriter(tmp_path / "r", Layout(probes=(ProbeInfo("a", "a", "BatchNorm1d", "input", 1, 2),)))
    try:
        rec = statscope.record(_net(), tmp_path / "r", overwrite=True, writer="process")
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
            rec.start()
    finally:
        holder.close()


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_a_recorder_left_open_in_this_process_is_named_and_found_again(tmp_path, writer):
    # a notebook cell run twice: the first recorder still holds the run (its hooks keep it
    # alive without a name); the error says so, and open_recorders() gives it back to close
    model = _net()
    statscope.record(model, tmp_path / "r", writer=writer).start()
    _train_plain(model, 3)
    with pytest.raises(StoreLockedError, match=r"it is this process: a recorder of this run is "
                       r"still open here .*statscope.open_recorders\(\)"):
        statscope.record(model, tmp_path / "r", overwrite=True, writer=writer).start()
    (left,) = [r for r in statscope.open_recorders() if r.path == str(tmp_path / "r")]
    left.close()
    assert left not in statscope.open_recorders()
    assert statscope.open_run(tmp_path / "r").sizes["step"] == 3
    with statscope.record(model, tmp_path / "r", overwrite=True, writer=writer) as rec:
        assert rec in statscope.open_recorders()
        _train_plain(model, 2)
    assert rec not in statscope.open_recorders()
    assert statscope.open_run(tmp_path / "r").sizes["step"] == 2


def _train_plain(model, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        model(torch.randn(5, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_the_lease_names_the_training_process_and_its_writer_process(tmp_path):
    model = _net()
    with statscope.record(model, tmp_path / "r", writer="process") as rec:
        _train(model, rec, 2)
        held = read_holder(str(tmp_path / "r"))
        writer_pid = rec._worker.filer.writer.pid
        assert (held.parent, held.pid) == (os.getpid(), writer_pid)
        assert f"pid {os.getpid()}" in held.describe() and str(writer_pid) in held.describe()
    assert _pid_gone(writer_pid)


def test_non_finite_statistics_warn_on_the_training_thread(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3))
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))
    with pytest.warns(NonFiniteWarning, match="non-finite"):
        with statscope.record(model, tmp_path / "r", layers=["0"], where="output",
                              block_steps=2, writer="process") as rec:
            for _ in range(4):
                model(torch.randn(4, 2))
            rec  # noqa: B018 - the warning comes at a step or at close
    attrs = statscope.open_run(tmp_path / "r").attrs
    assert attrs[S.ATTR_NONFINITE][S.BN_MEAN] > 0


def test_a_write_error_in_the_writer_process_stops_recording_not_training(tmp_path):
    """A real error in the child (an array's folder turned into a file): the training thread
    warns once, training goes on, close raises RecordingError naming it, the run is marked
    failed and keeps what was committed before."""
    model = _net()
    path = tmp_path / "r"
    rec = statscope.record(model, path, block_steps=2, flush_seconds=0.01,
                           writer="process").start()
    _train(model, rec, 4)
    # every ended step committed (the fourth ends at the next forward): the writer has nothing
    # left to write into the folder removed below. With 2 it could still be writing a chunk
    # there, and the removal failed with "Directory not empty" (a race of this test's own)
    deadline = time.monotonic() + TIMEOUT
    while (json.loads((path / "zarr.json").read_text())["attributes"][S.ATTR_N_STEPS] or 0) < 3:
        assert time.monotonic() < deadline, "no commit"
        time.sleep(0.02)
    array = path / S.BN_MEAN
    shutil.rmtree(array)
    array.write_text("not a folder")
    with pytest.warns(statscope.StatscopeWarning, match="recording .*stopped"):
        _train_until_recording_stops(model, rec)
    _train(model, rec, 3)  # training goes on
    # the child's own error (it reported it, marked the run and ended), or its end if it had not
    with pytest.raises(RecordingError, match="FileExistsError|writer process"):
        rec.close()
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]
    assert attrs[S.ATTR_STATUS] == S.STATUS_FAILED and attrs[S.ATTR_N_STEPS] >= 2


def test_a_killed_writer_process_stops_recording_and_close_does_not_hang(tmp_path):
    model = _net()
    rec = statscope.record(model, tmp_path / "r", block_steps=2, flush_seconds=0.01,
                           writer="process").start()
    _train(model, rec, 4)
    os.kill(rec._worker.filer.writer.pid, signal.SIGKILL)
    with pytest.warns(statscope.StatscopeWarning, match="killed by signal 9"):
        _train_until_recording_stops(model, rec)
    done = threading.Event()
    caught = []

    def close():
        try:
            rec.close()
        except RecordingError as exc:
            caught.append(exc)
        done.set()

    threading.Thread(target=close, daemon=True).start()
    assert done.wait(TIMEOUT), "close() hung on a dead writer process"
    assert caught and "writer process" in str(caught[0]) and "marked failed" in str(caught[0])
    # as the error says (it read running, an outside check)
    attrs = statscope.open_run(tmp_path / "r").attrs
    assert attrs[S.ATTR_STATUS] == S.STATUS_FAILED and "killed by signal 9" in attrs["error"]
    # nothing holds the run: it can be resumed
    rec2 = statscope.record(model, tmp_path / "r", resume=True).start()
    with pytest.warns(statscope.StatscopeWarning, match="no training step was recorded"):
        rec2.close()


CHILD = """
import sys, time, torch, statscope
from torch import nn
model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
rec = statscope.record(model, sys.argv[1], block_steps=2, flush_seconds=0.01,
                       writer="process").start()
print(rec._worker.filer.writer.pid, flush=True)
while True:
    model(torch.randn(5, 4))
    time.sleep(0.001)
"""


def test_kill_9_of_training_ends_its_writer_process_and_frees_the_run(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "r")],
                            stdout=subprocess.PIPE, text=True)
    with proc:
        writer_pid = int(proc.stdout.readline())
        deadline = time.monotonic() + TIMEOUT
        while (read_attrs(tmp_path / "r").get(S.ATTR_N_STEPS) or 0) < 2:
            assert time.monotonic() < deadline, "no commit"
            time.sleep(0.02)
        proc.kill()
    # resuming at once is safe: the lease waits for a writer process whose training died
    rec = statscope.record(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), tmp_path / "r",
                           resume=True).start()
    assert _pid_gone(writer_pid), "the writer process outlived its training process"
    with pytest.warns(statscope.StatscopeWarning, match="no training step was recorded"):
        rec.close()
    assert statscope.open_run(tmp_path / "r").attrs[S.ATTR_STATUS] == S.STATUS_COMPLETED


HOLDER = """
import json, os, sys, time, fcntl
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "started": "t",
                         "owner": "x", "heartbeat": time.time(), "ttl": 60.0,
                         "parent": int(sys.argv[2])}).encode())
print("held", flush=True)
time.sleep(float(sys.argv[3]))
"""


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("parent_alive, hold, refused", [(False, 0.5, False), (True, 2.0, True)])
def test_a_lease_waits_for_a_writer_process_only_when_its_training_is_gone(
        tmp_path, parent_alive, hold, refused):
    path = str(tmp_path / "r")
    parent = os.getpid() if parent_alive else _dead_pid()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, path + ".lease", str(parent),
                             str(hold)], stdout=subprocess.PIPE, text=True)
    with proc:
        assert proc.stdout.readline().strip() == "held"
        assert read_holder(path).ending() is not parent_alive
        t0 = time.monotonic()
        if refused:
            with pytest.raises(StoreLockedError, match="its writer process"):
                Lease.acquire(path)
            assert time.monotonic() - t0 < 1.0  # refused at once, no wait
        else:
            lease = Lease.acquire(path)
            lease.release()
        proc.kill()


def test_an_old_lease_without_parent_still_reads():
    old = {"host": "h", "pid": 1, "started": "t", "owner": "o", "heartbeat": 0.0, "ttl": 60.0}
    held = Holder.from_bytes(json.dumps(old).encode())
    assert held.parent is None and not held.ending() and held.describe().startswith("pid 1 ")


def test_writer_modes_and_bad_values(tmp_path, monkeypatch):
    monkeypatch.delenv("STATSCOPE_WRITER", raising=False)
    assert resolve_mode("auto", str(tmp_path)) == "process"
    assert resolve_mode("auto", "memory://x") == "thread"
    assert resolve_mode("thread", str(tmp_path)) == "thread"
    monkeypatch.setenv("STATSCOPE_WRITER", "thread")
    assert resolve_mode("auto", str(tmp_path)) == "thread"
    assert resolve_mode("process", str(tmp_path)) == "process"
    monkeypatch.setenv("STATSCOPE_WRITER", "fork")
    with pytest.raises(StatscopeError, match="STATSCOPE_WRITER='fork'"):
        resolve_mode("auto", str(tmp_path))
    with pytest.raises(StatscopeError, match="writer='disk'"):
        statscope.record(_net(), tmp_path / "r", writer="disk")
    layout = Layout(probes=(ProbeInfo("a", "a", "BatchNorm1d", "input", 1, 2),))
    monkeypatch.delenv("STATSCOPE_WRITER")
    w = open_writer(str(tmp_path / "w"), layout)
    assert isinstance(w, WriterProcess)
    w.close()


@pytest.mark.parametrize("env", [None, "process"])
def test_a_memory_store_keeps_the_thread(tmp_path, monkeypatch, env):
    # STATSCOPE_WRITER=process sent a memory:// run to a child's own memory: all of it lost
    if env is None:
        monkeypatch.delenv("STATSCOPE_WRITER", raising=False)
    else:
        monkeypatch.setenv("STATSCOPE_WRITER", env)
    model = _net()
    with statscope.record(model, "memory://statscope-wp/r", overwrite=True) as rec:
        assert isinstance(rec._worker.filer.writer, RunWriter)
        _train(model, rec, 3)
    assert statscope.open_run("memory://statscope-wp/r").sizes["step"] == 3


def test_an_explicit_writer_process_for_a_memory_store_is_refused():
    # it recorded and closed without a word, then open_run found no group (an outside check)
    with pytest.raises(StatscopeError, match=r"writer='process' with path='memory://s/r'"):
        statscope.record(_net(), "memory://s/r", writer="process")


def test_a_probe_that_joins_late_gets_its_columns_from_the_writer_process(tmp_path):
    class Late(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.BatchNorm1d(3), nn.LazyBatchNorm1d()  # b's width: unknown

        def forward(self, x, use_b=False):
            return self.b(x) if use_b else self.a(x)

    model = Late()
    with statscope.record(model, tmp_path / "r", block_steps=2, writer="process") as rec:
        for i in range(8):
            model(torch.randn(4, 3), use_b=i >= 5)
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes == {"step": 8, "neuron": 6}
    assert ds.attrs[S.ATTR_LAYERS] == ["a", "b"]
    count = ds[S.COUNT].values  # (step, neuron): a's 3 channels, then b's
    assert (count[:5, :3] == 4).all() and (count[5:, :3] == 0).all()
    assert (count[:5, 3:] == 0).all() and (count[5:, 3:] == 4).all()
    del rec


def test_warnings_of_the_writer_process_reach_this_process(tmp_path, monkeypatch):
    """The child sends the warnings it catches; they are warned here with their category."""
    from statscope import writer_child

    class Conn:
        sent = []

        def send(self, msg):
            self.sent.append(msg)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("from the child", statscope.StatscopeWarning)
    conn = Conn()
    writer_child._report(conn, caught)
    assert conn.sent == [("warn", "from the child", statscope.StatscopeWarning)] and not caught
    proxy = object.__new__(WriterProcess)
    with pytest.warns(statscope.StatscopeWarning, match="from the child"):
        proxy._take(conn.sent[0])


def test_the_writer_process_side_needs_no_torch():
    """The child computes rows and writes zarr without importing torch (its start-up stays
    ~0.3 s and its memory small)."""
    code = ("import sys, statscope.writer_process, statscope.writer_child, statscope.rows, "
            "statscope.writer; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_a_users_statistic_is_computed_on_the_writer_thread(tmp_path):
    """A statistic registered in this process is unknown to the writer process: the rows are
    then computed here and only written there."""
    from statscope.probes.statistics import STATISTICS, register_statistic

    if "wp_range_demo" not in STATISTICS:
        register_statistic("wp_range_demo", lambda m: m.mean / np.sqrt(m.var))
    model = nn.Sequential(nn.BatchNorm1d(3))
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(6, 3, generator=gen) + 2 for _ in range(5)]
    with statscope.record(model, tmp_path / "r", stats=["bn_mean", "wp_range_demo"],
                          writer="process") as rec:
        assert not rec._worker.filer.remote
        for x in xs:
            model(x)
    ds = statscope.open_run(tmp_path / "r")
    want = np.stack([x.double().mean(0) / x.double().std(0, correction=0) for x in xs])
    np.testing.assert_allclose(ds.wp_range_demo.values, want, rtol=1e-5)


def test_a_writer_process_that_cannot_start_falls_back_to_the_thread(tmp_path, monkeypatch):
    """With writer="auto" a child that ends before it opens the run (here: no Python to run)
    leaves the writing to the writer thread, with a warning; writer="process" raises."""
    from statscope.writer_process import WriterStartError

    monkeypatch.delenv("STATSCOPE_WRITER", raising=False)
    monkeypatch.setattr(sys, "executable", "/bin/false")
    model = _net()
    with pytest.warns(statscope.StatscopeWarning, match="before it opened the run; the writer "
                                                        "thread writes the store instead"):
        rec = statscope.record(model, tmp_path / "r").start()
    assert isinstance(rec._worker.filer.writer, RunWriter)
    _train(model, rec, 3)
    rec.close()
    assert statscope.open_run(tmp_path / "r").sizes["step"] == 3
    with pytest.raises(WriterStartError, match="exit code 1"):
        statscope.record(_net(), tmp_path / "p", writer="process").start()


UNCLOSED = """
import os, sys, torch, statscope
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
def train():
    rec = statscope.record(model, sys.argv[1], writer=sys.argv[2]).start()
    for i in range(300):
        model(torch.randn(4, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if sys.argv[3] == "fork" and i == 150:  # a child that exits through sys.exit runs
            pid = os.fork()                      # the exit handlers it inherited
            if pid == 0:
                sys.exit(0)
            os.waitpid(pid, 0)
        if sys.argv[3] == "thread" and i == 0:
            started.set()  # the main thread ends now; this one trains on
if sys.argv[3] == "thread":  # a non-daemon thread trains after the main thread is done
    import threading
    started = threading.Event()
    threading.Thread(target=train).start()
    started.wait()
else:
    train()
if sys.argv[3] == "raise":
    raise RuntimeError("boom after 300 steps")
"""


@pytest.mark.parametrize("writer", ["process", "thread"])
@pytest.mark.parametrize("how", ["exit", pytest.param("raise", marks=pytest.mark.slow),
                                 pytest.param("fork", marks=pytest.mark.slow),
                                 pytest.param("thread", marks=pytest.mark.slow)])
def test_a_recorder_never_closed_is_closed_at_exit_with_every_step(tmp_path, writer, how):
    # a script that starts a recorder and ends without rec.close() lost every step (the writer
    # wrote nothing after its pipe closed) and left the run 'running' for good
    run = tmp_path / "r"
    out = subprocess.run([sys.executable, "-c", UNCLOSED, str(run), writer, how],
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == (1 if how == "raise" else 0), out.stderr
    assert out.stderr.count("was still open when the process exited") == 1, out.stderr
    ds = statscope.open_run(run)
    assert ds.sizes["step"] == 300 and (ds["count"].values == 4).all()
    if how == "raise":
        assert ds.attrs[S.ATTR_STATUS] == S.STATUS_FAILED
        assert "RuntimeError: boom after 300 steps" in ds.attrs[S.ATTR_ERROR]
    else:
        assert ds.attrs[S.ATTR_STATUS] == S.STATUS_COMPLETED
