"""Following runs on disk: a run re-run into its folder, a root that goes away, a killed writer."""

from __future__ import annotations

import dataclasses
import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dashboard_fixtures import (decode, kill_writer, start_writer, synthetic_run,
                                write_synthetic)
from statscope import schema as S
from statscope.dashboards import callbacks as cb
from statscope.dashboards.data import RunCatalog
from statscope.dashboards.layout import status_badges
from statscope.lease import Holder, lease_path
from statscope.store import open_run

STOPPED = "stopped (no writer)"
"""What the page calls a run that says running whose writer is gone."""


def writer_state(path: str) -> str:
    """:func:`statscope.lease.writer_state`, imported when called: a statscope without it fails
    the tests that use it, not the module's others."""
    from statscope.lease import writer_state as state

    return state(path)

def _text(component) -> str:
    """The text of a Dash component tree, as the page shows it."""
    if isinstance(component, (list, tuple)):
        return " ".join(t for t in map(_text, component) if t)
    if isinstance(component, str | int | float):
        return str(component)
    children = getattr(component, "children", None)
    return "" if children is None else _text(children)


def test_a_run_rerun_into_its_folder_is_read_afresh_with_its_caches(tmp_path):
    """``statscope run --overwrite`` into the folder of a finished run the page shows: the
    catalog reads the new run, and every view draws its values, not the old run's cached ones
    (nor new values under the old steps)."""
    root = tmp_path / "runs"
    write_synthetic(root / "r", synthetic_run(300, batch_size=4, seed=1))
    cat = RunCatalog(root)
    evo = "?run=r&neuron=fc1:1&window=all&scalar=-"
    heat = "?tab=heatmap&run=r&layer=fc1&stat=bn_std&window=all"
    # every view computed and cached for the old run
    assert len(decode(cb.evolution(cat, evo))["data"][0]["x"]) == 300
    cb.heatmap(cat, heat)
    assert "batch size 4" in _text(cb.runs_tab(cat, "?tab=run&run=r"))
    assert cat.refresh() == []  # nothing changed: nothing is read again

    write_synthetic(root / "r", synthetic_run(700, batch_size=8, seed=2), overwrite=True)
    assert cat.refresh() == ["r"]
    stored = open_run(root / "r")
    info = cat.info("r")
    assert (info.status, info.n_steps, info.last_step) == (S.STATUS_COMPLETED, 700, 699)
    assert cat.dataset("r").attrs[S.ATTR_META][S.META_BATCH_SIZE] == 8
    fig = decode(cb.evolution(cat, evo))
    (mean,) = [t for t in fig["data"] if t["meta"].get("stat") == S.BN_MEAN]
    np.testing.assert_array_equal(mean["x"], stored[S.STEP].values)
    np.testing.assert_array_equal(mean["y"], stored[S.BN_MEAN].values[:, 1])
    (trace,) = decode(cb.heatmap(cat, heat))["data"]
    fc1 = np.flatnonzero(stored[S.LAYER].values == "fc1")
    np.testing.assert_array_equal(trace["x"], stored[S.STEP].values)
    np.testing.assert_array_equal(trace["z"], stored[S.BN_STD].values[:, fc1].T)
    card = _text(cb.runs_tab(cat, "?tab=run&run=r"))
    assert "batch size 8" in card and "700 steps recorded" in card
    assert cat.refresh() == []


def test_a_root_renamed_away_says_so_and_its_runs_come_back_with_it(tmp_path):
    root = tmp_path / "runs"
    write_synthetic(root / "a", synthetic_run(50))
    cat = RunCatalog(root)
    version, _, notice = cb.poll(cat, 0, None, max_age=0)
    assert version == {"a": 0} and notice == []
    root.rename(tmp_path / "moved")
    version, badges, notice = cb.poll(cat, 1, version, max_age=0)
    assert version == {} and badges == [] and cat.names() == []
    assert f"No statscope runs under {root} (the folder is gone" in _text(notice)
    (tmp_path / "moved").rename(root)
    version, badges, notice = cb.poll(cat, 2, version, max_age=0)
    assert version == {"a": 0} and "a · completed" in _text(badges) and notice == []


# -- a writer that died ------------------------------------------------------------------

@pytest.mark.parametrize("steps", [0, 40], ids=["before-first-step", "after-40-steps"])
def test_a_run_killed_with_sigkill_shows_as_stopped_not_running(tmp_path, steps):
    root = tmp_path / "runs"
    proc = start_writer(root / "k", steps)
    try:
        cat = RunCatalog(root)
        info = cat.info("k")
        assert writer_state(str(root / "k")) == "live"
        assert (info.status, info.writer, info.live, info.label) == ("running", "live", True,
                                                                    "running")
    finally:
        kill_writer(proc)
    assert writer_state(str(root / "k")) == "dead"
    assert cat.refresh() == ["k"]  # same data; its writer's death is news to every page
    info = cat.info("k")
    assert info.status == S.STATUS_RUNNING and info.n_steps == steps  # the store says running
    assert (info.writer, info.live, info.label) == ("dead", False, STOPPED)
    step = "no steps yet" if not steps else f"step {steps - 1}"
    (badge,) = status_badges([info])
    assert _text(badge) == f"k · stopped (no writer) · {step}"
    assert badge.className == "badge badge-stopped"
    assert STOPPED in _text(cb.runs_tab(cat, "?tab=run&run=k"))
    assert cat.refresh() == []  # no longer followed as growing


def test_a_stopped_run_that_is_resumed_is_followed_again(tmp_path):
    kill_writer(start_writer(tmp_path / "k", 20))
    cat = RunCatalog(tmp_path)
    assert cat.info("k").label == STOPPED
    from statscope.store import Layout, ProbeInfo
    from statscope.writer import RunWriter  # the writer LiveRun uses

    probes = (ProbeInfo(name="fc1", module="fc1", type="BatchNorm1d", where="input",
                        channel_dim=1, channels=4, groups=1),)
    writer = RunWriter(tmp_path / "k", Layout(probes=probes), flush_seconds=0, resume=True)
    try:
        assert cat.refresh() == ["k"]
        info = cat.info("k")
        assert (info.label, info.writer, info.n_steps) == ("running", "live", 20)
    finally:
        writer.close()
    assert cat.refresh() == ["k"] and cat.info("k").label == S.STATUS_COMPLETED


def _lease(path: Path, **changes) -> None:
    held = Holder(host=socket.gethostname(), pid=os.getpid(), started="2025-01-01T00:00:00+00:00",
                  owner="x", heartbeat=time.time(), ttl=60.0)
    Path(lease_path(str(path))).write_text(json.dumps({**dataclasses.asdict(held), **changes}))


def test_writer_state_tells_a_live_a_gone_and_an_unknown_holder(tmp_path):
    run = tmp_path / "r"
    write_synthetic(run, synthetic_run(20), status=S.STATUS_RUNNING)
    _lease(run)
    assert writer_state(str(run)) == "live"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(60)
    _lease(run, pid=gone.pid)
    assert writer_state(str(run)) == "dead"
    # a writer process whose training process was killed writes nothing more
    _lease(run, parent=gone.pid)
    assert writer_state(str(run)) == "dead"
    # a run synced from a cluster: its writer may live there
    _lease(run, host="node-17.elsewhere", pid=gone.pid)
    assert writer_state(str(run)) == "unknown"
    Path(lease_path(str(run))).unlink()  # copied without its lease
    assert writer_state(str(run)) == "unknown"
    cat = RunCatalog(tmp_path)
    assert cat.info("r").live and cat.info("r").label == "running"  # not called stopped


def test_a_distributed_run_is_stopped_when_every_running_rank_has_lost_its_writer(tmp_path):
    from dashboard_fixtures import distributed_run
    from statscope.store import read_attrs
    from statscope.dashboards.stamps import writer_of

    distributed_run(tmp_path / "ddp", n_steps=30)
    attrs = read_attrs(tmp_path / "ddp")
    for r in attrs["ranks"].values():
        r[S.ATTR_STATUS] = S.STATUS_RUNNING
    attrs[S.ATTR_STATUS] = S.STATUS_RUNNING
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(60)
    _lease(tmp_path / "ddp" / "rank0", pid=gone.pid)
    _lease(tmp_path / "ddp" / "rank1")
    assert writer_of(str(tmp_path / "ddp"), attrs) == "live"
    _lease(tmp_path / "ddp" / "rank1", pid=gone.pid)
    assert writer_of(str(tmp_path / "ddp"), attrs) == "dead"


@pytest.mark.slow
def test_a_recording_killed_before_its_first_commit_shows_as_stopped(tmp_path):
    """statscope.record in a training process killed with SIGKILL before it committed a step
    (its writer process then ends too): "k0 · stopped (no writer) · no steps yet"."""
    pytest.importorskip("torch")
    script = """
import sys, time, torch, statscope
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16))
with statscope.record(model, sys.argv[1]) as rec:
    model(torch.randn(4, 8)).sum().backward()
    print("ready", flush=True)
    time.sleep(600)
"""
    root = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-c", script, str(root / "k0")],
                            stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 180)
        assert ready and proc.stdout.readline().strip() == "ready"
        cat = RunCatalog(root)
        assert cat.info("k0").label == "running"
    finally:
        kill_writer(proc)
    deadline = time.monotonic() + 60
    while writer_state(str(root / "k0")) != "dead" and time.monotonic() < deadline:
        time.sleep(0.2)
    cat.refresh()
    info = cat.info("k0")
    assert (info.status, info.n_steps, info.label) == (S.STATUS_RUNNING, 0, STOPPED)
    assert _text(status_badges([info])) == "k0 · stopped (no writer) · no steps yet"
