"""What a piece of advice is, and the bounded vocabularies its labels take.

Every value that becomes a label of vllm_advice_info comes from a fixed set here, so the
family's cardinality is bounded by rules x parameters per model; numbers (the current and the
suggested value) go into gauges, never into labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The engine settings (and the one deployment knob, replicas) that advice may name.
PARAMETERS = ("max_num_seqs", "gpu_memory_utilization", "max_num_batched_tokens",
              "enable_prefix_caching", "enable_chunked_prefill", "num_speculative_tokens",
              "replicas")
ACTIONS = ("increase", "decrease", "enable", "disable")
EFFECTS = ("up", "down", "none", "mixed")  # expected direction on throughput, latency, memory
CONFIDENCES = ("low", "medium", "high")


@dataclass(frozen=True)
class Evidence:
    """One measured value that a piece of advice rests on."""

    series: str  # the family (or an expression over families) it was read from
    value: float
    window_seconds: float  # 0: an instant value (the latest reading)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        out = {"series": self.series, "value": _number(self.value),
               "window_seconds": round(self.window_seconds, 1)}
        if self.note:
            out["note"] = self.note
        return out


@dataclass(frozen=True)
class Advice:
    model: str
    rule: str
    parameter: str
    action: str
    current: float | None  # None where the engine does not report the setting
    suggested: float
    throughput: str
    latency: str
    memory: str
    confidence: str
    summary: str
    evidence: tuple[Evidence, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for value, allowed in ((self.parameter, PARAMETERS), (self.action, ACTIONS),
                               (self.throughput, EFFECTS), (self.latency, EFFECTS),
                               (self.memory, EFFECTS), (self.confidence, CONFIDENCES)):
            if value not in allowed:
                raise ValueError(f"advice of rule {self.rule}: {value!r} is not one of {allowed}")

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "rule": self.rule, "parameter": self.parameter,
                "action": self.action, "current": _number(self.current),
                "suggested": _number(self.suggested),
                "effect": {"throughput": self.throughput, "latency": self.latency,
                           "memory": self.memory},
                "confidence": self.confidence, "summary": self.summary,
                "evidence": [e.to_json() for e in self.evidence]}


def _number(value: float | None) -> float | int | None:
    if value is None:
        return None
    if float(value).is_integer():
        return int(value)
    return round(float(value), 6)
