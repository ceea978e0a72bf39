# Sourced by the scripts: makes $VENV (default .venv) and installs the project into it with pip.
# Usage: install_into_venv PIP_INSTALL_ARGS...
VENV="${VENV:-.venv}"
install_into_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  if ! "$VENV/bin/python" -m pip install --quiet "$@" >"$VENV/install.log" 2>&1; then
    cat "$VENV/install.log" >&2
    echo "installing the project into $VENV failed (log above)" >&2
    exit 1
  fi
}
