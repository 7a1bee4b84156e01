#!/usr/bin/env bash
# Streaming, health-probing and start-up benchmark, each measured against a peer in the same run:
#  1. SSE: infergate-mock streaming 64 tokens; N concurrent streams direct, through infergate and
#     through nginx (proxy_buffering off). Time to first byte added, events/s, CPU per event, RSS.
#  2. Health probing: one mock process listening on 1,024 ports, probed every second.
#  3. Start-up: exec to the listening line.
# Usage: deploy/bench/stream.sh [--smoke]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
build="${BUILD_DIR:-$root/build}"
smoke=0
parts="sse probe startup"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) smoke=1; shift ;;
    --only) parts="$2"; shift 2 ;;   # e.g. --only probe
    *) echo "usage: $0 [--smoke] [--only 'sse probe startup']" >&2; exit 2 ;;
  esac
done
want() { [[ " $parts " == *" $1 "* ]]; }

"$root/deploy/install-deps.sh" --bench
[[ -x "$build/tests/bench/infergate-sse-load" ]] || "$root/deploy/build.sh" >&2
infergate="$build/gateway/infergate"
mock="$build/tests/mock/infergate-mock"
load="$build/tests/bench/infergate-sse-load"
nginx_bin="$(command -v nginx || echo /usr/sbin/nginx)"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
ulimit -Hn 131072 2>/dev/null && ulimit -n 131072 2>/dev/null || true

work="$(mktemp -d /tmp/infergate-stream-bench.XXXXXX)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
  local p
  # Below the ephemeral range: no clash with outgoing connections' local ports.
  while :; do p=$((20000 + RANDOM % 12000)); port_in_use "$p" || { echo "$p"; return; }; done
}
wait_port() {
  local i
  for ((i = 0; i < 100; i++)); do port_in_use "$1" && return 0; sleep 0.1; done
  echo "bench: nothing listens on port $1" >&2; return 1
}
tree_pids() { echo "$1"; ps -o pid= --ppid "$1" 2>/dev/null | tr -d ' '; }
cpu_ticks() {
  local total=0 pid
  for pid in $(tree_pids "$1"); do
    [[ -r /proc/$pid/stat ]] && total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
  done
  echo "$total"
}
rss_mib() {
  local total=0 pid v
  for pid in $(tree_pids "$1"); do
    v=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    total=$((total + ${v:-0}))
  done
  echo $((total / 1024))
}
signed() { if (($1 >= 0)); then echo "+$1"; else echo "$1"; fi; }
json_field() { sed -E "s/.*\"$2\":\"?([^,\"}]*).*/\1/" <<<"$1"; }
hz=$(getconf CLK_TCK)

# ---- 1. SSE
if [[ $smoke -eq 1 ]]; then
  cases=("100 20 8")
else
  cases=("1000 20 64" "10000 500 64")
fi
want sse && echo "| streams | ms/token | target | ok / failed | TTFB p50 us (added) | events/s | CPU us/event | RSS MiB |"
want sse && echo "|---|---|---|---|---|---|---|---|"
want sse && for c in "${cases[@]}"; do
  read -r streams delay tokens <<<"$c"
  mport=$(free_port)
  "$mock" --port "$mport" --tokens "$tokens" --token-delay-ms "$delay" --quiet >/dev/null &
  mpid=$!
  pids+=("$mpid")
  wait_port "$mport"
  ramp=$((streams / 2))  # ms: connections open at ~2 per ms
  direct=$("$load" --port "$mport" --streams "$streams" --tokens "$tokens" --ramp-ms "$ramp" || true)
  direct_ttfb=$(json_field "$direct" ttfb_p50_us)
  echo "| $streams | $delay | direct | $(json_field "$direct" ok) / $(json_field "$direct" failed) | $direct_ttfb | $(json_field "$direct" events_per_s) | - | - |"

  gport=$(free_port)
  "$infergate" --no-slurm --listen "127.0.0.1:$gport" --threads 1 --log-level warn --set log.access=false \
    --set health.healthy_threshold=1 --backend "http://127.0.0.1:$mport" >/dev/null 2>"$work/ig.err" &
  ig=$!
  pids+=("$ig")
  wait_port "$gport"
  for ((i = 0; i < 50; i++)); do curl -fs "http://127.0.0.1:$gport/ready" >/dev/null 2>&1 && break; sleep 0.1; done
  before=$(cpu_ticks "$ig")
  out=$("$load" --port "$gport" --streams "$streams" --tokens "$tokens" --ramp-ms "$ramp" || true)
  after=$(cpu_ticks "$ig")
  events=$(json_field "$out" events)
  cpu_us=$(awk -v t=$((after - before)) -v hz="$hz" -v e="$events" 'BEGIN {printf "%.2f", (e > 0 ? t / hz * 1e6 / e : 0)}')
  ttfb=$(json_field "$out" ttfb_p50_us)
  echo "| $streams | $delay | infergate | $(json_field "$out" ok) / $(json_field "$out" failed) | $ttfb ($(signed $((ttfb - direct_ttfb)))) | $(json_field "$out" events_per_s) | $cpu_us | $(rss_mib "$ig") |"
  kill "$ig"; wait "$ig" 2>/dev/null || true

  nport=$(free_port)
  sed -e "s|@DIR@|$work|g" -e "s|@THREADS@|1|g" -e "s|@PORT@|$nport|g" \
      -e "s|@P0@|$mport|g" -e "s|@P1@|$mport|g" -e "s|@P2@|$mport|g" -e "s|@P3@|$mport|g" \
      "$here/proxy-nginx.conf.in" > "$work/nginx.conf"
  sed -i 's/worker_connections 16384;/worker_connections 32768;/' "$work/nginx.conf"
  "$nginx_bin" -p "$work" -c "$work/nginx.conf" -g "daemon off; worker_rlimit_nofile 65536;" 2>"$work/nginx.err" &
  ng=$!
  pids+=("$ng")
  wait_port "$nport"
  before=$(cpu_ticks "$ng")
  out=$("$load" --port "$nport" --streams "$streams" --tokens "$tokens" --ramp-ms "$ramp" || true)
  after=$(cpu_ticks "$ng")
  events=$(json_field "$out" events)
  cpu_us=$(awk -v t=$((after - before)) -v hz="$hz" -v e="$events" 'BEGIN {printf "%.2f", (e > 0 ? t / hz * 1e6 / e : 0)}')
  ttfb=$(json_field "$out" ttfb_p50_us)
  echo "| $streams | $delay | nginx | $(json_field "$out" ok) / $(json_field "$out" failed) | $ttfb ($(signed $((ttfb - direct_ttfb)))) | $(json_field "$out" events_per_s) | $cpu_us | $(rss_mib "$ng") |"
  kill "$ng" "$mpid"; wait "$ng" "$mpid" 2>/dev/null || true
done

# ---- 2. Health probing cost: 1,024 backends probed every second
probe_bench() {
backends=1024
[[ $smoke -eq 1 ]] && backends=64
for ((try = 0; try < 20; try++)); do
  base=$((20000 + (RANDOM % 100) * 100))
  "$mock" --port "$base" --port-count "$backends" --quiet >"$work/probe-mock.out" 2>&1 &
  pm=$!
  sleep 0.3
  if kill -0 "$pm" 2>/dev/null; then break; fi
done
pids+=("$pm")
{
  echo "backends:"
  for ((i = 0; i < backends; i++)); do echo "  - http://127.0.0.1:$((base + i))"; done
} > "$work/probe.yaml"
gport=$(free_port)
"$infergate" --config "$work/probe.yaml" --no-slurm --listen "127.0.0.1:$gport" --threads 1 --log-level warn \
  --set health.interval=1s --set health.healthy_threshold=1 >/dev/null 2>"$work/probe-ig.err" &
ig=$!
pids+=("$ig")
wait_port "$gport" || { cat "$work/probe-ig.err" >&2; exit 1; }
for ((i = 0; i < 100; i++)); do
  [[ "$(curl -s "http://127.0.0.1:$gport/ready" | grep -o '"healthy":[0-9]*' | cut -d: -f2)" == "$backends" ]] && break
  sleep 0.1
done
seconds=$([[ $smoke -eq 1 ]] && echo 2 || echo 10)
before=$(cpu_ticks "$ig"); sleep "$seconds"; after=$(cpu_ticks "$ig")
share=$(awk -v t=$((after - before)) -v hz="$hz" -v s="$seconds" 'BEGIN {printf "%.2f", t / hz / s * 100}')
healthy=$(curl -s "http://127.0.0.1:$gport/ready" | grep -o '"healthy":[0-9]*' | cut -d: -f2)
echo
echo "health probing: $backends backends ($healthy healthy) probed every 1s: infergate used ${share}% of one core"
kill "$ig" "$pm"; wait "$ig" "$pm" 2>/dev/null || true
}
want probe && probe_bench

# ---- 3. Start-up: exec to the listening line (the socket is open when it is printed)
want startup || exit 0
total=0
runs=5
for ((i = 0; i < runs; i++)); do
  start=$(date +%s%N)
  coproc IG { exec "$infergate" --no-slurm --listen 127.0.0.1:0 --threads 1 --log-level error 2>/dev/null; }
  read -r line <&"${IG[0]}"
  end=$(date +%s%N)
  kill "$IG_PID"; wait "$IG_PID" 2>/dev/null || true
  total=$((total + (end - start) / 1000))
done
echo "start-up: exec to listening socket: $((total / runs)) us (mean of $runs; the line read: ${line})"
