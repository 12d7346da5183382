"""Entries stacked on the training thread at the hand-over of a block (StackedRun) give the
same moments as the list of entries they stand for, and the recorder's rows stay right."""

import time

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import statscope
from statscope.probes.capture import Capture
from statscope.probes.reduce import StackedRun, entries_gather, stack_entries, step_entry
from statscope.entries import jobs_moments


def _bn_entry(x: torch.Tensor, eps: float = 1e-5) -> tuple:
    c = x.shape[1]
    _, mean, invstd, _, _ = torch._batch_norm_impl_index(x, None, None, None, None, True, 0.0,
                                                         eps, False)
    assert mean.shape == (c,)
    return ("invstd", mean, invstd, eps)


def _suminv_entry(x: torch.Tensor, eps: float = 1e-3) -> tuple:
    _, mean, invstd, _, _ = torch._batch_norm_impl_index(x, None, None, None, None, True, 0.0,
                                                         eps, False)
    return ("suminv", x.sum(0), invstd, mean, eps, x.shape[0])


def _var_entry(x: torch.Tensor) -> tuple:
    return ("var", x.mean(0), x.var(0, correction=0))


MAKERS = {"invstd": _bn_entry, "suminv": _suminv_entry, "var": _var_entry,
          "sums": lambda x: step_entry(x, 1, 2), "sums4": lambda x: step_entry(x, 1, 4)}


def _run(kind: str, rows: int, c: int, gen: torch.Generator, holes: bool) -> list:
    make = MAKERS[kind]
    out = []
    for r in range(rows):
        x = torch.randn(3 + r % 4, c, generator=gen, dtype=torch.float64) * (r + 1) + 5 * r
        out.append(None if holes and r % 3 == 1 else make(x.float()))
    return out


@settings(max_examples=40, deadline=None)
@given(kinds=st.lists(st.sampled_from(sorted(MAKERS)), min_size=1, max_size=4),
       rows=st.integers(1, 9), widths=st.lists(st.sampled_from([2, 5]), min_size=4, max_size=4),
       holes=st.lists(st.booleans(), min_size=4, max_size=4), stack=st.lists(st.booleans(),
                                                                            min_size=4, max_size=4),
       seed=st.integers(0, 2**16))
def test_stacked_runs_gather_to_the_same_moments_as_their_lists(kinds, rows, widths, holes, stack,
                                                                seed):
    gen = torch.Generator().manual_seed(seed)
    runs = [_run(k, rows, widths[i], gen, holes[i]) for i, k in enumerate(kinds)]
    mixed = []
    for i, run in enumerate(runs):
        stacked = stack_entries(run)
        assert (stacked is None) == (holes[i] and rows > 1)  # row 1 is missing: not stacked
        mixed.append(stacked if stack[i] and stacked is not None else run)
    order = 4 if "sums4" in kinds else 2
    lengths, channels = [len(r) for r in runs], widths[:len(runs)]
    want = jobs_moments(entries_gather(runs), lengths, channels, order)
    got = jobs_moments(entries_gather(mixed), lengths, channels, order)
    for w, g in zip(want, got):
        for a, b in zip(w, g):
            np.testing.assert_array_equal(a, b)  # the same float32 values, the same float64 math


def test_a_stacked_run_slices_and_indexes_like_its_list():
    gen = torch.Generator().manual_seed(0)
    run = _run("suminv", 6, 4, gen, holes=False)
    stacked = stack_entries(run)
    assert isinstance(stacked, StackedRun) and len(stacked) == 6
    part = stacked[2:5]
    assert len(part) == 3
    for r in range(3):
        e, s = run[2 + r], part[r]
        assert s[0] == e[0] and len(s) == len(e)
        for a, b in zip(e[1:4], s[1:4]):
            assert torch.equal(a, b)
        assert s[4:] == (e[4], float(e[5]))
    lengths = [3]
    np.testing.assert_array_equal(
        jobs_moments(entries_gather([part]), lengths, [4], 2)[0][1],
        jobs_moments(entries_gather([run[2:5]]), lengths, [4], 2)[0][1])


def test_entries_that_cannot_be_stacked_stay_a_list():
    gen = torch.Generator().manual_seed(0)
    run = _run("invstd", 4, 3, gen, holes=False)
    assert stack_entries([]) is None
    assert stack_entries(run[:2] + [None] + run[3:]) is None  # a step the probe missed
    assert stack_entries(run[:2] + _run("var", 2, 3, gen, False)) is None  # two kinds
    w = ("wvar", torch.zeros(3), torch.ones(3), torch.full((3,), 4.0))
    assert stack_entries([w, w]) is None  # masked rows: their counts are read per row
    meta = ("var", torch.zeros(3, device="meta"), torch.ones(3, device="meta"))
    assert stack_entries([meta, meta]) is None  # not on the CPU: the writer thread's to gather
    assert stack_entries(run[:1] + [("invstd", run[1][1].to("meta"), run[1][2], 1e-5)]) is None


def test_recorded_rows_match_numpy_with_stacked_blocks_and_an_idle_flush(tmp_path, monkeypatch):
    """The BatchNorm fast path's entries and the generic path's (a LayerNorm input) are stacked
    when a block is handed over; an idle flush in the middle of a block makes the writer skip
    the rows it filed already."""
    handed = []
    take = Capture.take_block

    def spy(self, n, aligned=True):
        out = take(self, n, aligned)
        handed.extend(type(seg.refs) for seg in out[1])
        return out

    monkeypatch.setattr(Capture, "take_block", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4),
                          nn.LayerNorm(4))
    inputs = {1: [], 4: []}
    for i in inputs:
        model[i - 1].register_forward_hook(
            lambda m, a, out, i=i: inputs[i].append(out.detach().double().clone()))
    gen = torch.Generator().manual_seed(1)
    losses = []
    with statscope.record(model, tmp_path / "r", block_steps=8, flush_seconds=0.2,
                          step="forward", raw_bytes=0) as rec:
        for t in range(21):
            x = torch.randn(7, 6, generator=gen) * 3 + 1
            out = model(x)
            losses.append(out.square().mean().detach())
            rec.log(loss=losses[-1], t=float(t))
            if t == 11:  # idle: the writer files steps 8..10 from the live block
                deadline = time.monotonic() + 10
                while (statscope.open_run(tmp_path / "r").sizes["step"] < 11
                       and time.monotonic() < deadline):
                    time.sleep(0.05)
                assert statscope.open_run(tmp_path / "r").sizes["step"] == 11
    assert StackedRun in handed
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes["step"] == 21
    names = [p["name"] for p in ds.attrs["probes"]]
    for i, name in zip(inputs, names):
        want_mean = np.stack([x.mean(0).numpy() for x in inputs[i]])
        want_std = np.stack([x.std(0, correction=0).numpy() for x in inputs[i]])
        sel = ds.sel(neuron=ds.layer == name)
        np.testing.assert_allclose(sel.bn_mean.values, want_mean, atol=1e-5 * want_std.max())
        np.testing.assert_allclose(sel.bn_std.values, want_std, rtol=1e-4)
    np.testing.assert_array_equal(ds.loss.values, np.array([v.item() for v in losses]))
    np.testing.assert_array_equal(ds.t.values, np.arange(21.0))
