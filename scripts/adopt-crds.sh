#!/usr/bin/env bash
# Hands the testrun.dev CRDs, installed another way (kubectl apply -f crds/,
# or the crds/ folder of the controller chart, which Helm never upgrades),
# to a release of the testrun-controller-crds chart, so that `helm install`
# of that chart takes them over instead of refusing them:
#
#   scripts/adopt-crds.sh RELEASE NAMESPACE
#   helm install RELEASE charts/testrun-controller-crds --namespace NAMESPACE
#
# Only labels and annotations change; no TestRun, PrebuildPreset or VmClass
# is touched. Uses the current kubectl context.
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 RELEASE NAMESPACE" >&2
  exit 2
fi
release="$1" namespace="$2"
for crd in testruns.testrun.dev prebuildpresets.testrun.dev vmclasses.testrun.dev; do
  if ! kubectl get crd "$crd" >/dev/null 2>&1; then
    echo "adopt-crds: $crd is not installed; skipping" >&2
    continue
  fi
  kubectl label crd "$crd" app.kubernetes.io/managed-by=Helm --overwrite
  kubectl annotate crd "$crd" \
    meta.helm.sh/release-name="$release" meta.helm.sh/release-namespace="$namespace" --overwrite
done
