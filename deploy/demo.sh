#!/usr/bin/env bash
# The demo: builds infergate and the mock, starts 4 mock inference servers laid out like a Slurm job
# (1 training node + 2 inference nodes x 2 servers, INFER_TP=4 on 8 GPUs), and serves in the
# foreground. Ctrl-C stops everything: the gateway first (it lets requests in flight finish, up
# to timeouts.shutdown; a second Ctrl-C cuts that short), then the mocks.
#
# Nodes are loopback addresses (127.0.10.1-3), so the nodelist is "127.0.10.[1-3]" and no
# /etc/hosts change is needed. Ports are chosen free at start.
# Environment: INFERGATE_DEMO_PORT (gateway port; unset: 8080 or the next free one; set: that
#                port or an error),
#              INFERGATE_DEMO_BACKEND_PORT (the mocks' first port: they take the first free pair
#                from it, default 9000),
#              DEMO_TOKEN_DELAY_MS (mock per-token delay, default 20).
# The simulated allocation replaces an enclosing one (run inside salloc or srun, the SLURM_*
# variables are not passed on; nor are INFERGATE_SLURM_*, INFERGATE_BACKENDS, INFERGATE_CONFIG):
# see deploy/demo-allocation.sh.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${BUILD_DIR:-$root/build}"

port_free() {  # host port
  ! (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}
pick_base_port() {  # first port P >= $1 with P and P+1 free on both inference nodes
  local p
  for ((p = $1; p < 65535; p += 2)); do
    if port_free 127.0.10.2 $p && port_free 127.0.10.2 $((p + 1)) &&
       port_free 127.0.10.3 $p && port_free 127.0.10.3 $((p + 1)); then
      echo $p; return
    fi
  done
  echo "demo: no free port pair found" >&2; exit 1
}
# The variables are checked before the build, which takes minutes the first time: a typo or a
# taken port is told at once.
for var in INFERGATE_DEMO_PORT INFERGATE_DEMO_BACKEND_PORT; do
  value="${!var:-}"
  if [[ -n "$value" ]] && ! [[ "$value" =~ ^[0-9]+$ && "$value" -ge 1 && "$value" -le 65534 ]]; then
    echo "demo: $var='$value' is not a port (1-65534)" >&2; exit 2
  fi
done
if [[ -n "${INFERGATE_DEMO_PORT:-}" ]]; then
  port_free 127.0.0.1 "$INFERGATE_DEMO_PORT" ||
    { echo "demo: INFERGATE_DEMO_PORT=$INFERGATE_DEMO_PORT: something already listens on 127.0.0.1:$INFERGATE_DEMO_PORT" >&2; exit 1; }
fi

# Only what the demo runs (deploy/test.sh builds everything).
BUILD_TARGETS="infergate infergate-mock" "$root/deploy/build.sh" >&2

# Free ports are picked once the build is done, so that they are still free when the demo starts.
if [[ -n "${INFERGATE_DEMO_PORT:-}" ]]; then
  gateway_port=$INFERGATE_DEMO_PORT
else
  gateway_port=8080
  while ! port_free 127.0.0.1 "$gateway_port"; do gateway_port=$((gateway_port + 1)); done
fi
base_port=$(pick_base_port "${INFERGATE_DEMO_BACKEND_PORT:-9000}")

# The gateway and the mocks run in sessions of their own, so a Ctrl-C in the terminal reaches
# only this script, which stops them in order: the gateway first (one signal: it drains), the
# mocks once it is gone (they serve the requests it lets finish).
mocks=()
gateway=""
again=0
cleanup() {
  trap - EXIT
  trap 'again=1' INT TERM
  if [[ -n "$gateway" ]] && kill -0 "$gateway" 2>/dev/null; then
    echo "demo: stopping the gateway (requests in flight finish; Ctrl-C again to cut them)" >&2
    kill -TERM "$gateway" 2>/dev/null || true
    while kill -0 "$gateway" 2>/dev/null; do
      wait "$gateway" 2>/dev/null || true
      if [[ $again -eq 1 ]]; then again=2; kill -TERM "$gateway" 2>/dev/null || true; fi
    done
  fi
  for pid in "${mocks[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "demo: stopped the gateway and the mocks" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for node in 2 3; do
  for slot in 0 1; do
    setsid "$build/tests/mock/infergate-mock" --host "127.0.10.$node" --port $((base_port + slot)) \
      --model demo-model --tokens 24 --token-delay-ms "${DEMO_TOKEN_DELAY_MS:-20}" --quiet >/dev/null &
    mocks+=($!)
  done
done

source "$root/deploy/demo-allocation.sh"
demo_allocation "$base_port"
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
# stops the gateway (gracefully) and then the mocks.
setsid "$build/gateway/infergate" --listen "127.0.0.1:$gateway_port" "$@" &
gateway=$!
status=0
wait "$gateway" || status=$?
gateway=""
exit "$status"
