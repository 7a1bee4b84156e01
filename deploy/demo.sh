#!/usr/bin/env bash
# The demo: builds infergate, starts 4 mock inference servers laid out like a Slurm job
# (1 training node + 2 inference nodes x 2 servers, INFER_TP=4 on 8 GPUs), and serves in the
# foreground. Ctrl-C stops everything.
#
# Nodes are loopback addresses (127.0.10.1-3), so the nodelist is "127.0.10.[1-3]" and no
# /etc/hosts change is needed. Ports are chosen free at start.
# Environment: INFERGATE_DEMO_PORT (gateway port, default 8080 or the next free one),
#              DEMO_TOKEN_DELAY_MS (mock per-token delay, default 20).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${BUILD_DIR:-$root/build}"
"$root/deploy/build.sh" >&2

port_free() {  # host port
  ! (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}
pick_base_port() {  # first port P >= 9000 with P and P+1 free on both inference nodes
  local p
  for ((p = 9000; p < 60000; p += 2)); do
    if port_free 127.0.10.2 $p && port_free 127.0.10.2 $((p + 1)) &&
       port_free 127.0.10.3 $p && port_free 127.0.10.3 $((p + 1)); then
      echo $p; return
    fi
  done
  echo "demo: no free port pair found" >&2; exit 1
}
gateway_port="${INFERGATE_DEMO_PORT:-8080}"
while ! port_free 127.0.0.1 "$gateway_port"; do gateway_port=$((gateway_port + 1)); done
base_port=$(pick_base_port)

pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "demo: stopped the gateway and the mocks" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for node in 2 3; do
  for slot in 0 1; do
    "$build/tests/mock/infergate-mock" --host "127.0.10.$node" --port $((base_port + slot)) \
      --model demo-model --tokens 24 --token-delay-ms "${DEMO_TOKEN_DELAY_MS:-20}" --quiet >/dev/null &
    pids+=($!)
  done
done

export SLURM_JOB_NODELIST="127.0.10.[1-3]" NUM_TRAINING_NODES=1 INFER_TP=4 SLURM_GPUS_ON_NODE=8
export INFERGATE_SLURM_BASE_PORT=$base_port
cat >&2 <<MSG

infergate demo: mocks on 127.0.10.2-3 ports $base_port-$((base_port + 1)) as Slurm job nodes $SLURM_JOB_NODELIST
Backends:
$("$build/gateway/infergate" discover | sed 's/^/  /')

Try:
  curl -s http://127.0.0.1:$gateway_port/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model":"demo-model","messages":[{"role":"user","content":"Hello"}]}'
  curl -sN http://127.0.0.1:$gateway_port/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model":"demo-model","stream":true,"messages":[{"role":"user","content":"Hello"}]}'
OpenAI client: base_url="http://127.0.0.1:$gateway_port/v1", api_key="unused"
Ctrl-C stops the gateway and the mocks.

MSG
# In the background so that Ctrl-C or SIGTERM reaches this script's trap at once; the trap
# stops the gateway (gracefully) and the mocks.
"$build/gateway/infergate" --listen "127.0.0.1:$gateway_port" "$@" &
pids=("$!" "${pids[@]}")
wait "${pids[0]}"
