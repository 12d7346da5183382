"""Names of the result dimensions and variables that statscope.analyses adds to its outputs.

The store schema (:mod:`statscope.schema`) names what probes write; these name what analyses
return. They live here until the schema adopts them.
"""

QUANTITY = "quantity"  # dim of layer summaries: median, q25, q75, first
QUANTITIES = ("median", "q25", "q75", "first")
BOUND = "bound"  # dim of confidence intervals: lower, estimate, upper
BOUNDS = ("lower", "estimate", "upper")
STATISTIC = "statistic"  # dim naming the statistic in tabular results (scaling slopes)
N_VALID = "n_valid"  # steps that entered a per-neuron reduction
NOTES = "notes"  # attrs key: list of sentences about assumptions and exclusions
WINDOW = "window"  # attrs key: the window as the user gave it, as text
EN_PREFIX = "en_"
SIGMA2 = "sigma2"  # bootstrap series: bn_std² · n/(n−1), whose window mean estimates σ²
