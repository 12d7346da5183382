"""``statscope export`` and the live export under faults and odd input, checked from outside:
event files read back with an own TFRecord reader and compared with numpy on the store's rows."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

pytest.importorskip("tensorboard")

import statscope
import statscope.export as E
from statscope.cli import main
from statscope.errors import NonFiniteWarning, StatscopeError
from statscope.store import is_run, read_attrs
from statscope.writer import write_run

from export_reference import (append_rows, assert_export_equals, read_events, read_records,
                              reference_export)

HERE = os.path.dirname(os.path.abspath(__file__))


def make(layers, n_steps, seed=0, scale=None):
    """Random statistics of a run with one EN group per layer (scale: per-neuron factor)."""
    rng = np.random.default_rng(seed)
    n = sum(layers.values())
    data = {"bn_mean": rng.normal(size=(n_steps, n)), "bn_std": rng.uniform(0.5, 2, (n_steps, n)),
            "en_mean": rng.normal(size=(n_steps, len(layers))),
            "en_std": rng.uniform(0.5, 2, (n_steps, len(layers)))}
    if scale is not None:
        data["bn_mean"] = data["bn_mean"] * scale
    return {k: v.astype("f4") for k, v in data.items()}


def eights(layers, n_steps):
    """Elements per channel: 8 at every step (σ̄ needs more than one)."""
    return np.full((n_steps, len(layers)), 8)


def expected(layers, data, count, window, steps=None, scalars=None, offset=0):
    widths = list(layers.values())
    group = np.repeat(np.arange(len(layers)), widths)
    full = {s: (v[:, group] if s.startswith("en_") else v) for s, v in data.items()}
    steps = np.arange(len(count)) if steps is None else np.asarray(steps)
    return reference_export(full, np.asarray(count)[:, group], np.repeat(list(layers), widths),
                            steps, window, scalars, offset)


def expected_from_store(path, window):
    """The reference computed from the store's own rows (what the store holds now)."""
    ds = statscope.open_run(path)
    layers = np.asarray(ds.layer.values).astype(str)
    full = {s: np.asarray(ds[s].values) for s in ("bn_mean", "bn_std", "en_mean", "en_std")}
    scalars = {n: np.asarray(ds[n].values) for n in ds.attrs.get("scalars", [])}
    return reference_export(full, np.asarray(ds["count"].values), layers,
                            np.asarray(ds.step.values), window, scalars)


# -- histograms of values beyond TensorBoard's default buckets ---------------------------------

def test_huge_fluctuations_land_in_histogram_buckets(tmp_path):
    # TensorBoard's default buckets end at 1e20: larger values were counted in `num` but in no
    # bucket, and a window of only such values failed the export ("The histogram is empty")
    layers = {"fc": 3, "big": 2}
    data = make(layers, 20, scale=np.array([1, 1e25, 1e30, 1e36, 3e37]))
    write_run(tmp_path / "run", layers, data, count=eights(layers, 20))
    result = E.export_run(tmp_path / "run", "tensorboard", tmp_path / "tb", window=10)
    assert result.windows == 2
    assert_export_equals(tmp_path / "tb", *expected(layers, data, eights(layers, 20), 10))


def test_bucket_edges_hold_every_value():
    from statscope.export.sinks import bucket_edges

    for values in (np.array([0.0]), np.array([-3.0e307, 1.7e308, 2.0]), np.array([1e-300, 5e19])):
        edges = bucket_edges(values)
        assert np.all(np.diff(edges) > 0) and np.all(np.isfinite(edges))
        assert np.histogram(values, edges)[0].sum() == values.size


# -- a distributed run from Python -------------------------------------------------------------

def test_a_distributed_run_exports_each_rank_from_python(tmp_path):
    # export_run of a rank0/rank1 folder failed with a TypeError deep in the summaries
    layers = {"fc": 3}
    datas = [make(layers, 20, seed=r) for r in (0, 1)]
    for r, data in enumerate(datas):
        write_run(tmp_path / "run" / f"rank{r}", layers, data, count=eights(layers, 20), rank=r,
                  world_size=2)
    result = E.export_run(tmp_path / "run", "tensorboard", tmp_path / "tb", window=5)
    assert (result.windows, result.last_step) == (8, 19)
    for r, data in enumerate(datas):
        assert_export_equals(tmp_path / "tb" / f"rank{r}",
                             *expected(layers, data, eights(layers, 20), 5))
    sink = E.open_sink("tensorboard", tmp_path / "live")
    with pytest.raises(StatscopeError, match=r"run=.*'.*run': a distributed run's folder"):
        E.Exporter(tmp_path / "run", sink, window=5).update()
    sink.close()


# -- layer names that become tags --------------------------------------------------------------

WEIRD = {"conv[0]": 2, "a.b": 1, "aXb": 1, "h+(": 1, "fc1": 2, "fc1/bn_mean": 1, "ü x/y z": 2}


def test_weird_layer_names_become_their_own_tags_and_charts(tmp_path):
    # TensorBoard reads a custom-scalars chart's tags as regular expressions (re.match): a
    # layer "conv[0]" drew nothing, "h+(" was an invalid pattern, "a.b" also drew "aXb", and
    # "fc1" also drew the layer "fc1/bn_mean"
    from tensorboard.plugins.custom_scalar import layout_pb2

    data = make(WEIRD, 20)
    write_run(tmp_path / "run", WEIRD, data, count=eights(WEIRD, 20))
    E.export_run(tmp_path / "run", "tensorboard", tmp_path / "tb", window=10)
    assert_export_equals(tmp_path / "tb", *expected(WEIRD, data, eights(WEIRD, 20), 10))
    scalar_tags = set(read_events(tmp_path / "tb")[0])
    _, _, acc = read_events(tmp_path / "tb")
    [event] = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    for layer in WEIRD:
        for title, stats in ((f"{layer} mean", ("bn_mean", "en_mean")),
                             (f"{layer} EN", ("en_mean", "en_std"))):
            for pattern, stat in zip(charts[title], stats):
                drawn = {t for t in scalar_tags if re.compile(pattern).match(t)}  # as TensorBoard
                assert drawn == {f"fluctuation_scale_free/{layer}/{stat}"}, (title, pattern)


# -- bad targets -------------------------------------------------------------------------------

def small_run(path, n_steps=30):
    layers = {"fc": 3}
    write_run(path, layers, make(layers, n_steps), count=eights(layers, n_steps),
              scalars={"loss": np.arange(n_steps) * 1.0})
    return str(path)


@pytest.mark.parametrize("target", ["under a file", "empty"])
def test_an_unwritable_target_is_an_error_naming_it(tmp_path, capsys, target):
    # a target that cannot be made was an OSError naming the hidden staging folder (exit 1)
    run = small_run(tmp_path / "run")
    (tmp_path / "file").write_text("x")
    folder = {"under a file": str(tmp_path / "file" / "tb"), "empty": ""}[target]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["export", run, "--to", "tensorboard", folder, "--window", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"statscope: error: --to tensorboard {folder!r}: ") and \
        err.count("\n") == 1, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    with pytest.raises(StatscopeError, match=re.escape(f"--to tensorboard {folder!r}")):
        E.export_run(run, "tensorboard", folder, window=10)


def test_a_non_empty_target_keeps_other_files(tmp_path, capsys):
    run = small_run(tmp_path / "run")
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "notes.txt").write_text("mine")
    assert main(["export", run, "--to", "tensorboard", str(tmp_path / "tb"), "--window",
                 "10"]) == 0
    assert (tmp_path / "tb" / "notes.txt").read_text() == "mine"
    assert_export_equals(tmp_path / "tb", *expected_from_store(run, 10))


def test_an_export_in_progress_is_invisible_to_tensorboard_above_it(tmp_path):
    # the staged event file sat in tb/.statscope-export-*/, which `tensorboard --logdir tb`
    # showed as a run: partial while exporting, and for good after a killed export
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    run = small_run(tmp_path / "run")
    E.export_run(run, "tensorboard", tmp_path / "tb" / "a", window=10)
    sink = E.open_sink("tensorboard", tmp_path / "tb" / "a", staged=True)
    sink.write([E.Scalar("scalars/loss", 0, 99.0)])
    sink.flush()
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path / "tb"))
    mux.Reload()
    assert sorted(mux.Runs()) == ["a"]
    assert_export_equals(tmp_path / "tb" / "a", *expected_from_store(run, 10))
    sink.discard()
    assert_export_equals(tmp_path / "tb" / "a", *expected_from_store(run, 10))


def test_a_failed_publish_keeps_the_earlier_export(tmp_path, monkeypatch):
    # publishing removed the earlier export first: a rename that failed then lost both
    run = small_run(tmp_path / "run")
    E.export_run(run, "tensorboard", tmp_path / "tb", window=10)
    before = {p.name: p.read_bytes() for p in (tmp_path / "tb").iterdir()}

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises((StatscopeError, OSError)):
        E.export_run(run, "tensorboard", tmp_path / "tb", window=10)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "tb").iterdir()} == before


# -- a diverging run ---------------------------------------------------------------------------

def test_a_diverging_run_is_noted_and_its_finite_values_exported(tmp_path, capsys):
    # NaN and inf statistics were left out of the summaries without a word
    layers = {"fc1": 3, "fc2": 2}
    data = make(layers, 30, seed=1)
    data["bn_mean"][3, 0] = np.inf
    data["bn_std"][12, 2] = np.nan
    data["bn_mean"][20:, 3:] = np.nan  # fc2 diverged from step 20
    data["en_std"][20:, 1] = np.inf
    count = np.full((30, 2), 8)
    count[25:27, 1] = 0  # a NaN where the layer did not run is no value, not a divergence
    loss = np.where(np.arange(30) >= 20, np.inf, 1.0)
    write_run(tmp_path / "run", layers, data, count=count, scalars={"loss": loss})
    group = np.array([0, 0, 0, 1, 1])
    ran = count[:, group] > 0
    bad = sum(int(np.sum(~np.isfinite(v[:, group] if s.startswith("en_") else v) & ran))
              for s, v in data.items())
    with pytest.warns(NonFiniteWarning, match=rf"{bad} statistic values .* from step 3\b"):
        result = E.export_run(tmp_path / "run", "tensorboard", tmp_path / "tb", window=10)
    assert (result.nonfinite, result.first_nonfinite) == (bad, 3)
    assert_export_equals(tmp_path / "tb",
                         *expected(layers, data, count, 10, scalars={"loss": loss}))
    with warnings.catch_warnings():  # the command line shows it as one line
        warnings.simplefilter("always", NonFiniteWarning)
        assert main(["export", str(tmp_path / "run"), "--to", "tensorboard",
                     str(tmp_path / "tb"), "--window", "10"]) == 0
    assert f"statscope: warning: run='{tmp_path / 'run'}': {bad} statistic values" in \
        capsys.readouterr().err


# -- failed, stopped and format-1 runs ----------------------------------------------------------

@pytest.mark.parametrize("status", ["failed", "running"])
def test_a_failed_or_stopped_run_exports_what_it_holds(tmp_path, status):
    layers = {"fc": 3}
    data = make(layers, 25)
    write_run(tmp_path / "run", layers, data, status=status, count=eights(layers, 25),
              scalars={"loss": np.arange(25.0)})
    result = E.export_run(tmp_path / "run", "tensorboard", tmp_path / "tb", window=10)
    assert (result.windows, result.last_step) == (2, 24)
    assert_export_equals(tmp_path / "tb", *expected(layers, data, eights(layers, 25), 10,
                                                    scalars={"loss": np.arange(25.0)}))


def test_a_format1_store_matches_its_raw_arrays(tmp_path):
    data = os.path.join(HERE, "..", "data")
    raw = np.load(os.path.join(data, "format1-run.npz"))
    # bn1: 4 channels, 1 EN group; ln: 6 channels, 2 EN groups of 3 (see its zarr.json)
    group = np.array([0] * 4 + [1] * 3 + [2] * 3)
    full = {s: (raw[s][:, group] if s.startswith("en_") else raw[s])
            for s in ("bn_mean", "bn_std", "en_mean", "en_std")}
    ncount = raw["count"][:, [0] * 4 + [1] * 6]
    layers = np.array(["bn1"] * 4 + ["ln"] * 6)
    want = reference_export(full, ncount, layers, raw["steps"], 10, {"loss": raw["loss"]})
    result = E.export_run(os.path.join(data, "format1-run"), "tensorboard", tmp_path / "tb",
                          window=10)
    assert result.last_step == int(raw["steps"][-1]) and result.windows == 7
    assert_export_equals(tmp_path / "tb", *want)


# -- a live reader while another writer resumes the run -----------------------------------------

def test_a_live_reader_rewrites_the_rows_a_resumed_run_replaced(tmp_path):
    # an Exporter following a run that another process resumed at an earlier checkpoint kept
    # the killed run's values of the replaced steps: points the store no longer holds
    layers = {"fc": 3}
    first, second = make(layers, 40, seed=1), make(layers, 40, seed=2)
    count = eights(layers, 40)
    write_run(tmp_path / "run", layers, {s: v[:30] for s, v in first.items()},
              count=count[:30], scalars={"loss": 1000.0 + np.arange(30)}, status="running")
    exporter = E.Exporter(tmp_path / "run", E.open_sink("tensorboard", tmp_path / "tb"),
                          window=10)
    assert exporter.update().last_step == 29
    append_rows(tmp_path / "run", second, count, {"loss": 2000.0 + np.arange(40)}, 20, 40,
                resume=20)
    exporter.update()
    exporter.sink.close()
    assert_export_equals(tmp_path / "tb", *expected_from_store(tmp_path / "run", 10))
    assert statscope.open_run(tmp_path / "run").loss.values[25] == 2025.0


# -- kill -9 -------------------------------------------------------------------------------------

CHILD = textwrap.dedent('''
    import os, signal, struct, sys
    import torch
    from statscope.integrations.session import LiveExport, RecordingSession

    run, tb, steps, mode, kill_at, resume_at, tag = sys.argv[1:8]
    steps, kill_at, resume_at, tag = int(steps), int(kill_at), int(resume_at), float(tag)
    torch.manual_seed(int(tag))
    if mode == "export":  # die halfway through writing the kill_at-th event record
        from tensorboard.summary.writer import record_writer
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
        calls, orig = [0], record_writer.RecordWriter.write
        def write(self, data):
            calls[0] += 1
            if calls[0] == kill_at:
                header = struct.pack("<Q", len(data))
                whole = header + struct.pack("<I", masked_crc32c(header)) + data
                self._writer.write(whole[:len(whole) // 2])
                self._writer.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            orig(self, data)
        record_writer.RecordWriter.write = write
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(),
                                torch.nn.Linear(6, 3), torch.nn.BatchNorm1d(3))
    kw = {"block_steps": 2, "flush_seconds": 0.01}
    if resume_at >= 0:
        kw["resume"] = True
    start = max(resume_at, 0)
    s = RecordingSession(model, run, kw, {}, LiveExport(tb, every=3, window=4),
                         trainer_step=start)
    for i in range(start, steps):
        model(torch.randn(8, 4))
        s.log(loss=tag * 1000 + i)
        if mode == "step" and i == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        s.end_step()
    s.close()
''')


def child(tmp_path, *args):
    return subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "run"),
                           str(tmp_path / "tb"), *map(str, args)],
                          capture_output=True, text=True, timeout=240)


def assert_points_in_store(tmp_path):
    """Every scalar point of the event files is a point of the store, with its value."""
    points, _ = read_records(tmp_path / "tb")
    ds = statscope.open_run(tmp_path / "run") if is_run(tmp_path / "run") else None
    loss = {} if ds is None or "loss" not in ds else \
        dict(zip(ds.step.values.tolist(), ds.loss.values.tolist()))
    for tag, step, value in points:
        if tag == "scalars/loss":
            assert loss.get(step) == value, (step, value)


@pytest.mark.slow
@pytest.mark.parametrize("mode, kill_at, resume_at", [
    ("step", 13, 10),   # mid-step; the trainer resumes from its checkpoint at 10: 10.. replaced
    ("export", 40, -2),  # halfway through an event record; resumed after the last committed
    ("step", 0, 0),     # before the first commit
])
def test_a_live_export_killed_and_resumed(tmp_path, mode, kill_at, resume_at):
    proc = child(tmp_path, 20, mode, kill_at, -1, 1)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    read_events(tmp_path / "tb")  # TensorBoard reads what the killed export left
    points, truncated = read_records(tmp_path / "tb")
    assert bool(truncated) == (mode == "export")
    assert_points_in_store(tmp_path)
    if resume_at == -2:
        resume_at = int(read_attrs(tmp_path / "run")["n_steps"])
    proc = child(tmp_path, 20, "none", 0, resume_at, 2)
    assert proc.returncode == 0, proc.stderr
    ds = statscope.open_run(tmp_path / "run")
    assert ds.step.values.tolist() == list(range(20))
    want = expected_from_store(tmp_path / "run", 4)
    assert_export_equals(tmp_path / "tb", *want)
    assert read_records(tmp_path / "tb")[1] == []
    for again in ("tb2", "tb2"):  # statscope export: the same points, once, however often
        assert main(["export", str(tmp_path / "run"), "--to", "tensorboard",
                     str(tmp_path / again), "--window", "4"]) == 0
        assert_export_equals(tmp_path / again, *want)


@pytest.mark.slow
def test_a_killed_export_leaves_nothing_tensorboard_shows(tmp_path):
    run = small_run(tmp_path / "run", n_steps=400)
    E.export_run(run, "tensorboard", tmp_path / "tb" / "a", window=10)
    code = textwrap.dedent(f'''
        import os, signal
        from tensorboard.summary.writer import record_writer
        import statscope.export as E
        orig, calls = record_writer.RecordWriter.write, [0]
        def write(self, data):
            calls[0] += 1
            if calls[0] == 50:
                self._writer.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            orig(self, data)
        record_writer.RecordWriter.write = write
        E.export_run({run!r}, "tensorboard", {str(tmp_path / "tb" / "a")!r}, window=10)
    ''')
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path / "tb"))
    mux.Reload()
    assert sorted(mux.Runs()) == ["a"]
    want = expected_from_store(run, 10)
    assert_export_equals(tmp_path / "tb" / "a", *want)
    E.export_run(run, "tensorboard", tmp_path / "tb" / "a", window=10)  # cleans up after it
    assert [p.name for p in tmp_path.joinpath("tb").rglob("*") if p.is_file()] == \
        [p.name for p in (tmp_path / "tb" / "a").iterdir()] and \
        len(list((tmp_path / "tb" / "a").iterdir())) == 1
    assert_export_equals(tmp_path / "tb" / "a", *want)


@pytest.mark.slow
def test_export_while_another_process_writes(tmp_path):
    code = textwrap.dedent(f'''
        import time, torch, statscope
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
        with statscope.record(model, {str(tmp_path / "run")!r}, step="manual", block_steps=2,
                              flush_seconds=0.01) as rec:
            for i in range(600):
                model(torch.randn(8, 4)); rec.log(loss=float(i)); rec.step(); time.sleep(0.003)
    ''')
    proc = subprocess.Popen([sys.executable, "-c", code])
    done = []
    try:
        while proc.poll() is None and len(done) < 8:
            if is_run(tmp_path / "run"):
                target = tmp_path / f"tb{len(done)}"
                done.append((target, E.export_run(tmp_path / "run", "tensorboard", target,
                                                  window=10)))
        assert proc.wait(timeout=240) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert done
    full_s, full_h = expected_from_store(tmp_path / "run", 10)
    for target, result in done:  # each export: the store's rows up to its last step, exactly
        if result.last_step is None:
            continue
        last = result.last_step
        cut_s = {t: {s: v for s, v in p.items() if s <= last if not t.startswith("fluct")
                     or s <= (last + 1) // 10 * 10 - 1} for t, p in full_s.items()}
        cut_h = {t: {s: v for s, v in p.items() if s <= (last + 1) // 10 * 10 - 1}
                 for t, p in full_h.items()}
        assert_export_equals(target, {t: p for t, p in cut_s.items() if p},
                             {t: p for t, p in cut_h.items() if p})
