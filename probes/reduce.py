"""The generic path: one step's per-channel moments, reduced on the tensor's device at once.

:func:`step_entry` runs on the training thread for a probed tensor that is not buffered raw. It
returns an *entry*: a tag and a few small (C,) tensors, without any host sync. The writer
thread turns a block's entries into float64 moments with :func:`entry_moments`. Entries:

- ``("invstd", mean, invstd, eps)``: what a training-mode BatchNorm computed itself
  (:mod:`statscope.probes.fastpath`); var = 1/invstd² − eps.
- ``("suminv", S1, invstd, mean, eps, M)``: the same with the mean from a cascade sum of the
  input, where torch's CPU kernel sums in float32 (:func:`batchnorm_entry`), and the variance
  1/invstd² − eps − (mean − S1/M)²: BatchNorm's variance about its own drifted mean.
- ``("var", mean, var)``: on CUDA, ``torch.batch_norm_update_stats`` without running
  statistics: one kernel and one read of the tensor, Welford in float32 straight from
  bf16/fp16/fp32 in any layout (channels_last and ``(N, L, C)`` take its channels-last kernel).
- ``("mv", packed)`` and ``("shifted", packed)``: under ``torch.compile``, the moments the
  compiled graph computed in float32, packed in one tensor (:mod:`statscope.probes.compiled`):
  ``mean, var, flag`` (2C + 1,) on the CPU; ``x0, mean, var`` (3C,) elsewhere, the moments of
  ``x − x0`` (a shift, so that a large offset loses nothing to float32); mean = x0 + mean.
- ``("wvar", mean, var, n)``: a masked tensor's moments over its real elements, ``n`` of them
  per channel (:func:`statscope.probes.sets.masked_entry`); ``("wvar4", mean, var, n, m3,
  m4)`` with the third and fourth central moments, where a statistic needs them.
- ``("sums", x0, s, S1, S2[, S3, S4], M)``: everywhere else (the CPU, and every device when a
  statistic needs the third and fourth moments): per-channel sums of ``u = (x − x0) / s``, where
  ``x0`` is the median of a few of the channel's first elements (a shift, so that large offsets
  lose nothing to cancellation) and ``s = max(|x0|, 1)`` (a scale, so that squares of values
  near 1e19 do not overflow float32). On the CPU, with statscope's C++ kernels
  (:mod:`statscope.native`, built in the background at the first use), the sums run in float64
  in one read of the tensor in its own dtype (channels-last rows or ``(N, C, *S)`` planes);
  otherwise, and on CUDA, in float32 (float64 for float64 inputs) with torch's cascade
  summation, from one float32 copy of the shifted tensor. The moments follow on the writer
  thread in float64. ``("psums", packed, M)`` is the C++ kernel's form of the same: ``x0, s,
  S1, S2[, S3, S4]`` as the rows of one (2 + order, C) float64 tensor.

Accuracy against float64: the mean to ~1e-7 of the channel's std; the std to ~1e-6 of itself
when the shift is within a few stds of the mean (the error grows with ((mean − x0)/std)²).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from statscope.native import kernels
from statscope.entries import EntryJob, jobs_moments, var_from_invstd
from statscope.rows import far_mean, mean_needs_sum, near_eps, var_overflows

__all__ = ["step_entry", "batchnorm_entry", "batchnorm_kind", "mean_needs_sum", "entry_moments",
           "entries_gather", "StackedRun", "stack_entries", "SHIFT_SAMPLE", "CPU_BATCHNORM_MAX",
           "MASKED_KINDS"]

MASKED_KINDS = ("wvar", "wvar4")
"""Entry kinds of masked tensors: after the mean and the variance comes the count of real
elements per channel."""

SHIFT_SAMPLE = 8
"""Elements per channel whose median is the shift of the ``sums`` entry."""

_CUDA_VAR_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_CPU_KERNEL_DTYPES = _CUDA_VAR_DTYPES

CPU_BATCHNORM_MAX = 1 << 18
"""Elements per channel up to which the BatchNorm fast path trusts the variance of torch's CPU
kernel where that kernel sums a float32 input in float32 (see :func:`batchnorm_entry`): off by
up to 3.5e-5 of itself at 2¹⁸, offsets of 0–250 std, on one thread (torch 2.13)."""


_BATCH_DIMS = {n: (0, *range(2, n)) for n in range(2, 6)}  # a BatchNorm input's dims but C's


def batchnorm_kind(x: torch.Tensor, per_channel: int) -> str:
    """How :func:`batchnorm_entry` treats a BatchNorm input like ``x``: ``"own"`` (BatchNorm's
    statistics as they are), ``"sum"`` (the mean from an extra sum while ``sum_mean``),
    ``"unsummable"`` (BatchNorm's own while ``sum_mean`` is off, else the generic path: the
    channels are not rows of the input's memory) or ``"generic"`` (reduce the input instead).
    Depends only on the input's device, dtype, layout and shape, so a probe decides once per
    kind of input."""
    if not x.is_cpu or x.dtype == torch.float64:
        return "own"
    if x.dtype == torch.float32 and x.ndim > 2 and x.is_contiguous() \
            and x.numel() > x.shape[0] * x.shape[1]:
        return "own"
    if x.dtype != torch.float32 or per_channel > CPU_BATCHNORM_MAX:
        return "generic"
    return "sum" if x.movedim(1, -1).is_contiguous() else "unsummable"


def batchnorm_entry(stats, per_channel: int, sum_mean: bool = True,
                    kind: str | None = None) -> tuple | None:
    """The entry of a BatchNorm's own statistics (:class:`~statscope.probes.fastpath.BatchStats`),
    or None where they are not accurate enough and the input must be reduced generically.

    cuDNN and torch's CUDA kernels reduce with Welford or in parallel trees, and torch's CPU
    kernel sums in float64 for contiguous float32 inputs with spatial dims: their statistics are
    used as they are. For channels_last and ``(N, C)`` float32 inputs torch's CPU kernel sums
    each channel sequentially in float32: its mean drifts by about 3e-8·√M·|mean| (M elements
    per channel; more than 1e-4 of the std once |mean|/std ≳ 3000/√M), and once the running
    total's float32 spacing nears the elements themselves by far more (0.27 std at M = 2¹⁸ and
    |mean|/std = 250, one thread). Its variance is the mean square about that drifted mean: the
    true variance plus the drift's square (+7 % there), plus the float32 sum of squares' own
    error, up to ~6e-6 of itself at M = 65k and 3.5e-5 at 2¹⁸. There, with ``sum_mean``, the
    mean is taken from one cascade sum of the input (one extra pass, a third of BatchNorm's own
    cost on the CPU), and the variance is BatchNorm's less the square of its mean's distance
    from that sum (the entry keeps BatchNorm's mean for it); beyond :data:`CPU_BATCHNORM_MAX`
    elements per channel the input is reduced generically instead. So is every bf16 and fp16
    input on the CPU: torch's variance of those was off by up to 2.4e-4 of itself at 65k
    elements and 1e-2 at 2¹⁸ (offsets of 100–250 std), where the fast path promises 1e-4 of
    √(var + eps). The probe sets
    ``sum_mean`` itself at each block's hand-over from that block's statistics
    (:func:`~statscope.rows.mean_needs_sum`: off while the drift stays below 5e-5 of the std;
    ``Capture._advise_mean``), so that the step where it switches does not depend on the
    writer's timing, and the writer tells a probe whose |mean| is beyond
    :data:`~statscope.rows.FAR_MEAN` × √(var + eps) to reduce its input instead, where a float32
    sum loses the mean's digits (before that advice: :func:`reduce_before_advice`).

    Args:
        stats: the BatchNorm's input, mean, inverse std and eps.
        per_channel: elements per channel of the input.
        sum_mean: take the mean from a sum of the input where BatchNorm's is not trusted.
        kind: :func:`batchnorm_kind` of the input, when the caller knows it already.
    """
    x = stats.input
    kind = batchnorm_kind(x, per_channel) if kind is None else kind
    if kind == "generic":
        return None
    if kind == "own" or not sum_mean:
        return ("invstd", stats.mean, stats.invstd, stats.eps)
    if kind == "unsummable":
        return None
    # the sum over every dim but the channels': the same kernel and values as the sum over
    # the rows of the (M, C) view, in two torch calls rather than four (step_entry says why)
    x, dims = x.detach(), _BATCH_DIMS[x.ndim]
    total = x.sum(dims)  # float32: batchnorm_kind sends other CPU dtypes to the generic path
    return ("suminv", total, stats.invstd, stats.mean, stats.eps, per_channel)


def reduce_before_advice(stats, kind: str, sum_mean: bool) -> bool:
    """Whether a BatchNorm probe should reduce its input itself (``Capture.reduce_bn``) before
    the writer's first advice: the writer's tests (:func:`statscope.rows.near_eps`,
    :func:`statscope.rows.var_overflows` and :func:`statscope.rows.far_mean`) on one step's
    :class:`~statscope.probes.fastpath.BatchStats`, its variance recovered as the writer
    recovers it, on the CPU, where reading BatchNorm's (C,) statistics waits for nothing (on
    other devices False: it would wait for the device). The far-mean test only where the mean
    would come from a float32 sum (``kind`` ``"sum"`` with ``sum_mean``)."""
    if not stats.invstd.is_cpu:
        return False
    var = var_from_invstd(stats.invstd.detach().numpy().astype(np.float64)[None], stats.eps)
    if near_eps(var, stats.eps) or var_overflows(var):
        return True
    return kind == "sum" and sum_mean and far_mean(stats.mean.detach().numpy()[None], var,
                                                   stats.eps)


def step_entry(x: torch.Tensor, channel_dim: int, order: int) -> tuple:
    """Reduce one step's tensor to an entry of per-channel sums (see the module docstring).

    On the CPU with the C++ kernels this is one call: each torch call more costs a training
    step far more than its ``timeit`` figure, as the layer's own pass over the tensor has just
    evicted the interpreter's and torch's dispatch state from the caches (~8 µs instead of ~1 µs
    on the benchmark VM, docs/performance.md).

    Args:
        x: the probed tensor, ≥ 2 dims, not empty (its autograd history is not followed).
        channel_dim: the dimension that holds the channels.
        order: the highest moment needed, 2 or 4.

    Returns:
        An entry tuple; its tensors are new (they do not keep ``x`` alive).
    """
    ndim = x.ndim
    cd = channel_dim % ndim
    if x.is_cpu:
        if x.dtype in _CPU_KERNEL_DTYPES:
            native = kernels(wait=False)
            if native is not None:
                flat = _native_layout(x, cd)
                if flat is not None:
                    # one call, one read of x in its own dtype, sums in float64 (statscope/csrc)
                    packed = native.shifted_sums(flat, 2 if order <= 2 else 4, flat.ndim == 2,
                                                 SHIFT_SAMPLE)
                    return ("psums", packed, x.numel() // x.shape[cd])
    elif order <= 2 and x.is_cuda and x.dtype in _CUDA_VAR_DTYPES:
        xm = x.detach().movedim(cd, -1)
        if xm.is_contiguous():
            xb = xm.view(-1, xm.shape[-1])  # (M, C): batch norm's channels-last kernel
        else:
            xb = xm.movedim(-1, 1)
        mean, var = torch.batch_norm_update_stats(xb, None, None, 0.0)
        return ("var", mean, var)
    with torch.no_grad():
        return _torch_sums(x, cd, order)


def _native_layout(x: torch.Tensor, cd: int) -> torch.Tensor | None:
    """``x`` as the C++ kernel reads it: (M, C) rows with the channels contiguous or (N, C, S)
    planes with each channel's elements contiguous; None for other layouts."""
    if x.is_contiguous():
        if cd == x.ndim - 1:
            return x.view(-1, x.shape[cd])
        if cd == 1:
            return x.view(x.shape[0], x.shape[1], -1)
    xm = x.movedim(cd, -1)
    if xm.is_contiguous():  # channels_last
        return xm.view(-1, xm.shape[-1])
    return None


def _torch_sums(x: torch.Tensor, cd: int, order: int) -> tuple:
    """The ``sums`` entry with torch's ops: float32 (float64 for float64 inputs) from one
    shifted copy of ``x``."""
    xm = x.movedim(cd, -1)
    c = xm.shape[-1]
    if xm.is_contiguous():
        v, dims, bshape = xm.view(-1, c), (0,), (c,)
        sample = v[:SHIFT_SAMPLE]
    else:
        v, dims = x, tuple(d for d in range(x.ndim) if d != cd)
        bshape = tuple(c if d == cd else 1 for d in range(x.ndim))
        sample = xm[(0,) * (x.ndim - 2) + (slice(0, SHIFT_SAMPLE),)]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x0 = sample.median(0).values.to(acc)
    s = x0.abs().clamp_min_(1.0)
    u = torch.sub(v, x0.view(bshape))  # float32 from bf16/fp16: computed in float32, one copy
    u.div_(s.view(bshape))
    s1 = u.sum(dims)
    m = v.numel() // c
    if order <= 2:
        return ("sums", x0, s, s1, u.square_().sum(dims), m)
    u2 = u * u
    return ("sums", x0, s, s1, u2.sum(dims), (u2 * u).sum(dims), u2.square_().sum(dims), m)


def entry_moments(entries: Sequence[tuple | None], channels: int, order: int
                  ) -> tuple[np.ndarray, ...]:
    """Float64 moments of a run of entries, one row each (NaN rows for None entries).

    Args:
        entries: per row, an entry of :func:`step_entry` or of the BatchNorm fast path, or None.
        channels: C.
        order: 2 for (mean, var), 4 for (mean, var, m3, m4).

    Returns:
        (k, C) float64 arrays; m3/m4 of rows whose entry cannot give them (BatchNorm's own
        statistics) are NaN.
    """
    return entries_moments([entries], channels=[channels], order=order)[0]


def entries_moments(runs: Sequence[Sequence[tuple | None]], channels: Sequence[int], order: int
                    ) -> list[tuple[np.ndarray, ...]]:
    """:func:`entry_moments` of several runs at once (the probes of a block)."""
    return jobs_moments(entries_gather(runs), [len(r) for r in runs], channels, order)


class StackedRun:
    """A run of entries of one kind, every row present, stacked: ``tensors`` holds each of the
    entry's tensors as a (rows, C) tensor and ``numbers`` the numbers after them as a (rows, n)
    float64 array. Slices like the list of entries it stands for (:func:`stack_entries`)."""

    __slots__ = ("tag", "length", "tensors", "numbers")

    def __init__(self, tag: str, length: int, tensors: list, numbers: np.ndarray):
        self.tag, self.length, self.tensors, self.numbers = tag, length, tensors, numbers

    def __len__(self) -> int:
        return len(self.numbers)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return StackedRun(self.tag, self.length, [t[index] for t in self.tensors],
                              self.numbers[index])
        return (self.tag, *(t[index] for t in self.tensors), *self.numbers[index].tolist())


def stack_entries(entries: Sequence[tuple | None]) -> StackedRun | None:
    """``entries`` as a :class:`StackedRun`, on the training thread when it hands a block over:
    the writer thread then gathers a few tensors where it would loop over a Python object per
    row, and the training thread frees the rows' small tensors itself. The writer thread's
    Python holds the GIL that the training thread takes back after each kernel; a few C calls
    here cost the training thread less than that wait (docs/performance.md).

    Returns None (the entries stay a list) unless every row has an entry, all of one kind and
    length with CPU tensors, and not masked (:data:`MASKED_KINDS`: the writer reads each such
    row's count of real elements). CUDA entries are never stacked here: the writer thread reads
    them on its own stream after the block's events.
    """
    if not entries:
        return None
    first = entries[0]
    if first is None or first[0] in MASKED_KINDS or not first[1].is_cpu:
        return None
    tag, length = first[0], len(first)
    for e in entries:
        if e is None or e[0] != tag or len(e) != length:
            return None
    try:
        return StackedRun(tag, length, *_stack(entries, _TENSORS.get(tag, length - 2)))
    except RuntimeError:  # mixed devices (a model moved within the block): as a list
        return None


def _stack(entries: Sequence[tuple], n: int) -> tuple[list, np.ndarray]:
    """The first ``n`` tensors of entries of one kind stacked, and their numbers (rows, k)."""
    tensors = [torch.stack([e[1 + j] for e in entries]) for j in range(n)]
    numbers = range(1 + n, len(entries[0]))  # a list per column: no tuple per row
    if not numbers:
        return tensors, np.empty((len(entries), 0))
    return tensors, np.array([[e[j] for e in entries] for j in numbers], np.float64).T


def entries_gather(runs: Sequence[Sequence[tuple | None]]) -> list[EntryJob]:
    """The entries of several runs as host arrays: entries of one kind and width are stacked
    together, whatever run they belong to, and copied to the host once per device (the torch
    half of :func:`entries_moments`; :func:`statscope.entries.jobs_moments` is the numpy half).
    A run is a list of entries (None where a row has none) or a :class:`StackedRun`."""
    groups: dict[tuple, list] = {}  # (tag, length, row shape) -> [(run, rows)], rows of that run
    for i, entries in enumerate(runs):
        if type(entries) is StackedRun:
            groups.setdefault((entries.tag, entries.length, entries.tensors[0].shape[1:]),
                              []).append((i, list(range(len(entries)))))
            continue
        kinds = {(e[0], len(e)) if e is not None else None for e in entries}
        if len(kinds) == 1 and None not in kinds:  # the common case: one kind, every row
            mine: dict[tuple, Any] = {kinds.pop(): range(len(entries))}
        else:
            mine = {}
            for r, e in enumerate(entries):
                if e is not None:
                    mine.setdefault((e[0], len(e)), []).append(r)
        for (tag, length), rows in mine.items():
            shape = runs[i][rows[0]][1].shape  # "psums": (2 + order, C)
            groups.setdefault((tag, length, shape), []).append((i, list(rows)))
    jobs = []  # (tag, members, stacked tensors, per-row numbers)
    for (tag, length, _), members in groups.items():
        n = _TENSORS.get(tag, length - 2)  # the items after the tensors are numbers
        if not any(type(runs[i]) is StackedRun for i, _ in members):
            stacked, numbers = _stack([runs[i][r] for i, rows in members for r in rows], n)
        else:  # one concatenation of the stacked runs and of the lists stacked
            parts = [(runs[i].tensors, runs[i].numbers) if type(runs[i]) is StackedRun
                     else _stack([runs[i][r] for r in rows], n) for i, rows in members]
            stacked = [torch.cat([p[0][j] for p in parts]) for j in range(n)]
            numbers = np.concatenate([p[1] for p in parts])
        jobs.append((tag, members, stacked, numbers))
    host = _to_host([t for job in jobs for t in job[2]])
    out, pos = [], 0
    for tag, members, stacked, numbers in jobs:
        out.append(EntryJob(tag, members, host[pos:pos + len(stacked)], numbers))
        pos += len(stacked)
    return out


def _to_host(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Numpy copies of ``tensors`` (float64 if any is, else float32): one concatenation and one
    copy per device."""
    by_device: dict[torch.device, list[int]] = {}
    for j, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(j)
    out: list = [None] * len(tensors)
    for members in by_device.values():
        flat = torch.cat([tensors[j].reshape(-1) for j in members]).cpu()
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()  # bf16/fp16 entries: exact in float32
        flat = flat.numpy()
        pos = 0
        for j in members:
            n = tensors[j].numel()
            out[j] = flat[pos:pos + n].reshape(tensors[j].shape)
            pos += n
    return out


# Tensors after the tag ("sums": all but the tag and M); the masked kinds
# (statscope.probes.sets) also carry the count of real elements per channel, after the variance.
_TENSORS = {"invstd": 2, "suminv": 3, "var": 2, "wvar": 3, "wvar4": 5, "mv": 1, "shifted": 1,
            "psums": 1}
