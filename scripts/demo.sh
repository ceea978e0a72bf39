#!/usr/bin/env bash
# Quick start: install into .venv, then run `gitlab-log-shipper run --once` against the bundled GitLab
# simulator and a local receiver, and show the document and the api-requests.log lines it produced.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/venv.sh
# The sim extra: the bundled simulator then serves GitLab's GraphQL API too (graphql-core).
install_into_venv '.[sim]'
exec "$VENV/bin/python" scripts/demo.py
