import os

import numpy as np
import pytest

from dashboard_fixtures import LiveRun, synthetic_run, write_synthetic
from statscope import schema as S
from statscope.dashboards.data import ByteLRU, RunCatalog, parse_neuron_key
from statscope.errors import StatscopeError, StoreError


def test_catalog_lists_runs_in_natural_order_and_reads_the_store(store_root):
    cat = RunCatalog(store_root)
    assert cat.names() == ["bs4", "bs128"]
    ref = synthetic_run(batch_size=4, seed=1)
    cols = cat.columns("bs4", S.EN_STD, [0, 3, 5])
    np.testing.assert_array_equal(cols, ref[S.EN_STD].values[:, [0, 3, 5]])
    info = cat.info("bs4")
    assert (info.status, info.n_steps, info.last_step) == (S.STATUS_COMPLETED, 400, 399)


def test_a_corrupt_store_is_reported_and_the_good_runs_still_open(store_root):
    bad = store_root / "broken"
    bad.mkdir()
    (bad / "zarr.json").write_text("{not json")
    cat = RunCatalog(store_root)
    assert cat.names() == ["bs4", "bs128"]
    assert list(cat.errors()) == ["broken"]
    assert "broken" in cat.errors()["broken"]


def test_a_single_run_path_is_its_own_catalog(store_root):
    cat = RunCatalog(store_root / "bs128")
    assert cat.names() == ["bs128"]


def test_missing_root_raises(tmp_path):
    with pytest.raises(StoreError, match="no such file"):
        RunCatalog(tmp_path / "nope")


def test_names_from_requests_never_escape_the_root(store_root, tmp_path):
    outside = tmp_path / "outside"
    write_synthetic(outside, synthetic_run(n_steps=50))
    os.symlink(outside, store_root / "link")
    cat = RunCatalog(store_root)
    assert "link" not in cat.names() and "outside" not in cat.names()
    assert cat.valid(["../outside", str(outside), "bs4", "/etc/passwd", 3, "link"]) == ["bs4"]
    with pytest.raises(StatscopeError, match="no such run"):
        cat.dataset("../outside")


def test_cache_holds_columns_and_forgets_a_run_that_grows(tmp_path):
    live = LiveRun(tmp_path / "live")
    first = live.append(30)
    cat = RunCatalog(tmp_path)
    assert cat.info("live").status == S.STATUS_RUNNING
    a = cat.columns("live", S.BN_MEAN, [1])
    np.testing.assert_array_equal(a[:, 0], first[S.BN_MEAN][:, 1])
    cat.columns("live", S.BN_MEAN, [1])
    assert len(cat.cache) == 1  # the second read came from the cache
    assert cat.refresh() == []
    second = live.append(20)
    assert cat.refresh() == ["live"]
    b = cat.columns("live", S.BN_MEAN, [1])
    both = np.concatenate([first[S.BN_MEAN], second[S.BN_MEAN]])
    np.testing.assert_array_equal(b[:, 0], both[:, 1])
    live.close()
    assert cat.refresh() == ["live"] and cat.info("live").status == S.STATUS_COMPLETED
    assert cat.refresh() == []


def test_byte_lru_evicts_oldest_first():
    lru = ByteLRU(max_bytes=3 * 800)
    for i in range(5):
        lru.put(i, np.zeros(100))  # 800 bytes each
    assert [lru.get(i) is not None for i in range(5)] == [False, False, True, True, True]
    assert lru.nbytes == 2400


def test_parse_neuron_key():
    assert parse_neuron_key("layer1.0.bn1:in:12") == ("layer1.0.bn1:in", 12)
    with pytest.raises(StatscopeError, match="neuron="):
        parse_neuron_key("fc1")


def test_slices_and_whole_columns_agree(store_root):
    cat = RunCatalog(store_root)
    ref = synthetic_run(batch_size=4, seed=1)[S.BN_STD].values
    part = cat.columns("bs4", S.BN_STD, [6, 1], slice(350, 400))  # read as a slice
    np.testing.assert_array_equal(part, ref[350:400][:, [6, 1]])
    whole = cat.columns("bs4", S.BN_STD, [6, 1])  # whole columns, cached
    np.testing.assert_array_equal(whole, ref[:, [6, 1]])
    np.testing.assert_array_equal(cat.columns("bs4", S.BN_STD, [1], slice(10, 20)), ref[10:20, [1]])


def test_a_run_made_of_links_to_files_outside_the_root_is_not_served(store_root, tmp_path):
    """A real folder inside the root whose files are symlinks to a run elsewhere."""
    outside = tmp_path / "elsewhere"
    write_synthetic(outside, synthetic_run(n_steps=50))
    mirror = store_root / "mirror"
    for src in outside.rglob("*"):
        dst = mirror / src.relative_to(outside)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(src, dst)
    cat = RunCatalog(store_root)
    assert cat.names() == ["bs4", "bs128"]
    assert "not served" in cat.errors()["mirror"] and "resolves outside" in cat.errors()["mirror"]
    assert cat.valid(["mirror"]) == []
    # one linked chunk is enough
    inside = store_root / "half"
    write_synthetic(inside, synthetic_run(n_steps=50))
    chunk = next(p for p in inside.rglob("*") if p.is_file() and p.name != "zarr.json")
    target = tmp_path / "chunk"
    target.write_bytes(chunk.read_bytes())
    chunk.unlink()
    os.symlink(target, chunk)
    cat = RunCatalog(store_root)
    assert "half" not in cat.names() and "not served" in cat.errors()["half"]
    # links that stay inside the root are fine (a run folder linked under another name)
    os.symlink(store_root / "bs4", store_root / "alias")
    assert "alias" in RunCatalog(store_root).names()


def test_outside_links_finds_links_at_any_depth_and_survives_loops(tmp_path):
    from statscope.dashboards.data import outside_links

    root = tmp_path / "root"
    run = root / "run"
    (run / "a" / "b").mkdir(parents=True)
    (run / "a" / "b" / "ok").write_text("x")
    os.symlink(run, run / "a" / "loop")  # a loop inside the root is searched once
    assert outside_links(run, root.resolve()) == []
    (tmp_path / "secret").write_text("x")
    os.symlink(tmp_path / "secret", run / "a" / "b" / "leak")
    assert outside_links(run, root.resolve()) == [os.path.join("a", "b", "leak")]
    assert outside_links(tmp_path, root.resolve()) == ["."]


def test_runs_are_found_by_the_stores_scan_runs(store_root, monkeypatch):
    import statscope.store

    calls = []
    real = statscope.store.scan_runs
    monkeypatch.setattr(statscope.store, "scan_runs", lambda root: calls.append(root) or real(root))
    cat = RunCatalog(store_root)
    assert cat.names() == ["bs4", "bs128"] and len(calls) == 1
    # nothing under the root changed: the next refresh does not scan it again
    cat.refresh()
    assert len(calls) == 1
    write_synthetic(store_root / "bs16", synthetic_run(n_steps=30))
    assert cat.refresh() == ["bs16"] and len(calls) == 2
    assert cat.names() == ["bs4", "bs16", "bs128"]
