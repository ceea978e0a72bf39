#!/usr/bin/env bash
# Installs the project with its test extras into .venv and runs the whole test suite.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
if ! "$VENV/bin/python" -m pip install --quiet -e '.[test]' >"$VENV/install.log" 2>&1; then
  cat "$VENV/install.log" >&2
  echo "installing the project into $VENV failed (log above)" >&2
  exit 1
fi
exec "$VENV/bin/python" -m pytest "$@"
