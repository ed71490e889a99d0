"""Every metric family the exporter exposes, in one place: engine and exporter families
(metrics.py), GPU families (the gpu package), alerting families (alerts/families.py),
advice families (advice/families.py).

Docs, rule validation and the names-are-contracts tests read the union from here.
"""

from __future__ import annotations

from .advice.families import ADVICE_FAMILIES, CONDITIONAL_ADVICE_FAMILIES
from .alerts.families import ALERT_FAMILIES
from .families import FamilySpec
from .gpu import GPU_FAMILIES
from .metrics import CONDITIONAL_FAMILIES, FAMILIES


def all_families() -> tuple[FamilySpec, ...]:
    return (*FAMILIES, *GPU_FAMILIES, *ALERT_FAMILIES, *ADVICE_FAMILIES)


def families_by_name() -> dict[str, FamilySpec]:
    return {family.name: family for family in all_families()}


def sample_names(names) -> frozenset[str]:
    """The sample names of these families as a query reads them (a histogram's _bucket, _sum,
    _count; a counter's name with _total)."""
    wanted = set(names)
    out = set()
    for family in all_families():
        if family.name in wanted:
            suffixes = ("_bucket", "_sum", "_count") if family.kind == "histogram" else ("",)
            out.update(family.name + suffix for suffix in suffixes)
    return frozenset(out)


def conditional_samples() -> frozenset[str]:
    """Sample names of the families present only with a feature switched on
    (metrics.CONDITIONAL_FAMILIES, advice's CONDITIONAL_ADVICE_FAMILIES): what a query may
    find absent on an engine without the feature."""
    return sample_names(CONDITIONAL_FAMILIES.keys() | CONDITIONAL_ADVICE_FAMILIES.keys())
