"""``damaged="mask"`` masks the chunks that fail their checksum, not the shard around them; damage
messages name the axis they count and the function that reads the array."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

import statscope
from statscope import schema as S
from statscope.errors import StoreDamagedError
from statscope.store import Layout, ProbeInfo, open_windows, verify_run
from statscope.writer import RunWriter, write_run

T, WIDTHS, W = 2500, {"fc1": 100, "fc2": 28}, 200  # one shard of 3 x 2 chunks of 1024 x 64
N_WINDOWS = 13  # the last one partial


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    rng = np.random.default_rng(0)
    n = sum(WIDTHS.values())
    data = {"bn_mean": rng.normal(size=(T, n)).astype("f4"),
            "bn_std": rng.uniform(0.5, 2.0, size=(T, n)).astype("f4"),
            "en_mean": rng.normal(size=(T, 2)).astype("f4"),
            "en_std": rng.uniform(0.5, 2.0, size=(T, 2)).astype("f4")}
    path = tmp_path_factory.mktemp("pristine") / "run"
    write_run(path, WIDTHS, data, scalars={"loss": rng.normal(size=T)})
    return path, data


@pytest.fixture
def run(pristine, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(pristine[0], path)
    return path, pristine[1]


def shard_index(shard_file, grid):
    """(offset, nbytes) of each chunk of a shard whose index sits at its end (zarr v3 sharding:
    C-order uint64 pairs, then the index's crc32c)."""
    raw = Path(shard_file).read_bytes()
    n = int(np.prod(grid))
    index = np.frombuffer(raw[-(16 * n + 4):-4], "<u8").reshape(*grid, 2)
    return index, len(raw)


def garble(path, offset):
    raw = bytearray(Path(path).read_bytes())
    raw[offset] ^= 0x10
    Path(path).write_bytes(bytes(raw))


def garble_chunk(run_path, array, chunk):
    """Flip one byte in the middle of the stored bytes of ``chunk`` (its index in the shard)."""
    arr = zarr.open_array(os.path.join(run_path, array), mode="r")
    grid = tuple(s // c for s, c in zip(arr.shards, arr.chunks))
    shard = os.path.join(run_path, array, "c", *["0"] * arr.ndim)
    index, _ = shard_index(shard, grid)
    offset, nbytes = (int(v) for v in index[chunk])
    garble(shard, offset + nbytes // 2)
    return arr


def unreadable_chunks(arr, rows):
    """Which chunks zarr itself cannot read, chunk by chunk (the independent reference)."""
    bad = []
    for r in range(0, rows, arr.chunks[0]):
        for c in range(0, arr.shape[1], arr.chunks[1]):
            try:
                arr[r:r + arr.chunks[0], c:c + arr.chunks[1]]
            except Exception:  # noqa: BLE001 - the checksum error
                bad.append((r, c))
    return bad


def test_one_damaged_chunk_masks_only_that_chunk(run):
    path, data = run
    arr = garble_chunk(path, "bn_mean", (1, 0))
    assert arr.chunks == (1024, 64) and arr.shards[0] >= T  # several chunks in one shard
    assert unreadable_chunks(arr, T) == [(1024, 0)]
    ds = statscope.open_run(path, damaged="mask")
    [d] = ds.attrs["damaged"]
    assert (d["array"], d["rows"], d["columns"]) == ("bn_mean", [1024, 2048], [0, 64])
    assert "checksum" in d["reason"]
    want = data["bn_mean"].copy()
    want[1024:2048, :64] = np.nan
    np.testing.assert_array_equal(ds.bn_mean.values, want)
    np.testing.assert_array_equal(ds.bn_std.values, data["bn_std"])
    assert [(d.array, d.rows, d.columns) for d in verify_run(path)] == \
        [("bn_mean", (1024, 2048), (0, 64))]
    with pytest.raises(StoreDamagedError, match=r"'bn_mean' rows 0\.\.2499 cannot be read"):
        statscope.open_run(path).bn_mean.values


def test_two_damaged_chunks_of_a_shard_and_a_1d_array(run):
    path, data = run
    garble_chunk(path, "bn_std", (0, 1))
    arr = garble_chunk(path, "bn_std", (2, 0))
    assert unreadable_chunks(arr, T) == [(0, 64), (2048, 0)]
    garble_chunk(path, "loss", (1,))
    ds = statscope.open_run(path, damaged="mask")
    got = {(d["array"], tuple(d["rows"]), d["columns"] and tuple(d["columns"]))
           for d in ds.attrs["damaged"]}
    assert got == {("bn_std", (0, 1024), (64, 128)), ("bn_std", (2048, 2500), (0, 64)),
                   ("loss", (1024, 2048), None)}
    want = data["bn_std"].copy()
    want[:1024, 64:] = np.nan
    want[2048:, :64] = np.nan
    np.testing.assert_array_equal(ds.bn_std.values, want)
    assert np.isnan(ds.loss.values[1024:2048]).all()
    assert np.isfinite(ds.loss.values[:1024]).all() and np.isfinite(ds.loss.values[2048:]).all()
    # a few neurons read alone: only their chunks are decoded, and masked alike
    np.testing.assert_array_equal(ds.bn_std.isel(neuron=[3, 70]).values, want[:, [3, 70]])


def test_a_damaged_shard_index_masks_the_whole_shard(run):
    path, data = run
    shard = os.path.join(path, "bn_mean", "c", "0", "0")
    garble(shard, os.path.getsize(shard) - 10)  # inside the index: no chunk can be located
    ds = statscope.open_run(path, damaged="mask")
    [d] = ds.attrs["damaged"]
    assert (d["rows"], d["columns"]) == ([0, T], [0, 128])
    assert np.isnan(ds.bn_mean.values).all()
    np.testing.assert_array_equal(ds.bn_std.values, data["bn_std"])


def test_a_damaged_window_chunk_masks_only_its_columns(run):
    path, data = run
    garble_chunk(path, f"{S.WINDOWS_GROUP}/bn_mean_mean", (0, 1))
    ws = open_windows(path, damaged="mask")
    [d] = ws.attrs["damaged"]
    assert (d["array"], d["rows"], d["columns"]) == ("windows/bn_mean_mean", [0, N_WINDOWS],
                                                     [64, 128])
    means = ws.bn_mean.sel(summary="mean").values
    ref = np.stack([data["bn_mean"][k * W:(k + 1) * W].mean(axis=0)  # count 1 at every step
                    for k in range(N_WINDOWS)])
    np.testing.assert_allclose(means[:, :64], ref[:, :64], rtol=1e-5, atol=1e-6)
    assert np.isnan(means[:, 64:]).all()


def test_window_damage_names_open_windows(run):
    path, _ = run
    garble_chunk(path, f"{S.WINDOWS_GROUP}/bn_std_std", (0, 0))
    with pytest.raises(StoreDamagedError, match=r"'windows/bn_std_std' windows 0\.\.12 cannot "
                                                 r"be read .*damaged='mask' to open_windows"):
        open_windows(path).compute()
    os.remove(os.path.join(path, S.WINDOWS_GROUP, "en_mean_mean", "c", "0", "0"))
    with pytest.raises(StoreDamagedError, match=r"'windows/en_mean_mean' windows 0\.\.12, "
                                                 r"columns 0\.\.1: missing; pass damaged='mask' "
                                                 r"to open_windows"):
        open_windows(path)


def test_a_missing_running_mean0_is_named_by_its_neurons(tmp_path):
    n = sum(WIDTHS.values())
    probes = [ProbeInfo(k, k, "BatchNorm1d", "input", 1, c) for k, c in WIDTHS.items()]
    rng = np.random.default_rng(1)
    stats = {"bn_mean": rng.normal(size=(600, n)).astype("f4"),
             "bn_std": rng.uniform(1, 2, size=(600, n)).astype("f4"),
             "en_mean": rng.normal(size=(600, 2)).astype("f4"),
             "en_std": rng.uniform(1, 2, size=(600, 2)).astype("f4")}
    writer = RunWriter(tmp_path / "run", Layout(tuple(probes), tuple(stats)),
                       running0={S.RUNNING_MEAN0: np.zeros(n, "f4"),
                                 S.RUNNING_VAR0: np.ones(n, "f4")})
    writer.append(np.arange(600), np.ones((600, 2), np.int64), stats)
    writer.close()
    np.testing.assert_array_equal(statscope.open_run(tmp_path / "run").running_var0.values, 1.0)
    os.remove(tmp_path / "run" / S.RUNNING_MEAN0 / "c" / "0")
    with pytest.raises(StoreDamagedError) as err:
        statscope.open_run(tmp_path / "run")
    assert f"'running_mean0' neurons 0..{n - 1}: missing" in str(err.value)
    assert "steps" not in str(err.value)


def test_verify_run_lists_what_open_run_and_open_windows_refuse(run, tmp_path):
    # it checked only the per-step arrays and the scalars: damaged window summaries or running
    # statistics at the start were "intact" while the readers refused them
    path, _ = run
    assert verify_run(path) == []
    arr = garble_chunk(path, f"{S.WINDOWS_GROUP}/bn_std_mean", (0, 1))
    [d] = verify_run(path)
    assert d.array == "windows/bn_std_mean" and unreadable_chunks(arr, N_WINDOWS) == [(0, 64)]
    with pytest.raises(StoreDamagedError):
        open_windows(path).compute()
    n = sum(WIDTHS.values())
    probes = [ProbeInfo(k, k, "BatchNorm1d", "input", 1, c) for k, c in WIDTHS.items()]
    stats = {s: np.ones((4, 2 if s.startswith("en") else n), "f4")
             for s in ("bn_mean", "bn_std", "en_mean", "en_std")}
    writer = RunWriter(tmp_path / "r0", Layout(tuple(probes), tuple(stats)),
                       running0={S.RUNNING_MEAN0: np.zeros(n, "f4"),
                                 S.RUNNING_VAR0: np.ones(n, "f4")})
    writer.append(np.arange(4), np.ones((4, 2), np.int64), stats)
    writer.close()
    assert verify_run(tmp_path / "r0") == []
    garble(tmp_path / "r0" / S.RUNNING_MEAN0 / "c" / "0", 40)
    with pytest.raises(StoreDamagedError):
        statscope.open_run(tmp_path / "r0").compute()
    assert [d.array for d in verify_run(tmp_path / "r0")] == [S.RUNNING_MEAN0]
