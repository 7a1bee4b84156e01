#!/usr/bin/env bash
# Runs the README's demo command the way a user does and checks it: deploy/demo.sh comes up on
# free ports, all four mock servers become healthy, a chat completion and a stream are served,
# and stopping the demo (SIGTERM, as Ctrl-C does) lets a stream in flight finish, then leaves no
# process behind. Used by CI; exits non-zero with a one-line reason on any failure.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d /tmp/infergate-demo-smoke.XXXXXX)"
demo=""
cleanup() {
  if [[ -n "$demo" ]] && kill -0 "$demo" 2>/dev/null; then
    kill -KILL -- -"$demo" 2>/dev/null || true
    pkill -KILL -f "infergate-mock --host 127.0.10.[23] --port ($base_port|$((base_port + 1))) " 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "demo smoke: $*" >&2; tail -n 20 "$work/demo.err" >&2 || true; exit 1; }

port_free() { ! (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
# Ports below the kernel's ephemeral range, which outgoing connections (of the tests that ran
# before, say) take their local ports from: a port nothing listens on may still be bound there.
read -r ephemeral_low _ < /proc/sys/net/ipv4/ip_local_port_range
span=$(( ephemeral_low - 1 - 20000 ))
(( span > 1000 )) || span=1000
pick() {  # a random free port from 20000 up to the ephemeral range, with the next one free too
  local p i
  for ((i = 0; i < 200; i++)); do
    p=$((20000 + (RANDOM * 32768 + RANDOM) % span))
    if port_free "$1" "$p" && port_free "$1" $((p + 1)); then echo "$p"; return; fi
  done
  echo "demo smoke: no free port" >&2; exit 1
}
gateway_port=$(pick 127.0.0.1)
base_port=$(pick 127.0.10.2)
url="http://127.0.0.1:$gateway_port"
chat='{"model":"demo-model","messages":[{"role":"user","content":"Hello"}]}'
stream='{"model":"demo-model","stream":true,"messages":[{"role":"user","content":"Hello"}]}'

# Its own session, as a terminal's foreground job is its own process group: the kill in the
# cleanup can reach everything the demo started.
INFERGATE_DEMO_PORT=$gateway_port INFERGATE_DEMO_BACKEND_PORT=$base_port DEMO_TOKEN_DELAY_MS=50 \
  setsid "$root/deploy/demo.sh" >"$work/demo.out" 2>"$work/demo.err" &
demo=$!

for ((i = 0; i < 1200; i++)); do  # the first run builds: up to 2 minutes
  [[ "$(curl -s "$url/ready" 2>/dev/null)" == *'"healthy":4'* ]] && break
  kill -0 "$demo" 2>/dev/null || fail "deploy/demo.sh exited before it was ready"
  sleep 0.1
done
[[ "$(curl -s "$url/ready")" == *'"healthy":4'* ]] || fail "4 healthy backends not reached: $(curl -s "$url/ready")"
grep -q "infergate listening on $url" "$work/demo.out" || fail "no listening line for $url on stdout"
grep -q "base_url=\"$url/v1\"" "$work/demo.err" || fail "the banner does not give base_url $url/v1"

answer=$(curl -s "$url/v1/chat/completions" -H 'Content-Type: application/json' -d "$chat")
[[ "$answer" == *'"object":"chat.completion"'* ]] || fail "chat completion: $answer"

# A stream in flight when the demo is stopped: 24 tokens at 50 ms, so it runs about 1.2 s.
curl -sN "$url/v1/chat/completions" -H 'Content-Type: application/json' -d "$stream" >"$work/stream.out" &
client=$!
for ((i = 0; i < 50; i++)); do
  [[ -s "$work/stream.out" ]] && break
  sleep 0.02
done
[[ -s "$work/stream.out" ]] || fail "the stream sent nothing within 1 s"
kill -TERM "$demo"
for ((i = 0; i < 300; i++)); do
  kill -0 "$demo" 2>/dev/null || break
  sleep 0.1
done
kill -0 "$demo" 2>/dev/null && fail "deploy/demo.sh still running 30 s after SIGTERM"
wait "$client" || fail "the stream in flight was cut when the demo stopped (curl exit $?)"
grep -q '^data: \[DONE\]' "$work/stream.out" || fail "the stream in flight did not end with [DONE]"
left=$(pgrep -f "infergate --listen 127.0.0.1:$gateway_port|infergate-mock --host 127.0.10.[23] --port ($base_port|$((base_port + 1))) " || true)
[[ -z "$left" ]] || fail "processes left after the demo stopped: $left"
grep -q "demo: stopped the gateway and the mocks" "$work/demo.err" || fail "no closing line"
! grep -q "unknown variable" "$work/demo.err" || fail "the gateway warned about the demo's environment: $(grep "unknown variable" "$work/demo.err")"
demo=""
echo "demo smoke: ok (gateway on $gateway_port, mocks from $base_port; a stream in flight finished on SIGTERM)"
