#!/usr/bin/env bash
# Makes sure a Lua 5.1 interpreter (lua5.1, Debian's package) is installed:
# Argo CD runs health checks in Lua 5.1, and tests/argocd_health.rs runs the
# repository's checks in a real one.
set -euo pipefail
STATE="${TESTRUN_STATE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/testrun-controller}"
command -v lua5.1 >/dev/null 2>&1 && exit 0
mkdir -p "$STATE/logs"
log="$STATE/logs/lua-install.log"
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lua5.1; } >"$log" 2>&1; then
  echo "ensure-lua: installing lua5.1 failed (apt-get needs root); see $log" >&2
  exit 1
fi
