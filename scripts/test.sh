#!/usr/bin/env bash
# One command: set up (first run only) and run the test suite (slow and GPU tests are skipped).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
# PostgreSQL backs the store's contract tests; start the local cluster if it is down.
if command -v pg_ctlcluster >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
exec "$root/.venv/bin/python" -m pytest "$@"
