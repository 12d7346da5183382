"""The registry of norm names users pass around (``--norm hn``) and the factory behind it."""

import re

from statscope.errors import StatscopeError
from statscope.nn.layers import HeteroNorm, SwitchableNorm

__all__ = ["NORM_NAMES", "make_norm"]

NORM_NAMES = ("bn", "in", "ln", "gn", "en", "en_g8", "sn", "hn", "hn_g32", "bn+en", "bn+in+ln")
"""Names :func:`make_norm` knows; a norm with a grouped set also takes a ``_g<n>`` suffix."""

# name -> (class, mean sets, std sets, default groups); groups None: the norm has no grouped set.
_FAMILY = {
    "bn": (HeteroNorm, "batch", "batch", None),
    "in": (HeteroNorm, "instance", "instance", None),
    "ln": (HeteroNorm, "layer", "layer", None),
    "gn": (HeteroNorm, "group", "group", 32),
    "en": (HeteroNorm, "extended", "extended", 1),
    "hn": (HeteroNorm, "batch", "extended", 1),
    "sn": (SwitchableNorm, ("batch", "instance", "layer"), ("batch", "instance", "layer"), None),
    "bn+en": (SwitchableNorm, ("batch",), ("batch", "extended"), 1),
    "bn+in+ln": (SwitchableNorm, ("batch",), ("batch", "instance", "layer"), None),
}

_NAME = re.compile(r"^(?P<base>[a-z+]+?)(?:_g(?P<groups>\d+))?$")


def _known():
    return ", ".join(NORM_NAMES) + " (a _g<n> suffix sets the groups of gn, en, hn, bn+en)"


def check_norm_name(name) -> None:
    """Raise :class:`StatscopeError` unless :func:`make_norm` knows ``name`` (before a run
    spends time loading its data)."""
    _parse(name)


def _parse(name):
    key = name.strip().lower() if isinstance(name, str) else name
    match = _NAME.match(key) if isinstance(key, str) else None
    if match is None or match["base"] not in _FAMILY:
        raise StatscopeError(f"norm={name!r}: unknown norm; known: {_known()}")
    if match["groups"] is not None and _FAMILY[match["base"]][3] is None:
        raise StatscopeError(f"norm={name!r}: {match['base']} has no channel groups; "
                             f"known: {_known()}")
    return key, match


def make_norm(name, num_features, **kw):
    """Build the normalization layer called ``name``.

    ========== ============================ ====================== =================
    name       mean set                     std set                groups (default)
    ========== ============================ ====================== =================
    bn         batch                        batch                  —
    in         instance                     instance               —
    ln         layer                        layer                  —
    gn         group                        group                  32
    en         extended                     extended               1 (whole layer)
    hn         batch                        extended               1
    sn         batch+instance+layer (mix)   batch+instance+layer   —
    bn+en      batch                        batch+extended (mix)   1
    bn+in+ln   batch                        batch+instance+layer   —
    ========== ============================ ====================== =================

    Args:
        name: one of :data:`NORM_NAMES`, case-insensitive; gn, en, hn and bn+en accept a
            ``_g<n>`` suffix for n channel groups ("en_g8", "hn_g32", "gn_g16").
        num_features: C, the channel dim (dim 1) of the input.
        **kw: passed to :class:`HeteroNorm` or :class:`SwitchableNorm` (eps, momentum, affine,
            track_running_stats, std_center, groups, device, dtype).

    Returns:
        nn.Module: a layer with ``norm_name`` set to the lower-case name.

    Raises:
        StatscopeError: unknown name, groups given twice or not dividing ``num_features``.

    Example:
        >>> make_norm("HN_G4", 16)
        HeteroNorm(16, mean=batch, std=extended, std_groups=4, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, std_center='own')
    """
    key, match = _parse(name)
    cls, mean_sets, std_sets, default_groups = _FAMILY[match["base"]]
    kw = dict(kw)
    if match["groups"] is not None:
        if "groups" in kw and kw["groups"] != int(match["groups"]):
            raise StatscopeError(f"groups={kw['groups']!r}: norm={name!r} already sets "
                                 f"{match['groups']} groups")
        kw["groups"] = int(match["groups"])
    elif default_groups is not None:
        kw.setdefault("groups", default_groups)
    if cls is HeteroNorm:
        layer = HeteroNorm(num_features, mean_sets, std_sets, **kw)
    else:
        layer = SwitchableNorm(num_features, mean_sets, std_sets, **kw)
    layer.norm_name = key
    return layer
