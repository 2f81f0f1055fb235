#!/usr/bin/env bash
# Builds the controller image without a daemon: the Dockerfile's final stage,
# fed the static executable, SBOM and CA bundle built here
# (scripts/build-static.sh) instead of its build stage, so it is the same
# image `docker build .` makes. Written as an OCI archive:
#
#   target/testrun-controller-image.tar   (tag testrun-controller:VERSION)
#   target/testrun-controller.cdx.json    (the SBOM, also at /sbom/ in the image)
#
# Load it with e.g. `skopeo copy oci-archive:target/testrun-controller-image.tar
# docker://REGISTRY/testrun-controller:VERSION`. TESTRUN_IMAGE_PROFILE picks
# the cargo profile (default: release).
set -euo pipefail
cd "$(dirname "$0")/.."
STATE="${TESTRUN_STATE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/testrun-controller}"
step() { printf '==> %s\n' "$*" >&2; }

bash scripts/ensure-image-tools.sh
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# The commit's time, so the same commit makes the same image.
epoch=$(git log -1 --format=%ct 2>/dev/null || echo 0)

rm -rf target/image
bash scripts/build-static.sh target/image

storage=(--root "$STATE/containers/storage" --runroot "$STATE/containers/run" --storage-driver vfs)
tag="localhost/testrun-controller:build-$$"
step "building the image"
# The final stage, from the last `FROM scratch`, copying from target/image/.
containerfile=target/Containerfile.local
awk '/^FROM scratch$/ { stage = "" } { stage = stage $0 "\n" } END { printf "%s", stage }' Dockerfile |
  sed 's#COPY --from=build /out/#COPY target/image/#' >"$containerfile"
grep -q '^COPY target/image/testrun-controller ' "$containerfile" ||
  { echo "image.sh: the Dockerfile's final stage does not copy the executable from the build stage" >&2; exit 1; }
buildah "${storage[@]}" bud --quiet --isolation chroot --timestamp "$epoch" \
  --build-arg VERSION="$version" --build-arg REVISION="$revision" \
  -f "$containerfile" -t "$tag" . >/dev/null
out=target/testrun-controller-image.tar
rm -f "$out"
buildah "${storage[@]}" push --quiet "$tag" "oci-archive:$out:testrun-controller:$version"
buildah "${storage[@]}" rmi "$tag" >/dev/null
cp target/image/sbom/testrun-controller.cdx.json target/testrun-controller.cdx.json
step "wrote $out ($(du -h "$out" | cut -f1)), tag testrun-controller:$version, and target/testrun-controller.cdx.json"
