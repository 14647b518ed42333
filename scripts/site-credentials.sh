#!/usr/bin/env bash
# Credentials for a federation over the network (details: docs/federation-security.md).
#   scripts/site-credentials.sh ca     DIR                      self-signed CA (skip with a hospital PKI)
#   scripts/site-credentials.sh server DIR CA_DIR HOST [HOST…]  SuperLink certificate for those names/IPs
#   scripts/site-credentials.sh site   DIR SITE                 a site's key pair: DIR/SITE.key stays at the
#                                                               site, DIR/SITE.pub goes to the coordinator
set -euo pipefail
cd "$(dirname "$0")/.."
py="${WBC_VENV:-.venv}/bin/python"
what="${1:?ca|server|site}"; shift
case "$what" in
  ca)     "$py" -m federation.credentials ca "${1:?DIR}" ;;
  server) dir="${1:?DIR}"; ca="${2:?CA_DIR}"; shift 2
          hosts=(); for h in "$@"; do hosts+=(--host "$h"); done
          [ "${#hosts[@]}" -gt 0 ] || { echo "name at least one HOST" >&2; exit 2; }
          "$py" -m federation.credentials server "$dir" --ca "$ca" "${hosts[@]}" ;;
  site)   "$py" -m federation.credentials site "${1:?DIR}" "${2:?SITE}" ;;
  *)      echo "unknown: $what (ca|server|site)" >&2; exit 2 ;;
esac
