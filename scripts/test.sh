#!/usr/bin/env bash
# Install everything the tests need (Debian packages included, when missing) and run the whole suite:
# ruff, mypy --strict, pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v dbus-daemon >/dev/null || need+=(dbus-daemon)
command -v systemd-analyze >/dev/null || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  echo "test: installing Debian packages: ${need[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

scripts/setup.sh --dev

echo "== ruff" >&2
.venv/bin/ruff check gateway sensors firmware_sim dashboard tests benchmarks
echo "== mypy --strict" >&2
.venv/bin/mypy
echo "== pytest" >&2
exec .venv/bin/python -m pytest "$@"
