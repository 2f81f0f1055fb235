#!/usr/bin/env bash
# Runs every test: unit and property tests of the pure logic, and
# integration tests against a real local control plane (etcd +
# kube-apiserver from scripts/control-plane.sh, started here if needed).
#
#   scripts/test.sh [extra cargo-nextest arguments, e.g. a test name filter]
#
# Set TESTRUN_SKIP_LINT=1 to skip the rustfmt and clippy checks.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '==> %s\n' "$*" >&2; }

command -v cargo >/dev/null 2>&1 || {
  echo "test.sh: cargo not found; install Rust (rustc 1.91 or newer, Cargo.toml's rust-version) with rustup" >&2
  exit 1
}
if ! cargo nextest --version >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

step "starting the local control plane"
bash scripts/control-plane.sh up
step "making sure Helm is available"
bash scripts/ensure-helm.sh
step "making sure Lua 5.1 is available (Argo CD health checks)"
bash scripts/ensure-lua.sh
step "making sure promtool is available (alert rule tests)"
bash scripts/ensure-promtool.sh >/dev/null

if [ "${TESTRUN_SKIP_LINT:-0}" != 1 ]; then
  if cargo fmt --version >/dev/null 2>&1; then
    step "checking formatting"
    cargo fmt --check
  fi
  if cargo clippy --version >/dev/null 2>&1; then
    step "running clippy"
    cargo clippy --all-targets --locked -- -D warnings
  fi
fi

step "building the controller image (tests/image.rs runs it)"
TESTRUN_IMAGE_PROFILE=${TESTRUN_IMAGE_PROFILE:-image-test} bash scripts/image.sh

step "running tests"
profile=default
[ -n "${CI:-}" ] && profile=ci
cargo nextest run --locked --profile "$profile" "$@"
