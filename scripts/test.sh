#!/usr/bin/env bash
# One command from nothing to the whole test suite (what .ci/run calls):
#   scripts/test.sh [pytest args...]
#   scripts/test.sh --fast [pytest args...]   # everything that needs no vLLM engine
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh cpu
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
# Generated artefacts must match the code that generates them.
cli=.venv/bin/vllm-exporter
$cli docs metrics --out docs/metrics.md --check
$cli rules export --out deploy/prometheus/rules/vllm-exporter.rules.yml --check
$cli rules export --format kubernetes --out deploy/kubernetes/prometheusrule.yaml --check
$cli dashboards --out grafana/dashboards --configmap deploy/kubernetes/configmap-dashboards.yaml --check
if [[ "${1:-}" == "--fast" ]]; then
    shift
    exec .venv/bin/python -m pytest -q -p no:cacheprovider -m "not engine" "$@"
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
