"""The run store: round trip, stacking, readers during writes, SIGKILL, resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr

import statscope
from statscope import schema as S
from statscope.errors import StatscopeError, StoreError
from statscope.store import Layout, ProbeInfo
from statscope.writer import RunWriter, write_run


def synthetic(t=50, seed=0, sizes=(4, 6), groups=(1, 2)):
    rng = np.random.default_rng(seed)
    n, g = sum(sizes), sum(groups)
    probes = [ProbeInfo(f"l{i}", f"l{i}", "BatchNorm1d", "input", 1, c, gr)
              for i, (c, gr) in enumerate(zip(sizes, groups))]
    data = {"bn_mean": rng.normal(size=(t, n)).astype(np.float32),
            "bn_std": rng.random((t, n)).astype(np.float32),
            "en_mean": rng.normal(size=(t, g)).astype(np.float32),
            "en_std": rng.random((t, g)).astype(np.float32)}
    return probes, data


def test_round_trip_expands_groups_and_keeps_attrs(tmp_path):
    probes, data = synthetic()
    count = np.tile([4, 4], (50, 1))
    write_run(tmp_path / "r", probes, data, count=count, steps=np.arange(100, 150),
              scalars={"loss": np.linspace(1, 0, 50)}, meta={"batch_size": 4, "seed": 3})
    ds = statscope.open_run(tmp_path / "r")
    assert dict(ds.sizes) == {"step": 50, "neuron": 10}
    assert ds.step.values[0] == 100 and ds.attrs["last_step"] == 149
    assert ds.layer.values.tolist() == ["l0"] * 4 + ["l1"] * 6
    assert ds.unit.values.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    assert ds.group.values.tolist() == [0] * 4 + [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(ds.bn_std.values, data["bn_std"])
    np.testing.assert_array_equal(ds.en_mean.values[:, 4:7], np.repeat(data["en_mean"][:, 1:2], 3, 1))
    np.testing.assert_array_equal(ds.en_std.values[:, 7:], np.repeat(data["en_std"][:, 2:3], 3, 1))
    assert ds.bn_mean.dtype == np.float32 and ds["count"].dtype == np.int64
    assert ds.bn_mean.chunks is not None  # lazy and chunked
    assert ds.attrs["meta"] == {"batch_size": 4, "seed": 3}
    assert ds.attrs["statscope_format"] == S.FORMAT_VERSION
    assert ds.attrs["std_definition"].startswith("population")
    np.testing.assert_allclose(ds.loss.values, np.linspace(1, 0, 50))


def test_plain_xarray_reads_the_run_as_store_format_md_says(tmp_path):
    import xarray as xr
    probes, data = synthetic()
    write_run(tmp_path / "r", probes, data, count=np.tile([4, 4], (50, 1)),
              steps=np.arange(100, 150), scalars={"loss": np.linspace(1, 0, 50)})
    ds = xr.open_zarr(tmp_path / "r", consolidated=False)  # warnings are errors here
    assert ds.bn_std.dims == ("step", "neuron") and ds.en_std.dims == ("step", "en_group")
    assert ds["count"].dims == ("step", "probe") and ds.step.values.tolist() == list(range(100, 150))
    np.testing.assert_array_equal(ds.bn_std.values, data["bn_std"])
    np.testing.assert_array_equal(ds.en_mean.values, data["en_mean"])
    assert ds.attrs["statscope_format"] == S.FORMAT_VERSION and "layer" not in ds.coords


def test_open_runs_stacks_with_meta_coords_and_pads_shorter_runs(tmp_path):
    probes, data = synthetic(t=30)
    write_run(tmp_path / "runs" / "a", probes, data, meta={"batch_size": 4, "seed": 0})
    write_run(tmp_path / "runs" / "b", probes, {k: v[:10] for k, v in data.items()},
              meta={"batch_size": 128, "seed": 0})
    (tmp_path / "runs" / "junk").mkdir()
    ds = statscope.open_runs(tmp_path / "runs")
    assert ds.run.values.tolist() == ["a", "b"]
    assert ds.batch_size.values.tolist() == [4, 128]
    assert ds.n_steps.values.tolist() == [30, 10]
    assert (ds["count"].sel(run="b").values[10:] == 0).all()
    assert np.isnan(ds.bn_mean.sel(run="b").values[10:]).all()
    other, odata = synthetic(t=5, sizes=(3,), groups=(1,))
    write_run(tmp_path / "c", other, odata)
    with pytest.raises(StoreError, match="only runs with the same layers can be stacked"):
        statscope.open_runs([tmp_path / "runs" / "a", tmp_path / "c"])
    wider, wdata = synthetic(t=5, sizes=(4, 8))  # the same names, another width
    write_run(tmp_path / "w", wider, wdata)
    with pytest.raises(StoreError, match=r"has layers \{'l0': 4, 'l1': 8\}, but .* has "
                                         r"\{'l0': 4, 'l1': 6\}"):
        statscope.open_runs([tmp_path / "runs" / "a", tmp_path / "w"])
    with pytest.raises(StoreError, match="no statscope runs found"):
        statscope.open_runs(tmp_path / "runs" / "junk")


def test_reader_sees_a_consistent_prefix_while_writing(tmp_path):
    probes, data = synthetic(t=40)
    layout = Layout(tuple(probes))
    writer = RunWriter(tmp_path / "r", layout, chunk_steps=16, flush_seconds=0)
    seen = []
    for i in range(0, 40, 5):
        writer.append(np.arange(i, i + 5), np.ones((5, 2)), {k: v[i:i + 5] for k, v in data.items()})
        ds = statscope.open_run(tmp_path / "r")
        seen.append(ds.sizes["step"])
        np.testing.assert_array_equal(ds.bn_mean.values, data["bn_mean"][:ds.sizes["step"]])
        assert ds.attrs["status"] == "running"
    writer.close()
    assert seen == list(range(5, 45, 5))


def test_rows_past_the_commit_marker_are_invisible_and_dropped_on_resume(tmp_path):
    probes, data = synthetic(t=20)
    write_run(tmp_path / "r", probes, data, status="running")
    group = zarr.open_group(str(tmp_path / "r"), mode="r+")
    group.attrs["n_steps"] = 12  # as if the writer died after writing data, before committing
    group.attrs["last_step"] = 11
    assert statscope.open_run(tmp_path / "r").sizes["step"] == 12
    writer = RunWriter(tmp_path / "r", Layout(tuple(probes)), resume=True)
    assert writer.next_step == 12 and zarr.open_array(str(tmp_path / "r" / "bn_mean")).shape[0] == 12
    writer.append(np.arange(12, 14), np.ones((2, 2)), {k: v[:2] for k, v in data.items()})
    writer.close()
    ds = statscope.open_run(tmp_path / "r")
    assert ds.step.values.tolist() == list(range(14))
    np.testing.assert_array_equal(ds.bn_std.values[12:], data["bn_std"][:2])


KILLED = textwrap.dedent("""
    import sys, time, torch, statscope
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16))
    rec = statscope.record(model, sys.argv[1], block_steps=8, flush_seconds=0.05).start()
    step = 0
    while True:
        model(torch.randn(4, 8))
        step += 1
        if step == 200:
            print("ready", flush=True)
        time.sleep(0.0005)
""")


def test_sigkill_mid_run_leaves_a_readable_store(tmp_path):
    with subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path / "r")],
                          stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(0.3)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
    ds = statscope.open_run(tmp_path / "r")
    n = ds.sizes["step"]
    assert ds.attrs["status"] == "running" and n >= 100
    assert ds.step.values.tolist() == list(range(n))
    assert np.isfinite(ds.bn_std.values).all() and (ds["count"].values == 4).all()


def test_bad_paths_and_formats(tmp_path):
    with pytest.raises(StoreError, match="no such file or directory"):
        statscope.open_run(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match=r"not a statscope run \(no zarr.json\)$"):
        statscope.open_run(tmp_path / "plain")
    # a writer's first moments: the folder and its lease, no root document yet
    (tmp_path / "plain.lease").write_text("{}")
    with pytest.raises(StoreError, match="a writer may be creating the run this moment"):
        statscope.open_run(tmp_path / "plain")
    probes, data = synthetic(t=3)
    write_run(tmp_path / "r", probes, data)
    meta = tmp_path / "r" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["statscope_format"] = 99
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="format version 99 is unknown"):
        statscope.open_run(tmp_path / "r")
    doc["attributes"]["statscope_format"] = 2.0  # equal to 2, but no writer writes a float
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="format version 2.0 is unknown"):
        statscope.open_run(tmp_path / "r")
    with pytest.raises(StoreError, match="already exists"):
        write_run(tmp_path / "r", probes, data)
    with pytest.raises(StatscopeError, match="groups=4 for layer 'l1'"):
        write_run(tmp_path / "g", [ProbeInfo("l1", "l1", "x", "input", 1, 6, 4)], data)


def test_store_opens_by_url(tmp_path):
    probes, data = synthetic(t=4)
    write_run("memory://statscope-test/run", probes, data)
    ds = statscope.open_run("memory://statscope-test/run")
    np.testing.assert_array_equal(ds.bn_mean.values, data["bn_mean"])
    write_run(f"file://{tmp_path}/f", probes, data)
    assert statscope.open_run(f"file://{tmp_path}/f").sizes["step"] == 4
