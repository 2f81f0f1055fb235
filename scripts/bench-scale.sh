#!/usr/bin/env bash
# The scale benchmark: N single-shard TestRuns in a burst against the local
# control plane (started here if needed), with an emulator
# (--operation-delay 100ms --boot-delay 0s) and a controller of its own,
# both release builds. Extra arguments go to `testrun-controller run`.
#
#   scripts/bench-scale.sh 1000
#   scripts/bench-scale.sh 1000 --compute-qps 1000
#
# Run it alone: kube-apiserver's request counters are shared by every client.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-1000}"
shift || true
bash scripts/control-plane.sh up >&2
exec cargo bench --locked --bench scale -- "$n" "$@"
