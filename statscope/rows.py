"""Rows of a run from a block's host arrays: the numpy side of filing, without torch.

The writer thread *gathers* a block (:func:`statscope.probes.block.gather_block`): torch work
only — the raw buffers' moments, the per-step entries stacked and copied to the host once — into
a :class:`Gathered`, which holds numpy arrays and pickles. Everything after that is here: moments
from entries (:mod:`statscope.entries`), NaN for the steps a probe missed, the statistics, the per-set statistics, the
BatchNorm fast path's advice, and the columns of the store (:func:`file_columns`). It is pure
numpy so that it can run in the writer process (:mod:`statscope.writer_process`): the writer
thread's Python then holds the training's GIL only for the gathering (measured on the paper's FC
net at batch size 4: a writer thread running the whole filing slowed training by 8–9 %, one
running only the gathering by < 1 %; ``benchmarks/bench_models.py`` has the end-to-end figures).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Mapping, NamedTuple

import numpy as np

from statscope import schema as S
from statscope.entries import jobs_into
from statscope.layout import Layout

__all__ = ["Moments", "Rows", "Gathered", "ProbePart", "BUILTIN", "compute_rows",
           "file_columns", "mean_needs_sum", "near_eps", "far_mean",
           "Advice", "var_overflows", "group_moments", "FLOAT32_MEAN_RATIO",
           "NEAR_EPS", "FAR_MEAN", "OVERFLOW_VAR"]


@dataclass(frozen=True)
class Moments:
    """Per-channel moments of ``k`` steps of one probe, float64 on the host.

    Attributes:
        mean, var: (k, C) mean and population variance.
        m3, m4: (k, C) third and fourth central moments, or None when no statistic needs them.
        groups: EN groups of the probe.
    """

    mean: np.ndarray
    var: np.ndarray
    m3: np.ndarray | None
    m4: np.ndarray | None
    groups: int

    @cached_property
    def grouped(self) -> tuple[np.ndarray, np.ndarray]:
        """(k, groups) mean and variance of each EN group, by the law of total variance
        (computed once: ``en_mean`` and ``en_std`` both read it)."""
        k, c = self.mean.shape
        mean = self.mean.reshape(k, self.groups, c // self.groups)
        var = self.var.reshape(k, self.groups, c // self.groups)
        g_mean = mean.mean(-1)
        dev = mean - g_mean[..., None]
        g_var = var.mean(-1) + np.square(dev, out=dev).mean(-1)
        return g_mean, g_var


def group_moments(m: Moments) -> tuple[np.ndarray, np.ndarray]:
    """(k, groups) mean and variance of each EN group, by the law of total variance."""
    return m.grouped


def _kurtosis(m: Moments) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return m.m4 / (m.var * m.var)


BUILTIN: dict[str, Callable[[Moments], np.ndarray]] = {
    S.BN_MEAN: lambda m: m.mean,
    S.BN_STD: lambda m: np.sqrt(m.var),
    S.EN_MEAN: lambda m: group_moments(m)[0],
    S.EN_STD: lambda m: np.sqrt(group_moments(m)[1]),
    S.BN_KURT: _kurtosis,
}
"""How statscope's own per-channel statistics follow from the moments (the per-set ones do not)."""


FLOAT32_MEAN_RATIO = 5e-5 / 1e-7
"""|mean|/std·√M beyond which a float32 reduction of M elements per channel may drift the mean
by more than 5e-5 of the std, taking the drift as 1e-7·√M·|mean| (:func:`mean_needs_sum`)."""


def mean_needs_sum(mean: np.ndarray, var: np.ndarray, count: np.ndarray) -> bool:
    """Whether a probe's BatchNorm mean, summed in float32 by torch's CPU kernel, could drift by
    more than half the fast path's bound (1e-4 of √(var + eps)) at the |mean|/std and element
    counts of these rows, taking the drift as 1e-7·√M·|mean|/std (three times the largest
    measured; see :func:`statscope.probes.reduce.batchnorm_entry`): a margin for the steps until
    the next block.

    Args:
        mean, var: (k, C) moments of recent steps; the last eight rows are read.
        count: (k,) elements per channel.
    """
    mean, var, count = mean[-8:], var[-8:], count[-8:]
    with np.errstate(all="ignore"):
        ratio = np.abs(mean) / np.sqrt(var + 1e-5)
    ratio = np.where(np.isfinite(ratio), ratio, 0.0)
    m = float(np.max(count)) if len(count) else 0.0
    return bool(ratio.size and float(ratio.max()) * np.sqrt(m) > FLOAT32_MEAN_RATIO)


NEAR_EPS = 1e-3
"""A channel whose batch variance is below ``NEAR_EPS·eps`` is reduced from the BatchNorm's input:
``1/invstd² − eps`` from BatchNorm's float32 ``invstd`` is off by ~1.2e-7·(var + eps), which is
6e-5 of the std at var = 1e-3·eps and more than the std itself below ~1e-7·eps (a channel that
is constant over the batch). Higher, the switch would fire on the ordinary small variances of
batches of four, and make such runs' bits depend on when the advice arrives."""


OVERFLOW_VAR = 1e30
"""A BatchNorm probe one of whose channels has a batch variance above this, or whose BatchNorm's
own variance overflowed (``invstd`` 0, a stored ``bn_std`` of inf), reduces its input itself:
BatchNorm's CPU kernel sums squared deviations in float32, which overflows once N·var passes
~3.4e38 (deviations beyond ~1e19 in one element), while the generic path scales its sums and
keeps such variances. 1e30 leaves room for 1e8 elements per channel; beneath it both paths
agree, so a probe whose variances hover there moves between two right answers."""


def var_overflows(var: np.ndarray) -> bool:
    """Whether a BatchNorm probe's channels had a variance above :data:`OVERFLOW_VAR` (inf
    included) in recent steps (the last eight rows of ``var``, (k, C))."""
    with np.errstate(invalid="ignore"):
        return bool((var[-8:] > OVERFLOW_VAR).any())


FAR_MEAN = 300.0
"""|mean|/√(var + eps) beyond which a float32 sum of a channel's M elements is off by more than
~3e-5 of its std whatever M (the rounding of a float32 total, ~1e-7·|mean| relative to the
std, where the stored float32 mean keeps 3e-8·|mean|): measured up to 1e-4 at 1000 for BatchNorm's
own CPU mean and for the extra sum alike. Past it a CPU BatchNorm probe reduces its input itself
(:func:`far_mean`)."""


def far_mean(mean: np.ndarray, var: np.ndarray, eps: float) -> bool:
    """Whether a CPU BatchNorm probe's channels had |mean|/√(var + eps) above :data:`FAR_MEAN`
    in recent steps (the last eight rows of ``mean`` and ``var``, (k, C)), so that it should
    reduce its input itself, summed in float64 from shifted values."""
    mean, var = mean[-8:], var[-8:]
    with np.errstate(all="ignore"):
        ratio = np.abs(mean) / np.sqrt(var + eps)
    ratio = ratio[np.isfinite(ratio)]
    return bool(ratio.size) and float(ratio.max()) > FAR_MEAN


def near_eps(var: np.ndarray, eps: float) -> bool:
    """Whether a BatchNorm probe's channels came near its eps in recent steps (the last eight
    rows of ``var``, (k, C)), so that it should reduce its input itself (:data:`NEAR_EPS`)."""
    recent = var[-8:]
    recent = recent[np.isfinite(recent)]
    return bool(recent.size) and float(recent.min()) < NEAR_EPS * eps


class Advice(NamedTuple):
    """What the writer tells a BatchNorm probe after filing its rows.

    Attributes:
        sum_mean: its mean needs one extra sum of the input (:func:`mean_needs_sum`; True
            for rows that were not BatchNorm's own CPU statistics).
        reduce: it should reduce its input itself (:func:`near_eps`, :func:`var_overflows`,
            or on the CPU :func:`far_mean`).
    """

    sum_mean: bool
    reduce: bool


# -- a gathered block to rows -----------------------------------------------------------------

@dataclass(frozen=True)
class ProbePart:
    """One probe's share of a gathered block.

    Attributes:
        channels, groups: the probe's width and EN groups.
        spans: ``(start, stop)`` block rows of each of its segments, in order.
        cpu_batchnorm: its rows hold a BatchNorm's own statistics computed on the CPU (the
            writer advises it whether the mean needs an extra sum).
        cpu: its rows come from tensors on the CPU.
        bn_eps: the eps of the BatchNorm whose input it probes on the fast path (the writer
            advises it whether to reduce the input itself: :func:`near_eps`); None for others.
        sets: rows (relative to ``skip``) that have per-set entries, and their (rows, 4, G)
            float64 values (:data:`statscope.schema.SET_STATS` order); None when not recorded.
        set_width: G of ``sets``.
    """

    channels: int
    groups: int
    spans: tuple
    cpu_batchnorm: bool = False
    sets: tuple | None = None
    set_width: int = 0
    bn_eps: float | None = None
    cpu: bool = False


@dataclass(frozen=True)
class Gathered:
    """A block reduced to host arrays, rows ``skip:n``: what :func:`compute_rows` needs.

    Attributes:
        steps: (k,) global steps of the rows.
        counts: per probe, (k,) int64 elements per channel (0 where it did not run).
        parts: per probe, its :class:`ProbePart`, or None when it did not run in these rows.
        segments: per segment of every part (in order), its float64 moments, or None for a
            segment of entries, whose moments come from ``jobs``.
        jobs: the stacked entries (:func:`statscope.entries.jobs_moments`), of the runs ``refs`` lists.
        refs: ``(segment index, rows)`` of each run of entries (its segment's rows).
        scalars: ``{name: (k,)}`` float64, NaN where not logged.
        skip, n: the rows of the block these are.
        order: 2 or 4.
        names: the statistics to compute; set_names: the per-set ones among them.
    """

    steps: np.ndarray
    counts: list
    parts: list
    segments: list
    jobs: list
    refs: list
    scalars: dict
    skip: int
    n: int
    order: int
    names: tuple
    set_names: tuple = ()


@dataclass(frozen=True)
class Rows:
    """The statistics of rows ``skip:n`` of a block, per probe.

    Attributes:
        steps: (k,) global steps.
        counts: per probe, (k,) int64 elements per channel (0 where it did not run).
        stats: per probe that ran in these rows, ``{name: (k, C) or (k, groups)}`` float32; None
            for the others (their channels may still be unknown).
        scalars: ``{name: (k,)}`` float64, NaN where not logged.
        advice: per probe index of a BatchNorm probe on the fast path, its :class:`Advice`.
    """

    steps: np.ndarray
    counts: list
    stats: list
    scalars: dict = field(default_factory=dict)
    advice: dict = field(default_factory=dict)


def compute_rows(g: Gathered, compute: Mapping[str, Callable[[Moments], np.ndarray]] = BUILTIN
                 ) -> Rows:
    """The statistics of a gathered block.

    The moments of the probes of equal width and groups are filled into one (probes·k, C)
    array each, where every segment's rows are written once, and the statistics computed on it
    in one pass: at small batch sizes the writer's cost is per numpy call and per pass over the
    block, not per element (``benchmarks/bench_writer.py``).

    Args:
        g: the gathered block.
        compute: how each per-channel statistic follows from the moments (statscope's own by
            default; the recorder passes its registry, which may hold the user's).
    """
    order, k, skip = g.order, g.n - g.skip, g.skip
    n_moments = 2 if order < 4 else 4
    shapes: dict[tuple[int, int], list[int]] = {}
    for i, part in enumerate(g.parts):
        if part is not None:
            shapes.setdefault((part.channels, part.groups), []).append(i)
    joined: dict[tuple[int, int], list[np.ndarray]] = {}
    views: dict[int, list[np.ndarray]] = {}  # per probe, its rows of the joined moments
    for shape, members in shapes.items():
        joined[shape] = [np.empty((len(members) * k, shape[0])) for _ in range(n_moments)]
        for j, i in enumerate(members):
            views[i] = [a[j * k:(j + 1) * k] for a in joined[shape]]
    dests = []  # per segment, in part order: the rows it fills
    for i, part in enumerate(g.parts):
        if part is None:
            continue
        if sum(stop - start for start, stop in part.spans) < k:
            for a in views[i]:
                a.fill(np.nan)  # rows of no segment
        dests += [[a[start - skip:stop - skip] for a in views[i]] for start, stop in part.spans]
    for dst, src in zip(dests, g.segments):
        if src is not None:  # a raw segment's moments
            for j, a in enumerate(dst):
                a[...] = src[j] if j < len(src) and src[j] is not None else np.nan
    if g.refs:
        jobs_into(g.jobs, [dests[j] for j, _ in g.refs], order)
    for i, count in enumerate(g.counts):
        if i in views and not count.all():
            for a in views[i]:
                a[count == 0] = np.nan  # slots this probe did not run in hold stale buffer rows
    stats: list = [None] * len(g.parts)
    for shape, members in shapes.items():
        m = joined[shape]
        moments = Moments(m[0], m[1], *(m[2:] if n_moments == 4 else (None, None)), shape[1])
        with np.errstate(all="ignore"):  # NaN rows of steps a probe missed are expected
            done = {n: compute[n](moments).astype(np.float32) for n in g.names if n in compute}
        for j, i in enumerate(members):
            stats[i] = {name: v[j * k:(j + 1) * k] for name, v in done.items()}
    if g.set_names:
        _add_sets(stats, g.parts, g.set_names, k)
    # Rows that are not BatchNorm's own CPU statistics (a CUDA BatchNorm, a probe reducing its
    # input itself) say nothing of the extra sum: keep it, so that a probe whose channels the
    # extra sum cannot read (batchnorm_kind "unsummable") stays on the generic path, as it did
    # when only CPU BatchNorm rows were advised.
    advice = {}
    for i, (part, count) in enumerate(zip(g.parts, g.counts)):
        if part is not None and part.bn_eps is not None:
            mean, var = views[i][0], views[i][1]
            advice[i] = Advice(not part.cpu_batchnorm or mean_needs_sum(mean, var, count),
                               near_eps(var, part.bn_eps) or var_overflows(var)
                               or part.cpu and far_mean(mean, var, part.bn_eps))
    return Rows(g.steps, g.counts, stats, g.scalars, advice)


def _add_sets(stats: list, parts: list, names: tuple, k: int) -> None:
    """The per-set statistics of each probe that ran: (k, G) arrays from its entries."""
    for i, part in enumerate(parts):
        if part is None or part.sets is None or stats[i] is None:
            continue
        present, host = part.sets
        arrays = [np.full((k, part.set_width), np.nan) for _ in names]
        if len(present):
            for name, a in zip(names, arrays):  # entries hold the four in SET_STATS order
                a[present] = host[:, S.SET_STATS.index(name)]
        stats[i].update({name: a.astype(np.float32) for name, a in zip(names, arrays)})


def file_columns(rows: Rows, column: Mapping[int, int], layout: Layout
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The store's columns of ``rows``: ``(steps, count (k, n_probes), {stat: (k, width)})``.

    Args:
        rows: the rows, per probe of the recorder.
        column: recorder probe index -> the layout's probe index (every probe that ran).
        layout: the run's layout; its probes without rows get NaN and count 0.
    """
    by_probe = {j: i for i, j in column.items()}
    k = len(rows.steps)
    count = np.zeros((k, len(layout.probes)), np.int64)
    stats = {}
    for s in layout.stats:
        per_group = s in S.PER_GROUP_STATS
        parts = []
        for j, p in enumerate(layout.probes):
            i = by_probe.get(j)
            st = rows.stats[i] if i is not None else None
            width = p.groups if per_group else p.channels
            parts.append(st[s] if st is not None else np.full((k, width), np.nan, np.float32))
        stats[s] = np.concatenate(parts, axis=1) if parts else np.zeros((k, 0), np.float32)
    for i, j in column.items():
        count[:, j] = rows.counts[i]
    return rows.steps, count, stats
