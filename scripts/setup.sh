#!/usr/bin/env bash
# Create .venv with Python >= 3.11 and install Visita into it (editable).
#   scripts/setup.sh         runtime only
#   scripts/setup.sh --dev   with the test and check tools
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null; then
  echo "setup: $PY not found; install Python 3.11 or newer (Debian: apt-get install python3)" >&2
  exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: $("$PY" --version) is too old; Visita needs Python 3.11 or newer" >&2
  exit 1
fi
# Debian splits venv/ensurepip into python3-venv.
if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
  echo "setup: installing python3-venv (Debian)" >&2
  as_root apt-get update -qq
  as_root apt-get install -y -qq python3-venv
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
