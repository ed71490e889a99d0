#!/usr/bin/env bash
# One command from nothing to a running daemon on the embedded default model:
#   scripts/run.sh [serve flags...]      e.g. scripts/run.sh --metrics-port 9410
# API (OpenAI-compatible) on http://127.0.0.1:8000/v1, metrics on http://127.0.0.1:9410/metrics
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh cpu
# CPU build of vLLM: a small KV cache (GiB) unless the caller chose one.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec .venv/bin/vllm-exporter serve "$@"
