#!/usr/bin/env bash
# Debian's chromium for the end-to-end review test (Playwright drives it via executable_path; no browser
# is ever downloaded). Idempotent and quiet when it is there; as root it installs it with apt-get,
# otherwise it says what is missing and the browser test skips with that reason.
set -uo pipefail
for path in "${WBC_CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-headless-shell; do
  if [ -n "$path" ] && [ -x "$path" ]; then
    exit 0
  fi
done
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "[browser] installing chromium (Debian package)"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; then
    apt-get update -q >/dev/null 2>&1 || true
    apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
      || echo "[browser] warning: could not install chromium; the browser test will skip" >&2
  fi
else
  echo "[browser] warning: chromium missing and cannot apt-get here; the browser test will skip" >&2
fi
exit 0
