"""Window summaries checked from outside: recorded models against float64 numpy references.

Forward pre-hooks of our own keep each probed layer's input at each step; the per-step
statistics (population moments per channel and per EN group) and then each window's count, mean
and std (ddof = 1) are computed from them in float64, without statscope. The per-step statistics
are stored as float32 (and BatchNorm's fast path has its own rounding), so a window summary is
compared in units of the channel's data std (its mean ``bn_std``; ``en_std`` for EN groups).
"""

import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import statscope
from statscope.store import Layout, ProbeInfo, open_windows, verify_run
from statscope.writer import RunWriter

STATS = ("bn_mean", "bn_std", "en_mean", "en_std")
TOL = 1e-6  # of the channel's data std


class Inputs:
    """The first training-forward input of each module at each step, float64."""

    def __init__(self, modules):
        self.step = 0
        self.seen = {name: {} for name in modules}
        self.handles = [m.register_forward_pre_hook(self._hook(name))
                        for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, args):
            if torch.is_grad_enabled() and module.training:
                self.seen[name].setdefault(self.step, args[0].detach().double().numpy().copy())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def step_stats(x, cdim, groups):
    x = np.moveaxis(x, cdim, -1)
    flat = x.reshape(-1, x.shape[-1])
    g = flat.reshape(len(flat), groups, -1)
    return {"bn_mean": flat.mean(0), "bn_std": flat.std(0),
            "en_mean": np.array([g[:, j].mean() for j in range(groups)]),
            "en_std": np.array([g[:, j].std() for j in range(groups)])}


def per_step(seen, steps, cdim, groups, channels):
    """Per statistic (steps, channels) — EN expanded to its channels — NaN where the layer did
    not run; and ran (steps,)."""
    out = {s: np.full((len(steps), channels), np.nan) for s in STATS}
    ran = np.zeros(len(steps), bool)
    for i, t in enumerate(steps):
        if t in seen:
            ran[i] = True
            with np.errstate(invalid="ignore"):  # inf - inf in an inf channel's std
                stats = step_stats(seen[t], cdim, groups)
            for s, v in stats.items():
                out[s][i] = v if s.startswith("bn") else np.repeat(v, channels // groups)
    return out, ran


def windows_ref(steps, values, ran, W):
    """{k: (count, mean, std)} over the steps of window k where the layer ran, of the float32
    rounding of the values; NaN for a column with a non-finite value."""
    steps = np.asarray(steps)
    out = {}
    for k in np.unique(steps // W):
        x = values[(steps // W == k) & ran].astype(np.float32).astype(np.float64)
        n = len(x)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mean = x.mean(0) if n else np.full(values.shape[1], np.nan)
            std = x.std(0, ddof=1) if n > 1 else np.full(values.shape[1], np.nan)
        bad = ~np.isfinite(x).all(0)
        out[int(k)] = (n, np.where(bad, np.nan, mean), np.where(bad, np.nan, std))
    return out


def check_windows(path, cap, layers, steps, W, tol=TOL):
    """Compare every layer's windows with the reference; return the worst error (in data stds).

    layers: {name: (channel dim, EN groups)}."""
    ds = open_windows(path)
    assert ds.attrs["window_steps"] == W
    worst = 0.0
    for name, (cdim, groups) in layers.items():
        cols = np.flatnonzero(ds.layer.values == name)
        values, ran = per_step(cap.seen[name], steps, cdim, groups, len(cols))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scale = {s: np.nanmean(values["en_std" if s.startswith("en") else "bn_std"], 0)
                     for s in STATS}
        for s in STATS:
            ref = windows_ref(steps, values[s], ran, W)
            assert ds.step.values.tolist() == [k * W for k in sorted(ref)], (name, s)
            for i, k in enumerate(sorted(ref)):
                n, mean, std = ref[k]
                assert (ds["count"].values[i, cols] == n).all(), (name, s, k)
                for part, want in (("mean", mean), ("std", std)):
                    got = ds[s].sel(summary=part).values[i, cols]
                    np.testing.assert_array_equal(np.isnan(got), np.isnan(want),
                                                  err_msg=f"{name} {s} window {k} {part}")
                    ok = np.isfinite(want)
                    sc = np.where(np.isfinite(scale[s]), scale[s], 1.0) + np.abs(want) * 1e-7
                    err = np.abs(got[ok] - want[ok]) / sc[ok]
                    if err.size:
                        worst = max(worst, float(err.max()))
                    assert not err.size or err.max() <= tol, (name, s, k, part, err.max())
    return worst


def record(model, path, inputs, layers, steps, **kw):
    cap = Inputs(layers)
    every = kw.get("every", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with statscope.record(model, path, step="forward", **kw):
            for t in range(steps):
                cap.step = t
                inputs(t)
    cap.remove()
    recorded = list(range(0, steps, every))
    assert statscope.open_run(path).step.values.tolist() == recorded
    return cap, recorded


def linear_bn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))


def x_at(t, shape=(8, 5)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1000 + t)) * 2 + 1


@pytest.mark.parametrize("writer,block_steps", [("thread", 1), ("thread", 128), ("process", 3)])
def test_windows_of_every_channel_match_float64_with_a_partial_last_window(tmp_path, writer,
                                                                           block_steps):
    model = linear_bn()
    # 23 steps, W = 7: the last window (21, 22) is partial and written when the run closes
    cap, steps = record(model, tmp_path / "r", lambda t: model(x_at(t)), {"1": model[1]}, 23,
                        window_steps=7, neurons=2, writer=writer, block_steps=block_steps)
    assert open_windows(tmp_path / "r").sizes == {"window": 4, "summary": 2, "neuron": 6}
    check_windows(tmp_path / "r", cap, {"1": (1, 1)}, steps, 7)


@pytest.mark.parametrize("every,W", [(3, 7), (3, 6), (2, 4)])
def test_with_every_windows_summarize_the_recorded_steps_of_their_step_range(tmp_path, every, W):
    model = linear_bn()
    cap, steps = record(model, tmp_path / "r", lambda t: model(x_at(t)), {"1": model[1]}, 40,
                        window_steps=W, every=every, writer="thread")
    ds = open_windows(tmp_path / "r")
    assert ds.step.values.tolist() == sorted({s // W * W for s in steps})
    check_windows(tmp_path / "r", cap, {"1": (1, 1)}, steps, W)


def test_conv_channels_last_layernorm_and_groupnorm_with_en_groups(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.lin = nn.Linear(4, 8)
            self.ln = nn.LayerNorm(8)
            self.conv1 = nn.Conv1d(4, 6, 1)
            self.gn = nn.GroupNorm(3, 6)

        def forward(self, x):
            h = self.bn(self.conv(x))  # (N, 4, 4, 4)
            tokens = self.ln(self.lin(h.flatten(2).transpose(1, 2)))  # (N, 16, 8)
            return self.gn(self.conv1(h.flatten(2))), tokens

    torch.manual_seed(0)
    model = Net().to(memory_format=torch.channels_last)
    ims = [(torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(t)) * 3 + 2)
           .to(memory_format=torch.channels_last) for t in range(20)]
    layers = {"bn": model.bn, "ln": model.ln, "gn": model.gn}
    cap, steps = record(model, tmp_path / "r", lambda t: model(ims[t]), layers, 20,
                        window_steps=6, writer="thread", neurons=1,
                        en_groups={"bn": 2, "ln": 4, "gn": 3})
    check_windows(tmp_path / "r", cap, {"bn": (1, 2), "ln": (-1, 4), "gn": (1, 3)}, steps, 6)


@pytest.mark.parametrize("lazy", [False, True])
def test_layers_that_skip_steps_or_join_late_count_only_the_steps_they_ran(tmp_path, lazy):
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 6)
            self.bn = nn.BatchNorm1d(6)
            self.extra = nn.LazyBatchNorm1d() if lazy else nn.BatchNorm1d(6)

        def forward(self, x, on):
            h = self.bn(self.lin(x))
            return self.extra(h) if on else h

    torch.manual_seed(0)
    model = Branch()
    # a window (8..11) where the branch never runs, then some with 1 or more of its steps
    on = (lambda t: t >= 9 and t % 2 == 1) if lazy else (lambda t: t % 3 == 1 and not 8 <= t < 12)
    layers = {"bn": model.bn, "extra": model.extra}
    cap, steps = record(model, tmp_path / "r", lambda t: model(x_at(t), on(t)), layers, 30,
                        window_steps=4, writer="thread", block_steps=5, neurons=3)
    ds = open_windows(tmp_path / "r")
    extra = ds["count"].values[:, ds.layer.values == "extra"][:, 0]
    assert extra.tolist() == [sum(map(on, range(4 * k, min(4 * k + 4, 30)))) for k in range(8)]
    check_windows(tmp_path / "r", cap, {"bn": (1, 1), "extra": (1, 1)}, steps, 4)


@pytest.mark.parametrize("stats", [STATS, (*STATS, "bn_kurt")])  # BatchNorm's path and generic
def test_a_non_finite_statistic_makes_its_column_nan_in_its_window_only(tmp_path, stats):
    model = nn.Sequential(nn.BatchNorm1d(4))

    def inputs(t):
        x = x_at(t, (8, 4))
        if t == 5:
            x[0, 1] = float("inf")
        if t == 6:
            x[2, 2] = float("nan")
        if t == 13:
            x[:, 3] = float("-inf")
        model(x)

    cap, steps = record(model, tmp_path / "r", inputs, {"0": model[0]}, 18, window_steps=4,
                        writer="thread", stats=stats)
    ds = open_windows(tmp_path / "r")
    mean = ds.bn_mean.sel(summary="mean").values
    assert np.isnan(mean[1, 1:3]).all() and np.isnan(mean[3, 3])
    assert np.isfinite(np.delete(mean, [5, 6, 15], axis=None)).all()
    check_windows(tmp_path / "r", cap, {"0": (1, 1)}, steps, 4)


def test_manual_steps_summarize_the_first_forward_of_each(tmp_path):
    model = linear_bn()
    cap = Inputs({"1": model[1]})
    with statscope.record(model, tmp_path / "r", step="manual", window_steps=5,
                          writer="thread") as rec:
        for t in range(17):
            cap.step = t
            model(x_at(t))
            model(x_at(t + 100))  # a second forward in the step: not the recorded one
            rec.step()
    cap.remove()
    check_windows(tmp_path / "r", cap, {"1": (1, 1)}, list(range(17)), 5)


def test_without_window_steps_no_windows_group_is_written(tmp_path):
    model = linear_bn()
    record(model, tmp_path / "r", lambda t: model(x_at(t)), {"1": model[1]}, 3,
           window_steps=None, writer="thread")
    assert not (tmp_path / "r" / "windows").exists()
    with pytest.raises(statscope.StoreError, match="keeps no window summaries"):
        open_windows(tmp_path / "r")


# -- interrupted runs ------------------------------------------------------------------------

_SCRIPT = textwrap.dedent("""
    import os, signal, sys, warnings
    import torch
    from torch import nn
    import statscope
    warnings.simplefilter("ignore")
    path, resume, end, flush_at, kill_at, writer = sys.argv[1:]
    end, flush_at, kill_at = int(end), int(flush_at), int(kill_at)
    resume = {"no": False, "true": True}.get(resume, None if resume.isdigit() else resume)
    resume = int(sys.argv[2]) if resume is None else resume
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))
    with statscope.record(model, path, resume=resume, window_steps=5, step="forward",
                          writer=writer, block_steps=3, flush_seconds=1000) as rec:
        first = rec.current_step if resume is True else (resume or 0)
        for t in range(first, end):
            g = torch.Generator().manual_seed(1000 + t)
            model(torch.randn(8, 5, generator=g) * 2 + 1)
            if t == flush_at:
                rec.flush()
            if t == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
""")


def _run(tmp_path, *args):
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-3000:]
    return proc.returncode


def _windows_of_rows(path, W):
    """The windows recomputed from the run's own stored per-step rows (all channels kept)."""
    ds = statscope.open_run(path)
    steps = ds.step.values
    ran = ds["count"].values[:, 0] > 0
    return {s: windows_ref(steps, ds[s].values.astype(np.float64), ran, W) for s in STATS}


@pytest.mark.slow
@pytest.mark.parametrize("writer,resume", [("process", "true"), ("thread", 12), ("process", 3)])
def test_a_run_killed_mid_window_and_resumed_keeps_exact_windows(tmp_path, writer, resume):
    """Killed (SIGKILL) after committing step 16 at step 19, inside window 15..19; resumed after
    its last step, or at a step before it (the restarted loop's checkpoint)."""
    once = tmp_path / "once"
    _run(tmp_path, once, "no", 30, -1, -1, "thread")
    path = tmp_path / "killed"
    assert _run(tmp_path, path, "no", 30, 17, 19, writer) == -signal.SIGKILL
    assert statscope.open_run(path).step.values[-1] == 16
    _run(tmp_path, path, resume, 30, -1, -1, writer)
    assert statscope.open_run(path).step.values.tolist() == list(range(30))
    a, b = open_windows(once), open_windows(path)
    assert b.step.values.tolist() == a.step.values.tolist() == [0, 5, 10, 15, 20, 25]
    rows = _windows_of_rows(path, 5)
    scale = np.nanmean(a["bn_std"].sel(summary="mean").values, 0)
    for s in STATS:
        for k in range(6):  # exact against the run's own rows
            n, mean, std = rows[s][k]
            assert (b["count"].values[k] == n).all()
            for part, want in (("mean", mean), ("std", std)):
                got = b[s].sel(summary=part).values[k]
                assert np.abs(got - want).max() <= 1e-7 * scale.max() + 1e-7 * np.abs(want).max()
        # the per-step values may differ by an ulp with the block alignment: in data stds
        diff = np.abs(a[s].values - b[s].values) / scale
        assert np.nanmax(diff) < 1e-6
        np.testing.assert_array_equal(np.isnan(a[s].values), np.isnan(b[s].values))


def _closed_mid_window(path):
    probes = (ProbeInfo("a", "a", "BatchNorm1d", "input", 1, 3),)
    rng = np.random.default_rng(1)
    data = {s: rng.normal(size=(23, 3 if s.startswith("bn") else 1)).astype(np.float32)
            for s in STATS}
    w = RunWriter(path, Layout(probes), window_steps=5, flush_seconds=0)
    w.append(np.arange(23), np.full((23, 1), 4), data)
    w.close()  # the partial window 20..22 is committed
    return probes, data


@pytest.mark.parametrize("resume", [True, 24])
def test_a_resumed_writer_killed_before_its_first_commit_leaves_a_readable_store(tmp_path,
                                                                                 resume):
    """Resuming inside the committed partial last window drops that window's row to rebuild it;
    the commit marker must stop naming it before the arrays are cut (an outside check: the
    marker kept n_windows=5 over 4 rows, and open_windows and verify_run raised
    StoreDamagedError until the next commit)."""
    path = tmp_path / "r"
    probes, data = _closed_mid_window(path)
    assert open_windows(path).sizes["window"] == 5
    w = RunWriter(path, Layout(probes), resume=resume, window_steps=5, flush_seconds=0)
    w.lease.release()  # killed before its first commit
    ds = open_windows(path)
    assert ds.step.values.tolist() == [0, 5, 10, 15]
    assert verify_run(path) == []
    # and resuming again rebuilds window 20.. from the rows, as an uninterrupted run has it
    w = RunWriter(path, Layout(probes), resume=True, window_steps=5, flush_seconds=0)
    w.close()
    ds = open_windows(path)
    assert ds.step.values.tolist() == [0, 5, 10, 15, 20]
    x = data["bn_mean"][20:].astype(np.float64)
    np.testing.assert_allclose(ds.bn_mean.sel(summary="mean").values[4], x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(ds.bn_mean.sel(summary="std").values[4], x.std(0, ddof=1),
                               rtol=1e-6)
    assert ds["count"].values[4, 0] == 3
