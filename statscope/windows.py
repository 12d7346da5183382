"""Window summaries computed while recording: the exact mean and standard deviation of every
statistic of every channel over consecutive windows of steps.

Window ``k`` holds the steps ``k·W .. (k+1)·W − 1`` (global step values, so a stride between
recorded steps only thins it). Per column it is summarized over the steps where its layer ran:
``count`` steps, their mean, and their sample standard deviation (ddof = 1, the paper's
fluctuation). A column that held a non-finite value in a window is NaN there. Blocks of rows are
merged into the running window with Chan's pairwise update, in float64, so the result equals a
two-pass computation over the window's values. A Fig-6 analysis of every channel then reads
``steps / W`` rows, even when the per-step columns keep only a subset of the channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from statscope import schema as S

__all__ = ["WindowRow", "Windows", "WindowArrays"]


@dataclass(frozen=True)
class WindowRow:
    """One finished window.

    Attributes:
        index: k; the window holds steps ``k·length .. (k+1)·length − 1``.
        count: (probes,) int64 steps at which each probe ran.
        mean, std: per statistic name, (columns,) float64 (std with ddof = 1; NaN below 2 steps).
    """

    index: int
    count: np.ndarray
    mean: dict[str, np.ndarray]
    std: dict[str, np.ndarray]


class _Moments:
    """Running n, mean and sum of squared deviations of each column."""

    def __init__(self, width: int):
        self.n = np.zeros(width, np.int64)
        self.mean = np.zeros(width)
        self.m2 = np.zeros(width)
        self.bad = np.zeros(width, bool)

    def widen(self, width: int) -> None:
        extra = width - len(self.n)
        if extra > 0:
            self.n = np.concatenate([self.n, np.zeros(extra, np.int64)])
            self.mean = np.concatenate([self.mean, np.zeros(extra)])
            self.m2 = np.concatenate([self.m2, np.zeros(extra)])
            self.bad = np.concatenate([self.bad, np.zeros(extra, bool)])

    def add(self, x: np.ndarray, ran: np.ndarray | None) -> None:
        """Merge rows ``x`` (k, cols), float32 or float64, in float64; ``ran`` (k, cols) says
        which rows count (None: all)."""
        if ran is None:  # the common case: a pass for the mean, two for m2, no float64 copy
            mb = x.mean(0, dtype=np.float64)
            if np.isfinite(mb).all():  # NaN and inf reach the column's mean
                nb = len(x)
                dev = np.subtract(x, mb)
                m2b = np.square(dev, out=dev).sum(0)
                n = self.n + nb
                delta = mb - self.mean
                self.mean = self.mean + delta * (nb / n)
                self.m2 = self.m2 + m2b + delta * delta * (self.n * nb / n)
                self.n = n
                return
        x = np.asarray(x, np.float64)
        finite = np.isfinite(x)
        if ran is None:
            ran = np.ones(x.shape, bool)
        self.bad |= (ran & ~finite).any(0)
        use = ran & finite
        nb = use.sum(0)
        if not nb.any():
            return
        # the same operations as above, in the same order: a column that ran at every row gets
        # the same bits from either branch (a resumed run's rebuilt window takes this one)
        with np.errstate(invalid="ignore", divide="ignore"):
            xs = np.where(use, x, 0.0)
            mb = xs.sum(0) / np.maximum(nb, 1)
            m2b = (np.where(use, x - mb, 0.0) ** 2).sum(0)
            n = self.n + nb
            delta = mb - self.mean
            m = np.maximum(n, 1)
            self.mean = np.where(nb > 0, self.mean + delta * (nb / m), self.mean)
            self.m2 = np.where(nb > 0, self.m2 + m2b + delta * delta * (self.n * nb / m),
                               self.m2)
        self.n = n

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where((self.n > 0) & ~self.bad, self.mean, np.nan)
            std = np.where((self.n > 1) & ~self.bad,
                           np.sqrt(self.m2 / np.maximum(self.n - 1, 1)), np.nan)
        return mean, std


_PART = 32  # steps of a window merged at once (aligned at the window's start)


class Windows:
    """Accumulates rows into windows of ``length`` steps and hands back each finished window.

    Rows are merged in parts of ``_PART`` steps aligned at the window's start, whatever blocks
    they come in: a part is merged once a later step arrives (or the window is finished), so
    the summaries do not depend on how the rows were handed over (blocks, idle flushes, a
    resumed run's rebuilt window) and a resumed run's are byte-identical to an uninterrupted
    one's.

    Args:
        length: W, steps per window.
        widths: columns per statistic name.
        n_probes: probes (for the per-probe step counts).
    """

    def __init__(self, length: int, widths: dict[str, int], n_probes: int):
        self.length = int(length)
        self.widths = dict(widths)
        self.n_probes = n_probes
        self.index: int | None = None
        self._probe_of: dict[str, np.ndarray] = {}
        self._reset()

    def _reset(self) -> None:
        self._acc = {name: _Moments(w) for name, w in self.widths.items()}
        self._ran = np.zeros(self.n_probes, np.int64)
        # the rows of the last part, not merged yet: (steps, count, values)
        self._tail: tuple | None = None

    def widen(self, widths: dict[str, int], n_probes: int) -> None:
        """New probes joined: more columns, starting empty in the current window."""
        self._merge_tail()
        self.widths = dict(widths)
        for name, acc in self._acc.items():
            acc.widen(widths[name])
        self._ran = np.concatenate([self._ran, np.zeros(n_probes - self.n_probes, np.int64)])
        self.n_probes = n_probes

    def add(self, steps: np.ndarray, count: np.ndarray, values: dict[str, np.ndarray],
            probe_of: dict[str, np.ndarray], lost: dict[str, np.ndarray] | None = None
            ) -> list[WindowRow]:
        """Add rows; return the windows that they finished.

        Args:
            steps: (k,) increasing global steps.
            count: (k, probes) elements per channel; 0 where a probe did not run.
            values: per statistic, (k, columns) values of every column.
            probe_of: per statistic, (columns,) the probe of each column.
            lost: per statistic, (columns,) columns whose values in these rows are unknown (set
                when a resumed writer rebuilds its window from kept columns only): NaN in the
                rows' window (one window: the current one).
        """
        done = []
        steps = np.asarray(steps)
        if self._tail is not None:  # the held part's rows go first
            t_steps, t_count, t_values = self._tail
            self._tail = None
            steps = np.concatenate([t_steps, steps])
            count = np.concatenate([t_count, count])
            values = {n: np.concatenate([t_values[n], values[n]]) for n in t_values}
        if not len(steps):
            return done
        which = steps // self.length
        part = which * (self.length // _PART + 1) + (steps - which * self.length) // _PART
        cuts = np.flatnonzero(np.diff(part)).tolist()
        bounds = list(zip([0, *(c + 1 for c in cuts)], [*(c + 1 for c in cuts), len(steps)]))
        self._probe_of = probe_of
        for i, (a, b) in enumerate(bounds):
            k = int(which[a])
            if self.index is not None and k != self.index:
                done.append(self.finish())
            self.index = k
            rows = slice(a, b)
            if i < len(bounds) - 1:
                self._merge(count[rows], {n: v[rows] for n, v in values.items()})
            else:  # the last part may go on in the next rows: held (copies) until it is whole
                self._tail = (steps[rows].copy(), count[rows].copy(),
                              {n: v[rows].copy() for n, v in values.items()})
        if lost is not None:  # the rows' window, which is the current one
            for name, acc in self._acc.items():
                if name in lost:
                    acc.bad |= lost[name]
        return done

    def _merge(self, count: np.ndarray, values: dict[str, np.ndarray]) -> None:
        ran = count > 0
        self._ran += ran.sum(0)
        everywhere = ran.all()
        for name, acc in self._acc.items():
            acc.add(values[name], None if everywhere else ran[:, self._probe_of[name]])

    def _merge_tail(self) -> None:
        if self._tail is not None:
            _, count, values = self._tail
            self._tail = None
            self._merge(count, values)

    def finish(self) -> WindowRow:
        """Close the current window (the last one, at the end of a run) and return it."""
        self._merge_tail()
        mean, std = {}, {}
        for name, acc in self._acc.items():
            mean[name], std[name] = acc.finish()
        row = WindowRow(self.index, self._ran.copy(), mean, std)
        self.index = None
        self._reset()
        return row


class WindowArrays:
    """The ``windows`` subgroup of a run store: one row per finished window.

    Arrays: ``step`` (W,) the first step of each window, ``count`` (W, probes) steps each probe
    ran, and per statistic ``<name>_mean`` and ``<name>_std`` (W, columns) float32. The number of
    committed rows is the root attribute ``n_windows``.

    Args:
        group: the run's root zarr group.
        make: ``make(group, name, shape, dtype, fill, dims)`` creates a store array the way the
            writer creates its others (shards, checksums).
    """

    NAME = S.WINDOWS_GROUP

    def __init__(self, group, make):
        self.root, self.make = group, make
        self.group = None
        self.arrays: dict = {}

    def create(self, widths: dict[str, int], n_probes: int) -> None:
        self.group = self.root.create_group(self.NAME, overwrite=True)
        self.arrays[S.STEP] = self.make(self.group, S.STEP, (0,), "int64", -1, (S.WINDOW_DIM,))
        self.arrays[S.COUNT] = self.make(self.group, S.COUNT, (0, n_probes), "int64", 0,
                                         (S.WINDOW_DIM, S.PROBE))
        for name, width in widths.items():
            col = S.EN_GROUP if name in S.PER_GROUP_STATS else S.NEURON
            for part in S.SUMMARIES:
                self.arrays[f"{name}_{part}"] = self.make(
                    self.group, f"{name}_{part}", (0, width), "float32", np.nan,
                    (S.WINDOW_DIM, col))

    def open(self, rows: int, stats) -> None:
        """Open the arrays of an existing run and cut them to ``rows`` (resume)."""
        self.group = self.root[self.NAME]
        names = [S.STEP, S.COUNT, *(f"{s}_{part}" for s in stats for part in S.SUMMARIES)]
        for name in names:
            arr = self.group[name].with_config({"write_empty_chunks": True})
            if arr.shape[0] != rows:
                arr.resize((rows, *arr.shape[1:]))
            self.arrays[name] = arr

    def widen(self, widths: dict[str, int], n_probes: int, rows: int) -> None:
        """New columns for probes that joined: NaN (count 0) in the windows already written."""
        for name, arr in self.arrays.items():
            if name == S.STEP:
                continue
            width = n_probes if name == S.COUNT else widths[name.rsplit("_", 1)[0]]
            old = arr.shape[1]
            if width != old:
                arr.resize((rows, width))
                if rows:
                    arr[:, old:] = 0 if name == S.COUNT else np.nan

    def append(self, done: list[WindowRow], rows: int, length: int) -> int:
        """Write finished windows after the first ``rows``; return the new row count."""
        if not done:
            return rows
        n1 = rows + len(done)
        block = {S.STEP: np.array([w.index * length for w in done], np.int64),
                 S.COUNT: np.stack([w.count for w in done])}
        for name in done[0].mean:
            block[f"{name}_mean"] = np.stack([w.mean[name] for w in done]).astype(np.float32)
            block[f"{name}_std"] = np.stack([w.std[name] for w in done]).astype(np.float32)
        for name, arr in self.arrays.items():
            arr.resize((n1, *arr.shape[1:]))
            arr[rows:n1] = block[name]
        return n1
