"""Reference docs generated from the code, so names in docs cannot drift from names in code."""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

from .advice.families import ADVICE_FAMILIES
from .alerts.families import ALERT_FAMILIES
from .catalog import all_families
from .gpu import GPU_FAMILIES
from .metrics import FAMILIES

__all__ = ["all_families", "metrics_markdown", "run_docs"]

METRICS_HEADER = """# Metrics reference

Generated from the family specs (`exporter/catalog.py`) by `vllm-exporter docs metrics`
(CI fails if this file differs). Meanings, edge cases and examples: docs/metrics-guide.md.

Every engine family carries `model` (the served model name) and `engine` (vLLM's engine index,
one per data-parallel rank). Counters end in `_total`; histograms expose `_bucket`, `_sum` and
`_count`; `_info` families have the value 1 and carry their data as labels.

"across processes" says how the metrics process merges a family that several vLLM API-server
processes write (docs/topologies.md): `sum` over every process (exited ones included, so totals
never go backwards), `sum_live` over running processes, `latest` from the process that received
that engine rank's newest scheduler statistics, `max`, `state` (the most severe state a running
process reports), or `-` for the metrics process's own families.
"""


def metrics_markdown() -> str:
    lines = [METRICS_HEADER]
    sections = (("Engine, latency, configuration and exporter health", FAMILIES),
                ("GPU (NVML), see docs/gpu.md", tuple(GPU_FAMILIES)),
                ("Alerts, see docs/alerts.md", tuple(ALERT_FAMILIES)),
                ("Tuning advice, capacity forecast, energy, canary, see docs/tuning.md",
                 tuple(ADVICE_FAMILIES)))
    for title, families in sections:
        lines.append(f"\n## {title}\n")
        lines.append("| name | type | labels | meaning | source | across processes |")
        lines.append("|---|---|---|---|---|---|")
        for f in families:
            labels = ", ".join(f"`{label}`" for label in f.labels) or "-"
            text = f.help.replace("|", "\\|")
            merge = f.merge if f.where == "shard" else "-"  # the metrics process's own
            lines.append(f"| `{f.name}` | {f.kind} | {labels} | {text} | {f.source} | {merge} |")
    return "\n".join(lines) + "\n"


def run_docs(what: str, out: str | None, check: bool) -> int:
    text = metrics_markdown()
    if out is None:
        sys.stdout.write(text)
        return 0
    path = Path(out)
    if check:
        current = path.read_text() if path.exists() else ""
        if current != text:
            sys.stderr.writelines(difflib.unified_diff(
                current.splitlines(True), text.splitlines(True), str(path), "generated"))
            print(f"{path} is out of date: run vllm-exporter docs metrics --out {path}",
                  file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    return 0
