#!/usr/bin/env bash
# One command from nothing to the whole test suite (what .ci/run calls):
#   scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh cpu
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
# Generated artefacts must match the code that generates them.
.venv/bin/vllm-exporter docs metrics --out docs/metrics.md --check
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
