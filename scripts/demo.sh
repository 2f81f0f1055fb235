#!/usr/bin/env bash
# Runs the whole system on this machine: the local control plane (etcd +
# kube-apiserver on loopback), the compute emulator, the controller, and the
# example TestRun, which runs its two shards on emulated VMs.
#
#   scripts/demo.sh          set everything up and wait for the example to finish
#   scripts/demo.sh down     stop the controller, the emulator and the control plane
#
# Settings: TESTRUN_EMULATOR_PORT (default 8089), TESTRUN_AGENT_PORT (8090),
# and those of scripts/control-plane.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE="${TESTRUN_STATE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/testrun-controller}"
EMULATOR_PORT="${TESTRUN_EMULATOR_PORT:-8089}"
AGENT_PORT="${TESTRUN_AGENT_PORT:-8090}"
RUN="$STATE/run"
LOGS="$STATE/logs"
BIN="$PWD/target/debug/testrun-controller"

step() { printf '==> %s\n' "$*" >&2; }
alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }
stop() {
  if alive "$1"; then
    step "stopping $1"
    kill "$(cat "$RUN/$1.pid")" 2>/dev/null || true
    sleep 1
  fi
  rm -f "$RUN/$1.pid"
}

if [ "${1:-}" = down ]; then
  stop controller
  stop emulator
  exec bash scripts/control-plane.sh down
fi

bash scripts/control-plane.sh up
eval "$(bash scripts/control-plane.sh env)"
mkdir -p "$RUN" "$LOGS"

step "building testrun-controller"
cargo build --locked --quiet

step "installing the CRDs"
kubectl apply -f crds/ >/dev/null
kubectl wait --for condition=Established --timeout 60s crd/testruns.testrun.dev crd/prebuildpresets.testrun.dev >/dev/null

if ! alive emulator; then
  step "starting the compute emulator on 127.0.0.1:$EMULATOR_PORT (log: $LOGS/emulator.log)"
  setsid "$BIN" emulator --listen "127.0.0.1:$EMULATOR_PORT" --work-dir "$STATE/emulator" >"$LOGS/emulator.log" 2>&1 </dev/null &
  echo $! >"$RUN/emulator.pid"
fi
if ! alive controller; then
  step "starting the controller, agent API on 127.0.0.1:$AGENT_PORT (log: $LOGS/controller.log)"
  setsid "$BIN" run --compute-endpoint "http://127.0.0.1:$EMULATOR_PORT" --agent-listen "127.0.0.1:$AGENT_PORT" \
    --watch-namespace default --namespace default \
    >"$LOGS/controller.log" 2>&1 </dev/null &
  echo $! >"$RUN/controller.pid"
fi
sleep 1
alive emulator || { tail -n 20 "$LOGS/emulator.log" >&2; echo "demo: the emulator exited" >&2; exit 1; }
alive controller || { tail -n 20 "$LOGS/controller.log" >&2; echo "demo: the controller exited" >&2; exit 1; }

# Waits until TestRun $1 finishes, the way CI would (README, "TestRun"):
# Reconciling=False at either end, then Complete says whether it passed.
wait_run() {
  kubectl wait "tr/$1" --for=condition=Reconciling=False --timeout=120s >/dev/null || true
  kubectl get tr "$1" -o wide
  kubectl get tr "$1" -o jsonpath='{range .status.shards[*]}shard {.index} attempt {.attempt} on {.instance} in {.zone}: {.phase}, exit {.result.exitCode}{"\n"}{.result.outputTail}{end}'
  [ "$(kubectl get tr "$1" -o jsonpath='{.status.conditions[?(@.type=="Complete")].status}')" = True ]
}

step "running examples/testrun.yaml"
kubectl delete -f examples/testrun.yaml -f examples/testrun-from-pool.yaml --ignore-not-found --wait=true >/dev/null
kubectl apply -f examples/testrun.yaml
wait_run example-tests

step "filling the warm pool of examples/prebuildpreset.yaml"
kubectl apply -f examples/prebuildpreset.yaml
kubectl wait --for condition=Ready --timeout 120s pbp/example-pool
kubectl get pbp example-pool

step "running examples/testrun-from-pool.yaml on warm VMs"
kubectl apply -f examples/testrun-from-pool.yaml
wait_run example-from-pool
kubectl get pbp example-pool

cat <<MSG

The system runs locally. From your shell:
  $(bash scripts/control-plane.sh env)
  kubectl get tr -o yaml            # status, shard results and output tails
  kubectl get events                # VM created, claimed, lease issued, result accepted, VM deleted
  kubectl get pbp                   # the warm pool
  curl localhost:9090/metrics       # the controller's metrics
  curl localhost:$EMULATOR_PORT/emulator/v1/instances   # the emulator's VMs
Stop everything with: scripts/demo.sh down
MSG
