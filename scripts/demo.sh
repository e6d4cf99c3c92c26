#!/usr/bin/env bash
# One command: set up (first run only) and run the demo training run on the embedded defaults.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec "$root/.venv/bin/reckon" run configs/demo.toml "$@"
