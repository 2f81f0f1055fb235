#!/usr/bin/env bash
# Builds the controller as one statically linked, stripped executable (it
# runs on any Linux image: the controller's own on `scratch`, and every VM's
# agent, which is the same file) and a CycloneDX SBOM of its crate graph.
#
#   scripts/build-static.sh OUT_DIR
#
# Writes OUT_DIR/testrun-controller, OUT_DIR/sbom/testrun-controller.cdx.json
# and OUT_DIR/etc/ssl/certs/ca-certificates.crt (this machine's CA bundle,
# Debian's ca-certificates: Compute Engine's TLS needs one, an empty image
# has none).
# TESTRUN_IMAGE_PROFILE picks the cargo profile (default: release).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/build-static.sh OUT_DIR}
profile=${TESTRUN_IMAGE_PROFILE:-release}
STATE="${TESTRUN_STATE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/testrun-controller}"
step() { printf '==> %s\n' "$*" >&2; }

host=$(rustc -vV | sed -n 's/^host: //p')
case "$host" in
*-linux-gnu) ;;
*) echo "build-static.sh: only *-linux-gnu hosts are supported (this is $host)" >&2; exit 1 ;;
esac
# glibc linked statically: crt-static on an explicit --target, so build
# scripts and proc macros stay dynamic. glibc's built-in files and dns
# lookups work without NSS modules, which an empty image lacks. getrandom
# finds the getrandom(2) wrapper with dlsym, which a static executable
# cannot: it is told to call it directly, not to fall back to /dev/urandom.
target_var="CARGO_TARGET_$(echo "$host" | tr 'a-z-' 'A-Z_')_RUSTFLAGS"
profile_var="CARGO_PROFILE_$(echo "$profile" | tr 'a-z-' 'A-Z_')_STRIP"
# RUSTFLAGS would override the target's flags: the build would not be static.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS
step "building a static $profile executable for $host"
env "$target_var=-C target-feature=+crt-static --cfg getrandom_backend=\"linux_getrandom\"" "$profile_var=symbols" \
  cargo build --locked --profile "$profile" --target "$host" --bin testrun-controller
dir=$profile
[ "$profile" = dev ] && dir=debug
binary="target/$host/$dir/testrun-controller"
[ -x "$binary" ] || { echo "build-static.sh: $binary was not built" >&2; exit 1; }
if readelf -lW "$binary" | grep -q INTERP; then
  echo "build-static.sh: $binary is linked dynamically (it has a program interpreter)" >&2
  exit 1
fi

tools="$STATE/tools"
if ! PATH="$tools/bin:$PATH" cargo cyclonedx --help >/dev/null 2>&1; then
  step "installing cargo-cyclonedx into $tools"
  cargo install --locked --quiet --root "$tools" cargo-cyclonedx@0.5.9
fi
step "writing the SBOM"
mkdir -p "$out/sbom"
# cargo-cyclonedx writes next to Cargo.toml; the name is its own.
PATH="$tools/bin:$PATH" cargo cyclonedx --quiet --format json --spec-version 1.5 --target "$host" \
  --no-build-deps --override-filename testrun-controller.cdx
mv -f testrun-controller.cdx.json "$out/sbom/testrun-controller.cdx.json"
install -m 0755 "$binary" "$out/testrun-controller"
bundle=/etc/ssl/certs/ca-certificates.crt
[ -s "$bundle" ] || { echo "build-static.sh: $bundle is missing; install Debian's ca-certificates" >&2; exit 1; }
install -D -m 0644 "$bundle" "$out/etc/ssl/certs/ca-certificates.crt"
step "wrote $out/testrun-controller, its SBOM and a CA bundle"
