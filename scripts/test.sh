#!/usr/bin/env bash
# Installs everything the tests need -- the monitoring servers and Chromium (the report's browser
# test) from Debian packages, and the Python dev dependencies -- then lints and type-checks the
# code (any finding fails the script) and runs the test suite on two workers (pytest-xdist; every
# test starts its own servers on free ports). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
packages="prometheus prometheus-alertmanager prometheus-pushgateway victoria-metrics influxdb openssl chromium"
binaries="prometheus promtool prometheus-alertmanager amtool prometheus-pushgateway victoria-metrics influxd openssl chromium"
missing=0
for b in $binaries; do command -v "$b" >/dev/null || missing=1; done
if [ "$missing" = 1 ]; then
  $SUDO apt-get update -qq
  # Debian may start these as services; the tests start their own on free loopback ports.
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages
fi

# Pinned: an unpinned torch can pull a multi-GB CUDA build.
python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e ".[dev]"

python3 -m ruff check privacy_callbacks tests benchmarks examples
python3 -m mypy privacy_callbacks
python3 -m pytest -q -n 2 "$@"
