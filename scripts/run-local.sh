#!/usr/bin/env bash
# Runs testrun-controller's system on this machine: the local control plane
# (etcd + kube-apiserver on loopback), the CRDs, and the example objects.
#
#   scripts/run-local.sh        set everything up (idempotent)
#   scripts/run-local.sh down   stop the local control plane
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '==> %s\n' "$*" >&2; }

if [ "${1:-}" = down ]; then
  exec bash scripts/control-plane.sh down
fi

bash scripts/control-plane.sh up
eval "$(bash scripts/control-plane.sh env)"

step "building testrun-controller"
cargo build --locked --quiet

step "installing the CRDs"
kubectl apply -f crds/
kubectl wait --for condition=Established --timeout 60s \
  crd/testruns.testrun.dev crd/prebuildpresets.testrun.dev

step "applying the examples"
kubectl apply -f examples/

kubectl get testruns,prebuildpresets
cat <<MSG

The local control plane is up. To use it from your shell:
  $(bash scripts/control-plane.sh env)
  kubectl get tr,pbp
  kubectl explain testrun.spec
Stop it with: scripts/run-local.sh down
MSG
