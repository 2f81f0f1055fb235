#!/usr/bin/env bash
# Makes sure buildah (builds images without a daemon or network) and umoci
# (unpacks them) are installed, from Debian's packages, and the CA bundle the
# image carries (ca-certificates).
set -euo pipefail
STATE="${TESTRUN_STATE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/testrun-controller}"
missing=()
command -v buildah >/dev/null 2>&1 || missing+=(buildah)
command -v umoci >/dev/null 2>&1 || missing+=(umoci)
[ -s /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
[ ${#missing[@]} = 0 ] && exit 0
mkdir -p "$STATE/logs"
log="$STATE/logs/image-tools-install.log"
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  echo "ensure-image-tools: installing ${missing[*]} failed (apt-get needs root); see $log" >&2
  exit 1
fi
