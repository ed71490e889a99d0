"""`vllm-exporter rules export`: the configured rules as Prometheus rules.

    vllm-exporter rules export [--config F] [--format prometheus|kubernetes|native]
                               [--out FILE] [--check]

`prometheus` (default) writes a rule file for Prometheus's `rule_files`; `kubernetes` a
PrometheusRule for the Prometheus Operator (both: the per-replica alerting rules, then the
fleet recording rules and fleet SLO alerts of fleet.py, in a second group); `native` the
rules in vllm-exporter's own rule format (a starting point for a custom alerts.rules_file).
With --check, nothing is written: exit 1 if --out differs from what would be written (CI
keeps deploy/ in step with the code).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

import yaml


def add_rules_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "rules", help="alert rules: export as Prometheus rules",
        epilog="examples:\n"
               "  vllm-exporter rules export --out vllm-exporter.rules.yml\n"
               "  vllm-exporter rules export --config config.yaml --format kubernetes\n"
               "  vllm-exporter rules export --out deploy/prometheus/rules/vllm-exporter.rules.yml"
               " --check",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["export"])
    p.add_argument("--config", metavar="FILE",
                   help="config file: its alerts.rules_file, thresholds and slo section")
    p.add_argument("--format", choices=["prometheus", "kubernetes", "native"],
                   default="prometheus")
    p.add_argument("--out", metavar="FILE", help="write here instead of standard output")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if --out differs from what would be written")


def export_text(config, fmt: str) -> str:
    from .defaults import default_rule_file
    from .fleet import fleet_group
    from .promql import kubernetes_prometheus_rule, prometheus_rule_file, to_yaml
    from .service import load_rules

    if fmt == "native":
        if config.alerts.rules_file:
            return Path(config.alerts.rules_file).read_text()
        raw = default_rule_file(config.alerts.thresholds, config.slo,
                                config.alerts.runbook_base_url)
        return ("# vllm-exporter's default rule pack in its own rule format (docs/alerts.md).\n"
                + yaml.safe_dump(raw, sort_keys=False, width=100))
    rules = load_rules(config)
    labels = config.alerts.exported_labels()
    fleet = [fleet_group(config.slo, config.alerts.runbook_base_url, labels)]
    if fmt == "kubernetes":
        return to_yaml(kubernetes_prometheus_rule(rules, labels=labels, extra_groups=fleet))
    return to_yaml(prometheus_rule_file(rules, labels, fleet))


def run_rules(args: argparse.Namespace) -> int:
    from ..config import load_config

    # ConfigError: the CLI prints it and exits 2. What only the serving host has (the model
    # directory, the environment behind ${VAR} labels, the web config file) is not needed to
    # write the rules, which carry only the constant labels.
    config = load_config(args.config, host_checks=False)
    text = export_text(config, args.format)
    if args.out is None:
        if args.check:
            print("--check needs --out", file=sys.stderr)
            return 2
        sys.stdout.write(text)
        return 0
    path = Path(args.out)
    if args.check:
        current = path.read_text() if path.exists() else ""
        if current != text:
            sys.stderr.writelines(difflib.unified_diff(
                current.splitlines(True), text.splitlines(True), str(path), "generated"))
            print(f"{path} is out of date: run vllm-exporter rules export "
                  f"--format {args.format} --out {path}", file=sys.stderr)
            return 1
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return 0
