"""``Recorder.flush``: every step that ended is committed when it returns (before a checkpoint),
what is logged afterwards still joins its step, and a failed, dead or stalled writer is reported
within the timeout, never waited on for ever."""

import os
import signal
import time

import numpy as np
import pytest
import torch
from torch import nn

import statscope
from statscope import schema as S
from statscope.errors import RecordingError, StatscopeError, StatscopeWarning
from statscope.store import read_attrs, verify_run
from statscope.writer import RunWriter


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def _committed(path) -> int:
    return read_attrs(path).get(S.ATTR_N_STEPS, 0)


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_flush_commits_the_ended_steps_and_the_stepped_one(tmp_path, writer):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = [torch.randn(5, 3) for _ in range(7)]
    seen = []
    out = tmp_path / "r"

    def steps(batch):
        for x in batch:
            with torch.no_grad():
                seen.append(model[0](x).double().numpy())
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()

    # neither a block nor the idle flush would commit anything for a long time
    with statscope.record(model, out, block_steps=64, flush_seconds=3600, writer=writer) as rec:
        steps(xs[:5])
        assert _committed(out) == 0
        assert rec.flush() is True
        assert _committed(out) == 5  # step 4 stepped: committed though it has not ended
        ds = statscope.open_run(out)
        want = np.stack([x.mean(0) for x in seen])
        np.testing.assert_allclose(ds.bn_mean.values, want, atol=1e-6)
        rec.log(acc=0.75)  # the evaluation after step 4: joins step 4
        assert rec.flush() is True
        np.testing.assert_array_equal(statscope.open_run(out).acc.values, [np.nan] * 4 + [0.75])
        steps(xs[5:])
    ds = statscope.open_run(out)
    assert ds.step.values.tolist() == list(range(7))
    np.testing.assert_array_equal(ds.acc.values, [np.nan] * 4 + [0.75, np.nan, np.nan])
    np.testing.assert_allclose(ds.bn_mean.values, np.stack([x.mean(0) for x in seen]), atol=1e-6)
    assert verify_run(out) == []


@pytest.mark.parametrize("rule, committed", [("forward", 4), ("manual", 5)])
def test_flush_commits_what_ended_under_the_other_rules(tmp_path, rule, committed):
    model = _model()
    with statscope.record(model, tmp_path / "r", step=rule, flush_seconds=3600,
                          writer="thread") as rec:
        for _ in range(5):
            model(torch.randn(5, 3))
            if rule == "manual":
                rec.step()
        assert rec.flush() is True
        # under "forward" the fifth step ends only when a sixth forward begins
        assert _committed(tmp_path / "r") == committed
    assert _committed(tmp_path / "r") == 5


def test_flush_arguments_and_states(tmp_path):
    rec = statscope.record(_model(), tmp_path / "r")
    with pytest.raises(StatscopeError, match=r"flush\(\): the recorder is not started"):
        rec.flush()
    with rec:
        for bad in (0, -1.0, "5", True, float("nan")):
            with pytest.raises(StatscopeError, match=rf"flush\(timeout={bad!r}\): expected a "):
                rec.flush(timeout=bad)
        rec.root(torch.randn(5, 3))
    assert rec.flush() is True  # closed: close committed everything


def test_flush_on_a_stalled_writer_returns_false_after_the_timeout(tmp_path, monkeypatch):
    model = _model()
    real = RunWriter.flush
    stall = {"on": False}

    def slow(self):
        if stall["on"]:
            time.sleep(1.5)
        return real(self)

    monkeypatch.setattr(RunWriter, "flush", slow)
    with statscope.record(model, tmp_path / "r", step="forward", flush_seconds=3600,
                          writer="thread") as rec:
        for _ in range(3):
            model(torch.randn(5, 3))
        stall["on"] = True
        t0 = time.monotonic()
        with pytest.warns(StatscopeWarning, match=r"flush\(timeout=0.2\): the store .* did not "
                                                  "commit within the timeout"):
            assert rec.flush(timeout=0.2) is False
        assert time.monotonic() - t0 < 1.4  # it did not wait for the writer
        stall["on"] = False
        model(torch.randn(5, 3))
    assert _committed(tmp_path / "r") == 4


def test_flush_on_a_failing_store_stops_recording_or_raises(tmp_path, monkeypatch):
    def full(self):
        raise OSError(28, "No space left on device")

    for on_error in ("stop", "raise"):
        out = tmp_path / on_error
        model = _model()
        rec = statscope.record(model, out, step="forward", flush_seconds=3600, writer="thread",
                               on_error=on_error).start()
        for _ in range(3):
            model(torch.randn(5, 3))
        monkeypatch.setattr(RunWriter, "flush", full)
        if on_error == "stop":
            with pytest.warns(StatscopeWarning, match="recording into .* stopped: the writer "
                                                      "failed .*No space left"):
                assert rec.flush() is False
            assert rec.flush() is False  # stopped: said once
        else:
            with pytest.raises(RecordingError, match="No space left"):
                rec.flush()
        monkeypatch.undo()
        with pytest.raises(RecordingError):
            rec.close()
        assert read_attrs(out)[S.ATTR_STATUS] == S.STATUS_FAILED


def test_flush_after_the_writer_process_was_killed_returns_false_at_once(tmp_path):
    model = _model()
    rec = statscope.record(model, tmp_path / "r", step="forward", flush_seconds=3600,
                           writer="process").start()
    for _ in range(3):
        model(torch.randn(5, 3))
    os.kill(rec._worker.filer.writer.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.warns(StatscopeWarning, match=r"stopped: the writer failed .*was killed by "
                                              "signal 9"):
        assert rec.flush(timeout=30) is False
    assert time.monotonic() - t0 < 10
    with pytest.raises(RecordingError, match="killed by signal 9"):
        rec.close()
    assert read_attrs(tmp_path / "r")[S.ATTR_STATUS] == S.STATUS_FAILED


@pytest.mark.parametrize("writer", ["process", "thread"])
@pytest.mark.parametrize("how", ["moved", "deleted"])
def test_a_run_folder_moved_or_deleted_while_recording_stops_it_cleanly(tmp_path, writer, how):
    """The writer wrote on into the old path, making a folder of stray files there, and the run
    ended 'done' (the outside check): now recording stops, naming the path, nothing is written
    at the old path, and a moved run keeps its committed steps."""
    import shutil

    model = _model()
    out, moved = tmp_path / "r", tmp_path / "moved"
    rec = statscope.record(model, out, step="manual", flush_seconds=3600, writer=writer).start()
    for _ in range(3):
        model(torch.randn(5, 3))
        rec.step()
    assert rec.flush() is True
    if how == "moved":
        os.rename(out, moved)
    else:
        shutil.rmtree(out)
    for _ in range(2):
        model(torch.randn(5, 3))
        rec.step()
    with pytest.warns(StatscopeWarning, match="the run's folder was deleted, moved or replaced"):
        assert rec.flush() is False
    with pytest.raises(RecordingError, match="deleted, moved or replaced"):
        rec.close()
    assert not out.exists()
    if how == "moved":
        ds = statscope.open_run(moved)
        assert ds.sizes["step"] == 3 and (ds["count"].values == 5).all()


def test_blocks_end_at_multiples_of_block_steps_after_an_early_hand_over(tmp_path, monkeypatch):
    # a block handed over early (flush_seconds passed: a pause) is followed by a shorter one, so
    # that blocks end at multiples of block_steps again, where probes decide what depends on the
    # block's end (Capture.take_block): the same steps whatever the timing; so after a resume
    from statscope.probes.steps import Steps

    ends = []
    take = Steps._take_block

    def logged(self):
        block = take(self)
        ends.append((block.first_step + block.n * block.stride, block.n))
        return block

    monkeypatch.setattr(Steps, "_take_block", logged)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    gen = torch.Generator().manual_seed(0)
    with statscope.record(model, tmp_path / "r", block_steps=8, step="manual",
                          flush_seconds=0.5) as rec:
        for step in range(21):
            model(torch.randn(5, 4, generator=gen))
            rec.step()
            if step == 2:
                time.sleep(0.8)
    # the pause at step 2 ended the first block after 4 steps, at the next step's end
    assert ends[:4] == [(4, 4), (8, 4), (16, 8), (21, 5)]
    ends.clear()
    with statscope.record(model, tmp_path / "r", block_steps=8, step="manual",
                          resume=True) as rec:
        for step in range(10):
            model(torch.randn(5, 4, generator=gen))
            rec.step()
    assert ends == [(24, 3), (31, 7)]  # steps 21-30: to 24, then the rest at close
    ds = statscope.open_run(tmp_path / "r")
    np.testing.assert_array_equal(ds.step.values, np.arange(31))
