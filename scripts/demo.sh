#!/usr/bin/env bash
# Quick start: install into .venv, then run `gitlab-log-shipper run --once` against the bundled GitLab
# simulator and a local receiver, and show the document and the api-requests.log lines it produced.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
if ! "$VENV/bin/python" -m pip install --quiet . >"$VENV/install.log" 2>&1; then
  cat "$VENV/install.log" >&2
  echo "installing the project into $VENV failed (log above)" >&2
  exit 1
fi
exec "$VENV/bin/python" scripts/demo.py
