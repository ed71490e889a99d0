"""Every metric family the exporter exposes, in one place: engine and exporter families
(metrics.py), GPU families (the gpu package), alerting families (alerts/families.py),
advice families (advice/families.py).

Docs, rule validation and the names-are-contracts tests read the union from here.
"""

from __future__ import annotations

from .advice.families import ADVICE_FAMILIES
from .alerts.families import ALERT_FAMILIES
from .families import FamilySpec
from .gpu import GPU_FAMILIES
from .metrics import FAMILIES


def all_families() -> tuple[FamilySpec, ...]:
    return (*FAMILIES, *GPU_FAMILIES, *ALERT_FAMILIES, *ADVICE_FAMILIES)


def families_by_name() -> dict[str, FamilySpec]:
    return {family.name: family for family in all_families()}
