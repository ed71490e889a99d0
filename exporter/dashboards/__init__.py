"""Grafana dashboards generated from code (`vllm-exporter dashboards`), committed as JSON under
grafana/dashboards/ and as a ConfigMap under deploy/kubernetes/. docs/dashboards.md explains the
choice of plain dicts over grafana-foundation-sdk."""

from __future__ import annotations

import json
from typing import Any

from . import engine, fleet, gpu, health, overview
from .grafana import Dashboard, render

BUILDERS = (overview.dashboard, engine.dashboard, gpu.dashboard, health.dashboard,
            fleet.dashboard)


def dashboards() -> list[Dashboard]:
    return [build() for build in BUILDERS]


def generate() -> dict[str, dict[str, Any]]:
    """file name -> dashboard JSON (as dicts), each linking to the others."""
    all_dashboards = dashboards()
    return {d.file_name: render(d, [o for o in all_dashboards if o is not d])
            for d in all_dashboards}


def to_text(dashboard: dict[str, Any]) -> str:
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"
