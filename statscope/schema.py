"""The run-store schema: every dimension, coordinate, variable and attribute name, in one place.

Probes write these names, analyses and the dashboard read them, and no other module spells the
strings. See ``docs/store-format.md`` for the layout on disk.

The Dataset that :func:`statscope.open_run` returns (format 1)::

    dims    step, neuron
    coords  step (int64), layer (str, per neuron), unit (int, index in layer),
            group (int, EN group of the neuron within its layer), label (str, "layer[unit]")
    vars    bn_mean, bn_std, en_mean, en_std, count   (step, neuron)
            bn_kurt                                   (step, neuron), when recorded
            <scalar> e.g. loss, lr                    (step,), when logged
            running_mean0, running_var0               (neuron,), when the layer tracks them

``bn_std`` and ``en_std`` are population (biased, ddof=0) standard deviations without eps,
as BatchNorm normalizes. ``count`` is the number of elements each channel's statistics came from
(N, N*L or N*H*W); 0 means the layer did not run at that step (its statistics are then NaN).
"""

FORMAT_VERSION = 2
"""Version of the on-disk layout that writers write; readers refuse versions they do not know.

Format 2 (statscope 0.2) shards every array (one object per shard, crc32c checksums on every
chunk and shard index) and writes every chunk, so a missing object is damage, never "all fill
value"; it lets probes join a run after its first rows (their columns are appended). Format 1
(statscope 0.1) stores are read as they are, without the missing-chunk check.
"""
READABLE_FORMATS = (1, 2)

# Dimensions of the user-facing Dataset.
STEP = "step"
NEURON = "neuron"
RUN = "run"
RANK = "rank"  # the ranks of a distributed run (open_run of its folder)

# Dimensions that exist only on disk.
EN_GROUP = "en_group"  # one column per (probe, EN group); expanded to neuron on read
PROBE = "probe"  # one column per probe; expanded to neuron on read

# Coordinates along neuron.
LAYER = "layer"
UNIT = "unit"
GROUP = "group"
LABEL = "label"  # "layer[unit]", e.g. "norm2[0]"

# Per-step statistics.
BN_MEAN = "bn_mean"
BN_STD = "bn_std"
BN_KURT = "bn_kurt"
EN_MEAN = "en_mean"
EN_STD = "en_std"
COUNT = "count"
# How the pixel sets of LayerNorm/GroupNorm/InstanceNorm spread (statscope.probes.sets).
SET_MEAN = "set_mean"  # mean over the sets of each set's mean
SET_MEAN_SD = "set_mean_sd"  # their standard deviation over the sets
SET_STD = "set_std"  # mean over the sets of each set's std
SET_STD_SD = "set_std_sd"  # their standard deviation over the sets
SET_STATS = (SET_MEAN, SET_MEAN_SD, SET_STD, SET_STD_SD)

PER_NEURON_STATS = (BN_MEAN, BN_STD, BN_KURT)
"""Statistics stored with one column per neuron."""
PER_GROUP_STATS = (EN_MEAN, EN_STD, *SET_STATS)
"""Statistics stored with one column per EN group and expanded to neurons on read."""
DEFAULT_STATS = (BN_MEAN, BN_STD, EN_MEAN, EN_STD)
ALL_STATS = (BN_MEAN, BN_STD, EN_MEAN, EN_STD, BN_KURT, *SET_STATS)

# Initial running statistics of probed norm layers, per neuron.
RUNNING_MEAN0 = "running_mean0"
RUNNING_VAR0 = "running_var0"

# Arrays that exist only on disk.
NEURON_PROBE = "neuron_probe"  # (neuron,) int32: index into ATTR_PROBES
NEURON_UNIT = "neuron_unit"  # (neuron,) int32
NEURON_GROUP = "neuron_group"  # (neuron,) int32: column in the en_group dimension

# Window summaries (statscope.windows): a subgroup of the run, and the Dataset open_windows returns.
WINDOWS_GROUP = "windows"
WINDOW_DIM = "window"  # dim: one row per window of window_steps steps
SUMMARY = "summary"  # dim of open_windows' variables: mean, std over the window
SUMMARIES = ("mean", "std")
DEFAULT_WINDOW_STEPS = 200  # the paper's window

RESERVED_NAMES = frozenset(
    {STEP, NEURON, RUN, RANK, EN_GROUP, PROBE, LAYER, UNIT, GROUP, LABEL, COUNT, RUNNING_MEAN0,
     WINDOWS_GROUP, WINDOW_DIM, SUMMARY,
     RUNNING_VAR0, NEURON_PROBE, NEURON_UNIT, NEURON_GROUP, *ALL_STATS}
)
"""Names a logged scalar may not take."""

# Root attributes.
ATTR_FORMAT = "statscope_format"
ATTR_STATUS = "status"
ATTR_N_STEPS = "n_steps"  # rows committed; the commit marker a reader trusts
ATTR_LAST_STEP = "last_step"
ATTR_MODEL = "model"
ATTR_PROBES = "probes"  # list of probe records, see ProbeInfo in statscope.store
ATTR_LAYERS = "layers"  # probe names in store order (the values of the layer coordinate)
ATTR_STATS = "stats"
ATTR_SCALARS = "scalars"
ATTR_META = "meta"
ATTR_VERSIONS = "versions"
ATTR_COMMAND = "command"
ATTR_STARTED = "started"
ATTR_ENDED = "ended"
ATTR_ERROR = "error"
ATTR_PROBE_OVERHEAD = "probe_overhead"
ATTR_PROBE_SECONDS = "probe_seconds"
ATTR_NONFINITE = "nonfinite"
ATTR_RANK = "rank"
ATTR_WORLD_SIZE = "world_size"
ATTR_STD_DEFINITION = "std_definition"
ATTR_DAMAGED = "damaged"  # set by open_run(damaged="mask"): what was masked, by array and steps
ATTR_STEP_RULE = "step_rule"  # what one recorded step is: see STEP_RULES
ATTR_LEASE = "lease"  # the holder of the lease when the run was opened for writing
ATTR_WRITER_ID = "writer_id"  # the random id of that lease: one per opening (resume included)
ATTR_RESUMED_AT = "resumed_at"  # the step a resumed writer continues at (rows before it are kept)
ATTR_WINDOW_STEPS = "window_steps"  # W of the window summaries; null when none are kept
ATTR_N_WINDOWS = "n_windows"  # committed rows of the window summaries
ATTR_EVERY = "every"  # the stride between recorded steps
ATTR_NAME = "name"  # not stored: open_run sets it to the run's folder name, for messages
# not stored either: read_attrs/open_run of a distributed run's folder set them
ATTR_MERGED_LAYERS = "merged_layers"  # layers showing the merged statistics on every rank
ATTR_STALE_RANKS = "stale_ranks"  # rank stores of an earlier run (other world size), left out
ATTR_MISSING_RANKS = "missing_ranks"  # ranks of 0..world_size-1 without a store


STEP_RULES = ("optimizer", "forward", "manual")

STD_DEFINITION = "population (ddof=0), no eps"

STATUS_RUNNING = "running"
STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"
STATUSES = (STATUS_RUNNING, STATUS_COMPLETED, STATUS_FAILED)

# Keys of ATTR_META used by the built-in experiments; open_runs turns them into run coordinates.
META_BATCH_SIZE = "batch_size"
META_LR = "lr"
META_EPOCHS = "epochs"
META_SEED = "seed"
META_DATASET = "dataset"
META_NORM = "norm"
META_KEYS = (META_BATCH_SIZE, META_LR, META_EPOCHS, META_SEED, META_DATASET, META_NORM)

# Suffixes that tell apart the input and the output of one module when both are probed.
INPUT_SUFFIX = ":in"
OUTPUT_SUFFIX = ":out"

# Names of analysis results (statscope.analyses writes them, the dashboard reads them).
QUANTITY = "quantity"  # dim of layer summaries: median, q25, q75, first
QUANTITIES = ("median", "q25", "q75", "first")
BOUND = "bound"  # dim of confidence intervals: lower, estimate, upper
BOUNDS = ("lower", "estimate", "upper")
STATISTIC = "statistic"  # dim naming the statistic in tabular results (scaling slopes)
N_VALID = "n_valid"  # steps that entered a per-neuron reduction
NOTES = "notes"  # attrs key: sentences about assumptions and exclusions
WINDOW = "window"  # attrs key: the window as the user gave it, as text
