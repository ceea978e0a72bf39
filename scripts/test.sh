#!/usr/bin/env bash
# Installs the project with its test extras into .venv and runs the whole test suite.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/venv.sh
install_into_venv -e '.[test]'
exec "$VENV/bin/python" -m pytest "$@"
