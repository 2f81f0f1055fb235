#!/usr/bin/env bash
# Prints the path of a promtool binary (Prometheus's rule checker and rule
# unit-test runner), taking it once from Debian's prometheus package into the
# state folder when none is on PATH. The package is unpacked, not installed:
# no Prometheus service is set up.
set -euo pipefail
STATE="${TESTRUN_STATE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/testrun-controller}"
BIN="${TESTRUN_BIN_DIR:-$STATE/bin}"

if command -v promtool >/dev/null 2>&1; then
  command -v promtool
  exit 0
fi
if [ -x "$BIN/promtool" ]; then
  echo "$BIN/promtool"
  exit 0
fi
mkdir -p "$BIN" "$STATE/logs"
log="$STATE/logs/promtool-fetch.log"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fetch() { (cd "$work" && apt-get download prometheus); }
if ! fetch >>"$log" 2>&1; then
  # No package lists yet on a fresh machine.
  { apt-get update -qq && fetch; } >>"$log" 2>&1 \
    || { echo "ensure-promtool: downloading Debian's prometheus package failed; see $log" >&2; exit 1; }
fi
dpkg -x "$work"/prometheus_*.deb "$work/root" >>"$log" 2>&1 \
  || { echo "ensure-promtool: unpacking the prometheus package failed; see $log" >&2; exit 1; }
install -m 0755 "$work/root/usr/bin/promtool" "$BIN/promtool"
"$BIN/promtool" --version >>"$log" 2>&1 || { echo "ensure-promtool: the unpacked promtool does not run; see $log" >&2; exit 1; }
echo "$BIN/promtool"
