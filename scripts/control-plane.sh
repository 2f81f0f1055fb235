#!/usr/bin/env bash
# Local Kubernetes control plane on loopback: etcd (Debian's etcd-server) and
# kube-apiserver built from Debian bookworm's `kubernetes` source package with
# Go 1.15 from Debian bullseye. Everything lives in a state folder outside the
# repository; the built binary is cached there.
#
#   scripts/control-plane.sh up     start (idempotent); builds kube-apiserver once
#   scripts/control-plane.sh down   stop the processes this script started
#   scripts/control-plane.sh env    print `export KUBECONFIG=...`
#   scripts/control-plane.sh status say what runs
#   scripts/control-plane.sh restart-apiserver   stop and start kube-apiserver only
#
# Settings (environment):
#   TESTRUN_STATE_DIR        state folder (default ${XDG_CACHE_HOME:-$HOME/.cache}/testrun-controller)
#   TESTRUN_APISERVER_PORT   kube-apiserver secure port (default 16443)
#   TESTRUN_ETCD_PORT        etcd client port (default 12379; peer port is +1)
#   TESTRUN_BIN_DIR          where the built kube-apiserver is kept (default STATE/bin),
#                            so a second control plane can share one build
set -euo pipefail

STATE="${TESTRUN_STATE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/testrun-controller}"
APISERVER_PORT="${TESTRUN_APISERVER_PORT:-16443}"
ETCD_PORT="${TESTRUN_ETCD_PORT:-12379}"
ETCD_PEER_PORT=$((ETCD_PORT + 1))
K8S_VERSION_WANTED="1.20"

BIN="${TESTRUN_BIN_DIR:-$STATE/bin}"
RUN="$STATE/run"
LOGS="$STATE/logs"
PKI="$STATE/pki"
BUILD="$STATE/build"
KUBECONFIG_FILE="$STATE/kubeconfig"

step() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'control-plane: %s\n' "$1" >&2
  if [ -n "${2:-}" ] && [ -f "$2" ]; then
    printf 'control-plane: last lines of %s:\n' "$2" >&2
    tail -n 25 "$2" | sed 's/^/    /' >&2
  fi
  exit 1
}

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  step "installing Debian packages: ${missing[*]}"
  local log="$LOGS/apt-install.log"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    die "step 'install packages' failed (${missing[*]})" "$log"
  fi
}

ensure_packages() {
  mkdir -p "$BIN" "$RUN" "$LOGS" "$PKI"
  # etcd-server: etcd 3.4; openssl: keys; curl: readiness; dpkg-dev: apt-get source;
  # rsync, jq, make: the Kubernetes build.
  apt_install etcd-server openssl curl ca-certificates dpkg-dev rsync jq make
  if ! command -v kubectl >/dev/null 2>&1; then
    apt_install kubernetes-client
  fi
}

# apt-get with its own source list and package lists inside the state folder,
# so the system's sources are never changed.
private_apt() {
  local name="$1"; shift
  local dir="$BUILD/apt-$name"
  mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
  apt-get -q \
    -o Dir::Etc::SourceList="$dir/sources.list" \
    -o Dir::Etc::SourceParts=/nonexistent \
    -o Dir::State::Lists="$dir/lists" \
    -o Dir::Cache="$dir/cache" \
    -o Dir::State::status=/var/lib/dpkg/status \
    -o APT::Get::AllowUnauthenticated=false \
    -o APT::Sandbox::User=root \
    "$@"
}

ensure_go115() {
  GOROOT_115="$BUILD/go1.15/usr/lib/go-1.15"
  [ -x "$GOROOT_115/bin/go" ] && return 0
  step "fetching Go 1.15 from Debian bullseye"
  local dir="$BUILD/apt-bullseye" log="$LOGS/go115.log"
  mkdir -p "$dir" "$BUILD/go1.15" "$BUILD/debs"
  echo "deb http://deb.debian.org/debian bullseye main" >"$dir/sources.list"
  {
    private_apt bullseye update &&
      (cd "$BUILD/debs" && private_apt bullseye download golang-1.15-go golang-1.15-src) &&
      for deb in "$BUILD"/debs/golang-1.15-*.deb; do dpkg -x "$deb" "$BUILD/go1.15"; done
  } >"$log" 2>&1 || die "step 'fetch Go 1.15' failed" "$log"
  [ -x "$GOROOT_115/bin/go" ] || die "step 'fetch Go 1.15' produced no $GOROOT_115/bin/go" "$log"
}

ensure_kubernetes_source() {
  K8S_SRC=$(find "$BUILD/src" -maxdepth 1 -type d -name 'kubernetes-*' 2>/dev/null | head -n 1 || true)
  [ -n "$K8S_SRC" ] && [ -f "$K8S_SRC/Makefile" ] && return 0
  step "fetching Debian bookworm's kubernetes source package (vendored, ~1 GB unpacked)"
  local dir="$BUILD/apt-bookworm-src" log="$LOGS/kubernetes-source.log"
  mkdir -p "$dir" "$BUILD/src"
  echo "deb-src http://deb.debian.org/debian bookworm main" >"$dir/sources.list"
  {
    private_apt bookworm-src update &&
      (cd "$BUILD/src" && private_apt bookworm-src source kubernetes)
  } >"$log" 2>&1 || die "step 'fetch kubernetes source' failed" "$log"
  K8S_SRC=$(find "$BUILD/src" -maxdepth 1 -type d -name 'kubernetes-*' | head -n 1)
  [ -n "$K8S_SRC" ] || die "step 'fetch kubernetes source' left no source tree" "$log"
}

ensure_apiserver() {
  [ -x "$BIN/kube-apiserver" ] && return 0
  ensure_go115
  ensure_kubernetes_source
  step "building kube-apiserver with Go 1.15 (about 6 minutes on 2 cores; cached afterwards)"
  local log="$LOGS/kube-apiserver-build.log" gopath="$BUILD/gopath"
  mkdir -p "$gopath/src/k8s.io"
  ln -sfn "$K8S_SRC" "$gopath/src/k8s.io/kubernetes"
  local version
  version=$(cd "$K8S_SRC" && dpkg-parsechangelog -SVersion | sed -E 's/^([0-9.]+).*\+really([0-9.]+).*/\2/; s/^([0-9]+\.[0-9]+\.[0-9]+).*/\1/')
  (
    cd "$gopath/src/k8s.io/kubernetes"
    export GOROOT="$GOROOT_115" GOPATH="$gopath" PATH="$GOROOT_115/bin:$PATH"
    export CGO_ENABLED=0 GO111MODULE=off GOFLAGS=-mod=vendor GOCACHE="$BUILD/gocache"
    export KUBE_GIT_VERSION="v$version" KUBE_GIT_TREE_STATE=clean KUBE_GIT_COMMIT=debian
    make WHAT=cmd/kube-apiserver
  ) >"$log" 2>&1 || die "step 'build kube-apiserver' failed" "$log"
  local out
  out=$(find "$K8S_SRC/_output" -type f -name kube-apiserver -perm -u+x | head -n 1)
  [ -n "$out" ] || die "step 'build kube-apiserver' produced no binary" "$log"
  install -m 0755 "$out" "$BIN/kube-apiserver"
  "$BIN/kube-apiserver" --version >>"$log" 2>&1 || die "built kube-apiserver does not run" "$log"
}

alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

start_etcd() {
  alive etcd && return 0
  step "starting etcd on 127.0.0.1:$ETCD_PORT"
  local log="$LOGS/etcd.log"
  mkdir -p "$STATE/etcd"
  setsid etcd --name testrun-controller --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "testrun-controller=http://127.0.0.1:$ETCD_PEER_PORT" \
    --quota-backend-bytes 2147483648 --auto-compaction-retention 1h \
    >"$log" 2>&1 </dev/null 9>&- &
  echo $! >"$RUN/etcd.pid"
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$ETCD_PORT/health" 2>/dev/null | grep -q '"health":"true"' && return 0
    alive etcd || die "etcd exited while starting" "$log"
    sleep 0.1
  done
  die "etcd did not become healthy within 10 s" "$log"
}

ensure_pki() {
  [ -f "$PKI/sa.key" ] || openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  [ -f "$PKI/sa.pub" ] || openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  if [ ! -f "$PKI/tokens.csv" ]; then
    local token
    token=$(openssl rand -hex 24)
    echo "$token,admin,admin,system:masters" >"$PKI/tokens.csv"
    chmod 600 "$PKI/tokens.csv"
  fi
}

admin_token() { cut -d, -f1 "$PKI/tokens.csv"; }

apiserver_ready() {
  curl -ksS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $(admin_token)" \
    "https://127.0.0.1:$APISERVER_PORT/readyz" 2>/dev/null | grep -q '^200$'
}

start_apiserver() {
  if alive kube-apiserver && apiserver_ready; then return 0; fi
  local log="$LOGS/kube-apiserver.log"
  if ! alive kube-apiserver; then
    step "starting kube-apiserver on https://127.0.0.1:$APISERVER_PORT"
    setsid "$BIN/kube-apiserver" \
      --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
      --cert-dir "$PKI/serving" \
      --secure-port "$APISERVER_PORT" \
      --bind-address 127.0.0.1 \
      --advertise-address 127.0.0.1 \
      --token-auth-file "$PKI/tokens.csv" \
      --authorization-mode RBAC \
      --service-account-key-file "$PKI/sa.pub" \
      --service-account-signing-key-file "$PKI/sa.key" \
      --service-account-issuer https://kubernetes.default.svc \
      --service-cluster-ip-range 10.0.0.0/24 \
      --disable-admission-plugins ServiceAccount \
      --endpoint-reconciler-type none \
      >"$log" 2>&1 </dev/null 9>&- &
    echo $! >"$RUN/kube-apiserver.pid"
  fi
  for _ in $(seq 1 600); do
    apiserver_ready && return 0
    alive kube-apiserver || die "kube-apiserver exited while starting" "$log"
    sleep 0.1
  done
  die "kube-apiserver did not answer /readyz with 200 within 60 s" "$log"
}

write_kubeconfig() {
  local ca="$PKI/serving/apiserver.crt"
  [ -f "$ca" ] || die "kube-apiserver wrote no serving certificate at $ca" "$LOGS/kube-apiserver.log"
  # The file holds the serving certificate followed by the self-signed CA that issued it.
  local ca_data
  ca_data=$(awk '/BEGIN CERTIFICATE/{n++} n==2' "$ca" | base64 -w0)
  [ -n "$ca_data" ] || ca_data=$(base64 -w0 <"$ca")
  local tmp="$KUBECONFIG_FILE.tmp"
  cat >"$tmp" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: testrun-local
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $ca_data
users:
- name: admin
  user:
    token: $(admin_token)
contexts:
- name: testrun-local
  context:
    cluster: testrun-local
    user: admin
    namespace: default
current-context: testrun-local
KCFG
  chmod 600 "$tmp"
  mv "$tmp" "$KUBECONFIG_FILE"
}

up() {
  local t0=$SECONDS
  mkdir -p "$STATE"
  # Parallel test processes call `up` at once; one does the work, the others wait.
  exec 9>"$STATE/up.lock"
  flock 9
  ensure_packages
  ensure_apiserver
  ensure_pki
  start_etcd
  start_apiserver
  write_kubeconfig
  step "control plane ready in $((SECONDS - t0)) s; kubeconfig: $KUBECONFIG_FILE"
}

stop_one() {
  local name="$1" pidfile="$RUN/$1.pid"
  [ -f "$pidfile" ] || return 0
  local pid
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    step "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

down() {
  stop_one kube-apiserver
  stop_one etcd
}

status() {
  for name in etcd kube-apiserver; do
    if alive "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"; else echo "$name: stopped"; fi
  done
  if alive kube-apiserver && apiserver_ready; then echo "kube-apiserver: ready at https://127.0.0.1:$APISERVER_PORT"; fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) echo "export KUBECONFIG=$KUBECONFIG_FILE" ;;
  status) status ;;
  reset) down; rm -rf "$STATE/etcd"; step "etcd data removed" ;;
  restart-apiserver) stop_one kube-apiserver; up ;;
  -h|--help|help|"")
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    [ -n "${1:-}" ] || exit 2 ;;
  *) echo "control-plane: unknown command '$1' (use up, down, env, status, reset, restart-apiserver)" >&2; exit 2 ;;
esac
