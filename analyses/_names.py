"""Names statscope.analyses uses: the public result names come from :mod:`statscope.schema`;
the two below are internal to the analyses."""

from statscope.schema import (BOUND, BOUNDS, N_VALID, NOTES, QUANTITIES, QUANTITY,  # noqa: F401
                              STATISTIC, WINDOW)

EN_PREFIX = "en_"
SIGMA2 = "sigma2"  # bootstrap series: bn_std² · n/(n−1), whose window mean estimates σ²
