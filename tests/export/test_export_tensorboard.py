"""``statscope.export``: TensorBoard event files read back and checked against numpy."""

import doctest

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("tensorboard")

import statscope
import statscope.export as E
from statscope.errors import StatscopeError, StoreDamagedError
from statscope.writer import write_run

from export_reference import append_rows, read_events, reference_window

LAYERS = {"fc1": 3, "fc2:in": 2}


def synthetic(seed=0, n_steps=50, idle=(), gaps=()):
    """Data of a two-layer run: EN with one group per layer, fc2 idle at ``idle`` steps,
    NaN ``loss`` at ``gaps``."""
    rng = np.random.default_rng(seed)
    n = sum(LAYERS.values())
    data = {"bn_mean": rng.normal(size=(n_steps, n)).astype("f4"),
            "bn_std": rng.uniform(0.5, 2.0, size=(n_steps, n)).astype("f4"),
            "en_mean": rng.normal(size=(n_steps, 2)).astype("f4"),
            "en_std": rng.uniform(0.5, 2.0, size=(n_steps, 2)).astype("f4")}
    count = np.tile(np.array([4, 12]), (n_steps, 1))
    count[list(idle), 1] = 0
    loss = rng.normal(size=n_steps)
    loss[list(gaps)] = np.nan
    return data, count, {"loss": loss}


def expanded(data, count):
    """Statistics and count per neuron, as open_run shows them."""
    group = np.repeat(np.arange(len(LAYERS)), list(LAYERS.values()))
    full = {s: (v[:, group] if s.startswith("en_") else v) for s, v in data.items()}
    return full, count[:, group], np.repeat(list(LAYERS), list(LAYERS.values()))


def check_against_numpy(log_dir, data, count, scalars, window, offset=0, steps=None):
    """Every exported value equals the numpy reference; returns how many windows there were."""
    steps = np.arange(len(count)) if steps is None else steps
    full, ncount, layers = expanded(data, count)
    tb_scalars, tb_hists, _ = read_events(log_dir)
    k_last = (int(steps[-1]) + 1) // window
    for k in range(int(np.ceil(steps[0] / window)), k_last):
        ref = reference_window(full, ncount, layers, steps, k * window, (k + 1) * window)
        at = (k + 1) * window - 1 + offset
        for (scale_free, stat), per_neuron in ref.items():
            for layer in LAYERS:
                values = per_neuron[layers == layer]
                suffix = "_scale_free" if scale_free else ""
                tag = f"fluctuation{suffix}/{layer}/{stat}"
                if np.all(np.isnan(values)):
                    assert at not in tb_scalars.get(tag, {})
                    continue
                assert tb_scalars[tag][at] == pytest.approx(np.nanmedian(values), rel=1e-5)
                finite = values[np.isfinite(values)]
                hist_tag = f"neurons{suffix}/{layer}/{stat}"
                if finite.size == 0:  # an infinite value has no bucket
                    assert at not in tb_hists.get(hist_tag, {})
                    continue
                h = tb_hists[hist_tag][at]
                assert h.num == finite.size
                assert h.sum == pytest.approx(finite.sum(), rel=1e-6)
                assert (h.min, h.max) == pytest.approx((finite.min(), finite.max()), rel=1e-6)
    for name, values in scalars.items():
        ok = ~np.isnan(values)  # NaN: not logged; ±inf: a value
        expect = {int(s) + offset: v for s, v in zip(steps[ok], values[ok])}
        got = tb_scalars[f"scalars/{name}"]
        assert got.keys() == expect.keys()
        assert [got[s] for s in expect] == pytest.approx(list(expect.values()), rel=1e-6)
    fluct_steps = set(tb_scalars["fluctuation/fc1/bn_mean"])
    assert all(s <= k_last * window - 1 + offset for s in fluct_steps)  # complete windows only
    return len(fluct_steps)


def test_export_matches_numpy_per_window_and_neuron(tmp_path):
    data, count, scalars = synthetic(idle=[3, 4, 30], gaps=[1, 7, 8])
    write_run(tmp_path / "run", LAYERS, data, count=count, scalars=scalars)
    result = E.export_run(tmp_path / "run", "tensorboard", tmp_path / "tb", window=10)
    assert result.windows == 5 and result.last_step == 49
    assert check_against_numpy(tmp_path / "tb", data, count, scalars, window=10) == 5
    # 5 windows x 2 layers x 4 statistics x (raw, scale-free), plus 47 finite losses
    assert (result.scalars, result.histograms) == (80 + 47, 80)


def test_infinite_scalars_are_exported_and_nan_is_left_out(tmp_path):
    # a diverged loss (inf) was left out of the export like a step without a value (NaN)
    data, count, scalars = synthetic(n_steps=30, gaps=[3, 22])
    scalars["loss"][[5, 17]] = [np.inf, -np.inf]
    scalars["lr"] = np.where(np.arange(30) % 7 == 0, np.inf, 0.1)
    write_run(tmp_path / "run", LAYERS, data, count=count, scalars=scalars)
    result = E.export_run(tmp_path / "run", "tensorboard", tmp_path / "tb", window=10)
    assert check_against_numpy(tmp_path / "tb", data, count, scalars, window=10) == 3
    tb_scalars, _, _ = read_events(tmp_path / "tb")
    loss = tb_scalars["scalars/loss"]
    assert sorted(loss) == [s for s in range(30) if s not in (3, 22)]
    assert (loss[5], loss[17]) == (np.inf, -np.inf)
    assert [s for s, v in tb_scalars["scalars/lr"].items() if v == np.inf] == [0, 7, 14, 21, 28]
    assert result.scalars == sum(len(points) for points in tb_scalars.values())


def test_offset_shifts_every_step_and_the_partial_window_is_left_out(tmp_path):
    data, count, scalars = synthetic(n_steps=37)
    write_run(tmp_path / "run", LAYERS, data, count=count, scalars=scalars)
    result = E.export_run(tmp_path / "run", "tensorboard", tmp_path / "tb", window=8, offset=1)
    assert result.windows == 4  # steps 32..36 are an incomplete window
    assert check_against_numpy(tmp_path / "tb", data, count, scalars, window=8, offset=1) == 4
    tb_scalars, _, _ = read_events(tmp_path / "tb")
    assert sorted(tb_scalars["fluctuation/fc1/bn_std"]) == [8, 16, 24, 32]
    assert min(tb_scalars["scalars/loss"]) == 1


def test_exporting_again_replaces_the_earlier_export_and_keeps_other_event_files(tmp_path):
    # a second export into the folder added a second event file with the same steps: every
    # window twice in TensorBoard (an outside check)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path / "tb") as theirs:  # the trainer's own events, same folder
        theirs.add_scalar("train/loss", 1.5, 3)
    data, count, scalars = synthetic(n_steps=30)
    write_run(tmp_path / "run", LAYERS, data, count=count, scalars=scalars)
    E.export_run(tmp_path / "run", "tensorboard", tmp_path / "tb", window=10)
    data, count, scalars = synthetic(n_steps=50)  # the run grew
    write_run(tmp_path / "run", LAYERS, data, count=count, scalars=scalars, overwrite=True)
    E.export_run(tmp_path / "run", "tensorboard", tmp_path / "tb", window=10)
    _, _, acc = read_events(tmp_path / "tb")
    steps = [e.step for e in acc.Scalars("fluctuation/fc1/bn_mean")]
    assert steps == [9, 19, 29, 39, 49]
    assert [e.value for e in acc.Scalars("train/loss")] == [1.5]
    assert check_against_numpy(tmp_path / "tb", data, count, scalars, window=10) == 5


def event_files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_failed_export_leaves_the_folder_as_it_was(tmp_path):
    # an export of a damaged run stopped at the first unreadable window and left an event file
    # holding only the scalars; a second export had already removed the earlier, good one
    data, count, scalars = synthetic(n_steps=30)
    write_run(tmp_path / "run", LAYERS, data, count=count, scalars=scalars)
    E.export_run(tmp_path / "run", "tensorboard", tmp_path / "tb", window=10)
    before = {p.name: p.read_bytes() for p in (tmp_path / "tb").iterdir()}
    chunk = tmp_path / "run" / "bn_mean" / "c" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    for target in ("tb", "fresh"):
        with pytest.raises(StoreDamagedError, match="'bn_mean'"):
            E.export_run(tmp_path / "run", "tensorboard", tmp_path / target, window=10)
    assert {p.name: p.read_bytes() for p in (tmp_path / "tb").iterdir()} == before
    assert check_against_numpy(tmp_path / "tb", data, count, scalars, window=10) == 3
    assert event_files(tmp_path / "fresh") == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_a_staged_sink_shows_nothing_until_closed(tmp_path):
    sink = E.open_sink("tensorboard", tmp_path / "tb", staged=True)
    sink.write([E.Scalar("scalars/loss", 3, 1.5)])
    sink.flush()
    # TensorBoard reads every file with "tfevents" in its name: the staged one has none
    assert [n for n in event_files(tmp_path / "tb") if "tfevents" in n] == []
    assert read_events(tmp_path / "tb")[0] == {}
    sink.close()
    [name] = event_files(tmp_path / "tb")
    assert name.startswith("events.out.tfevents.") and name.endswith(".statscope")
    assert read_events(tmp_path / "tb")[0] == {"scalars/loss": {3: 1.5}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tb"]


def test_custom_scalars_layout_pairs_bn_with_en_per_layer(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2

    data, count, scalars = synthetic()
    write_run(tmp_path / "run", LAYERS, data, count=count, scalars=scalars)
    E.export_run(tmp_path / "run", "tensorboard", tmp_path / "tb", window=10)
    _, _, acc = read_events(tmp_path / "tb")
    [event] = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["fc2:in mean"] == ["^fluctuation_scale_free/fc2:in/bn_mean$",
                                     "^fluctuation_scale_free/fc2:in/en_mean$"]
    assert charts["fc1 BN"] == ["^fluctuation_scale_free/fc1/bn_mean$",
                                "^fluctuation_scale_free/fc1/bn_std$"]


def test_incremental_updates_write_each_window_and_scalar_once(tmp_path):
    data, count, scalars = synthetic(n_steps=60, idle=[25])
    run = tmp_path / "run"
    exporter = E.Exporter(run, E.open_sink("tensorboard", tmp_path / "tb"), window=10)
    assert exporter.update() == E.ExportResult()  # no store yet: nothing, no error
    write_run(run, LAYERS, {s: v[:23] for s, v in data.items()}, count=count[:23],
              scalars={k: v[:23] for k, v in scalars.items()})
    first = exporter.update()
    assert (first.windows, first.last_step) == (2, 22)
    assert exporter.update().windows == 0  # nothing new
    append_rows(run, data, count, scalars, 23, 60)
    second = exporter.update()
    exporter.sink.close()
    assert (second.windows, second.last_step) == (4, 59)
    assert check_against_numpy(tmp_path / "tb", data, count, scalars, window=10) == 6
    tb_scalars, _, _ = read_events(tmp_path / "tb")
    assert len(tb_scalars["scalars/loss"]) == 60  # written once each


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), n_steps=st.integers(2, 40), window=st.integers(2, 12),
       idle=st.sets(st.integers(0, 39), max_size=12))
def test_window_summaries_match_numpy(tmp_path_factory, seed, n_steps, window, idle):
    data, count, _ = synthetic(seed, n_steps, idle=[i for i in idle if i < n_steps])
    path = tmp_path_factory.mktemp("run") / "run"
    write_run(path, LAYERS, data, count=count)
    ds = statscope.open_run(path).sel(step=slice(0, window - 1)).load()
    items = E.window_summaries(ds, step=window - 1)
    full, ncount, layers = expanded(data, count)
    ref = reference_window(full, ncount, layers, np.arange(n_steps), 0, window)
    got = {i.tag: i for i in items}
    for (scale_free, stat), per_neuron in ref.items():
        suffix = "_scale_free" if scale_free else ""
        for layer in LAYERS:
            values = per_neuron[layers == layer]
            tag = f"fluctuation{suffix}/{layer}/{stat}"
            if np.all(np.isnan(values)):
                assert tag not in got
            else:
                assert got[tag].value == pytest.approx(np.nanmedian(values), rel=1e-9)
                hist = got[f"neurons{suffix}/{layer}/{stat}"].values
                np.testing.assert_allclose(hist, values[np.isfinite(values)], rtol=1e-9)


def test_bad_arguments_name_the_value(tmp_path):
    data, count, scalars = synthetic()
    write_run(tmp_path / "run", LAYERS, data, count=count)
    with pytest.raises(StatscopeError, match="window=1"):
        E.export_run(tmp_path / "run", "tensorboard", tmp_path / "tb", window=1)
    with pytest.raises(StatscopeError, match="'csv'.*tensorboard"):
        E.export_run(tmp_path / "run", "csv", tmp_path / "tb")
    with pytest.raises(StatscopeError, match="not a statscope run|no such"):
        E.export_run(tmp_path / "nothing", "tensorboard", tmp_path / "tb")
    # TensorBoard steps are int64 and step k is written at k + offset: before, -5 wrote
    # negative steps and 1 << 63 failed deep inside the event writer
    for offset in (-5, 1 << 63, 2.0):
        with pytest.raises(StatscopeError, match=rf"offset={offset!r}: expected an int in 0..2\*\*62"):
            E.export_run(tmp_path / "run", "tensorboard", tmp_path / "tb", offset=offset)
        with pytest.raises(StatscopeError, match=rf"offset={offset!r}"):
            E.Exporter(tmp_path / "run", sink=None, offset=offset)  # refused before any use
    assert not (tmp_path / "tb").exists()


def test_the_clis_step_offset_bound_is_the_exporters():
    from statscope.commands.export import MAX_STEP_OFFSET as cli
    from statscope.export.exporter import MAX_STEP_OFFSET

    assert cli == MAX_STEP_OFFSET == 2**62


@pytest.mark.parametrize("module", ["statscope.export", "statscope.export.summaries",
                                    "statscope.export.exporter", "statscope.export.sinks",
                                    "statscope.integrations",
                                    "statscope.integrations.session"])
def test_doctests(module):
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
