"""Where each rank of a distributed run records: ``path/rank{R}``, or ``path`` with its
``{rank}`` field filled in (format specs included), never inside a single-process run."""

import os
import warnings

import pytest
import torch
from torch import nn

import statscope
from statscope.discovery import find_runs
from statscope.probes.placement import rank_path


@pytest.fixture
def rank_of(monkeypatch):
    """Pretend to be rank ``r`` of ``world`` processes (torch.distributed's answers)."""
    def be(r: int, world: int) -> None:
        dist = torch.distributed
        monkeypatch.setattr(dist, "is_available", lambda: True)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: r)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    return be


@pytest.mark.parametrize("path, want", [
    ("runs/exp", os.path.join("runs/exp", "rank3")),
    ("runs/exp-rank{rank}", "runs/exp-rank3"),
    ("runs/exp-rank{rank:02d}", "runs/exp-rank03"),
    ("runs/{rank}/exp", "runs/3/exp"),
    ("runs/set{a}", os.path.join("runs/set{a}", "rank3")),  # no rank field: braces kept
    ("runs/odd{", os.path.join("runs/odd{", "rank3")),
])
def test_each_rank_records_at_its_own_path(rank_of, path, want):
    rank_of(3, 4)
    assert rank_path(path) == (want, 3, 4)


def test_one_process_fills_in_rank_zero_and_keeps_other_paths(rank_of):
    assert rank_path("runs/exp-{rank:03d}") == ("runs/exp-000", 0, 1)
    assert rank_path("runs/exp") == ("runs/exp", 0, 1)


def test_a_rank_field_beside_another_field_is_refused(rank_of):
    rank_of(1, 2)
    with pytest.raises(statscope.StatscopeError, match=r"path='runs/\{a\}/\{rank\}'.*only the field"):
        rank_path("runs/{a}/{rank}")
    assert rank_path("runs/{{a}}/{rank}") == ("runs/{a}/1", 1, 2)


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("template", [False, True])
def test_ranks_do_not_record_inside_a_single_process_run(tmp_path, rank_of, overwrite, template):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with statscope.record(model, tmp_path / "run"):
        for _ in range(3):
            model(torch.randn(5, 3))
    rank_of(1, 2)
    where = str(tmp_path / "run" / "{rank}") if template else tmp_path / "run"
    with pytest.raises(statscope.StoreError, match="holds a single-process run"):
        statscope.record(model, where, overwrite=overwrite)
    assert not any(n.startswith("rank") or n == "1" for n in os.listdir(tmp_path / "run"))
    assert statscope.open_run(tmp_path / "run").sizes["step"] == 3


@pytest.mark.parametrize("below", [("sub",), ("a", "b", "c")])
def test_a_single_process_run_is_not_recorded_inside_another_run(tmp_path, below):
    """Before, record(model, "RUN/sub") made a run among RUN's files: find_runs and the CLI
    saw only RUN, and overwriting RUN deleted it."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with statscope.record(model, tmp_path / "run"):
        for _ in range(3):
            model(torch.randn(5, 3))
    before = sorted(os.listdir(tmp_path / "run"))
    inner = tmp_path.joinpath("run", *below)
    with pytest.raises(statscope.StoreError, match=rf"inside the run {str(tmp_path / 'run')!r}"):
        statscope.record(model, inner)
    assert sorted(os.listdir(tmp_path / "run")) == before  # nothing made, nothing lost
    assert statscope.open_run(tmp_path / "run").sizes["step"] == 3
    with statscope.record(model, tmp_path / "beside" / "run"):  # a plain folder above is fine
        model(torch.randn(5, 3))
    assert find_runs(tmp_path / "beside") == [str(tmp_path / "beside" / "run")]


def test_a_rank_resuming_after_its_own_last_step_is_warned(tmp_path, rank_of):
    rank_of(1, 2)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with statscope.record(model, tmp_path / "run"):
        model(torch.randn(5, 3))
    with pytest.warns(statscope.StatscopeWarning, match="rank 1 resumes.*resume=step"):
        statscope.record(model, tmp_path / "run", resume=True).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", statscope.StatscopeWarning)
        statscope.record(model, tmp_path / "run", resume=1).close()  # the checkpoint's step
    assert statscope.open_run(tmp_path / "run" / "rank1").sizes["step"] == 1
