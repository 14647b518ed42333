#!/usr/bin/env bash
# README command 2 (and CI's): set up the virtual environment and test tools, then run the tests.
#   scripts/test.sh                 the default suite (under 15 minutes on a 2-core machine)
#   scripts/test.sh -m slow         the slow suites, on purpose
#   scripts/test.sh -m "slow or not slow"   everything
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
for extra in scripts/install-test-tools.sh scripts/install-browser.sh scripts/ensure-services.sh; do
  if [ -x "$extra" ]; then "$extra"; fi
done
mkdir -p test-artifacts
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec "${WBC_VENV:-.venv}/bin/python" -m pytest "$@"
