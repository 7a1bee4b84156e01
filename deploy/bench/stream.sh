#!/usr/bin/env bash
# Streaming, health-probing and start-up benchmark, each measured against a peer in the same run:
#  1. SSE: infergate-mock streaming 64 tokens; N concurrent streams direct, through infergate and
#     through nginx (proxy_buffering off). Time to first byte added, events/s while every stream
#     is open, the most streams open at once, CPU per event, RSS.
#     The three take turns for --rounds rounds (all of them up throughout); each figure is the
#     median over the rounds, RSS the peak.
#  2. Health probing: one mock process listening on 1,024 ports, probed every second by infergate
#     and by HAProxy's health checks, taking turns for --rounds rounds.
#  3. Start-up: exec to the listening line.
# Usage: deploy/bench/stream.sh [--smoke] [--rounds N] [--only 'sse probe startup']
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
build="${BUILD_DIR:-$root/build}"
smoke=0
rounds=3
parts="sse probe startup"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) smoke=1; shift ;;
    --only) parts="$2"; shift 2 ;;   # e.g. --only probe
    --rounds) rounds="$2"; shift 2 ;;
    *) echo "usage: $0 [--smoke] [--rounds N] [--only 'sse probe startup']" >&2; exit 2 ;;
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
# A field of the load client's JSON line; 0 when it is missing (a load client built before it).
json_field() { local v; v=$(sed -nE "s/.*\"$2\":\"?([^,\"}]*).*/\1/p" <<<"$1"); echo "${v:-0}"; }
hz=$(getconf CLK_TCK)

# ---- 1. SSE
if [[ $smoke -eq 1 ]]; then
  cases=("100 20 8")
  rounds=1
else
  cases=("1000 20 64" "10000 500 64")
fi
median() { sort -n | awk '{a[NR] = $1} END {print (NR ? a[int((NR + 1) / 2)] : 0)}'; }
# One run of the load client against one target; appends a line to $work/sse.txt:
# target round ttfb_p50 ttfb_p99 events/s cpu_us_per_event ok failed steady-events/s peak-open
sse_run() {
  local name=$1 round=$2 port=$3 pid=$4 before=0 after=0 out events
  [[ -n $pid ]] && before=$(cpu_ticks "$pid")
  out=$("$load" --port "$port" --streams "$streams" --tokens "$tokens" --ramp-ms "$ramp" || true)
  [[ -n $pid ]] && after=$(cpu_ticks "$pid")
  events=$(json_field "$out" events)
  echo "$name $round $(json_field "$out" ttfb_p50_us) $(json_field "$out" ttfb_p99_us) $(json_field "$out" events_per_s)" \
    "$(awk -v t=$((after - before)) -v hz="$hz" -v e="${events:-0}" 'BEGIN {printf "%.2f", (e > 0 ? t / hz * 1e6 / e : 0)}')" \
    "$(json_field "$out" ok) $(json_field "$out" failed)" \
    "$(json_field "$out" steady_events_per_s) $(json_field "$out" peak_open)" >>"$work/sse.txt"
}
# column K of target NAME's lines, one per round
sse_col() { awk -v n="$1" -v k="$2" '$1 == n {print $k}' "$work/sse.txt"; }
sse_row() {
  local name=$1 rss=$2 ok failed added=""
  ok=$(sse_col "$name" 7 | awk '{s += $1} END {print s + 0}')
  failed=$(sse_col "$name" 8 | awk '{s += $1} END {print s + 0}')
  if [[ $name != direct ]]; then
    # the first byte's extra time, round by round, against the direct run of the same round
    local diff
    diff=$(paste -d ' ' <(sse_col "$name" 3) <(sse_col direct 3) | awk '{print $1 - $2}' | median)
    added=" ($(signed "$diff"))"
  fi
  local cpu="-" steady
  [[ $name != direct ]] && cpu=$(sse_col "$name" 6 | median)
  steady=$(sse_col "$name" 9 | median)
  [[ $steady == 0 ]] && steady="-"  # streams too short to be all open for 100 ms (the smoke)
  echo "| $streams | $delay | $name | $ok / $failed | $(sse_col "$name" 10 | sort -n | head -1) |" \
    "$(sse_col "$name" 3 | median)$added | $(sse_col "$name" 4 | median) |" \
    "$steady | $(sse_col "$name" 5 | median) | $cpu | $rss |"
}
# "held at once": the fewest, over the rounds, of the most streams open together (a proxy short of
# file descriptors keeps the rest waiting to be accepted); "events/s, all open": the rate from the
# end of the ramp to the first stream's end; "events/s, whole run": all events over the run's
# length, which those waiting streams stretch.
want sse && echo "| streams | ms/token | target | ok / failed (all rounds) | held at once | TTFB p50 us (added) | TTFB p99 us | events/s, all open | events/s, whole run | CPU us/event | RSS MiB |"
want sse && echo "|---|---|---|---|---|---|---|---|---|---|---|"
want sse && for c in "${cases[@]}"; do
  read -r streams delay tokens <<<"$c"
  ramp=$((streams / 2))  # ms: connections open at ~2 per ms
  : >"$work/sse.txt"
  mport=$(free_port)
  "$mock" --port "$mport" --tokens "$tokens" --token-delay-ms "$delay" --quiet >/dev/null &
  mpid=$!
  pids+=("$mpid")
  wait_port "$mport"

  gport=$(free_port)
  "$infergate" --no-slurm --listen "127.0.0.1:$gport" --threads 1 --log-level warn --set log.access=false \
    --set health.healthy_threshold=1 --backend "http://127.0.0.1:$mport" >/dev/null 2>"$work/ig.err" &
  ig=$!
  pids+=("$ig")
  wait_port "$gport"
  for ((i = 0; i < 50; i++)); do curl -fs "http://127.0.0.1:$gport/ready" >/dev/null 2>&1 && break; sleep 0.1; done

  nport=$(free_port)
  sed -e "s|@DIR@|$work|g" -e "s|@THREADS@|1|g" -e "s|@PORT@|$nport|g" \
      -e "s|@P0@|$mport|g" -e "s|@P1@|$mport|g" -e "s|@P2@|$mport|g" -e "s|@P3@|$mport|g" \
      "$here/proxy-nginx.conf.in" > "$work/nginx.conf"
  sed -i 's/worker_connections 16384;/worker_connections 32768;/' "$work/nginx.conf"
  "$nginx_bin" -p "$work" -c "$work/nginx.conf" -g "daemon off; worker_rlimit_nofile 65536;" 2>"$work/nginx.err" &
  ng=$!
  pids+=("$ng")
  wait_port "$nport"

  for ((r = 0; r < rounds; r++)); do
    sse_run direct "$r" "$mport" ""
    sse_run infergate "$r" "$gport" "$ig"
    sse_run nginx "$r" "$nport" "$ng"
  done
  sse_row direct -
  sse_row infergate "$(rss_mib "$ig")"
  sse_row nginx "$(rss_mib "$ng")"
  kill "$ig" "$ng" "$mpid"; wait "$ig" "$ng" "$mpid" 2>/dev/null || true
done

# ---- 2. Health probing cost: 1,024 backends probed every second, infergate against HAProxy
# checking the same servers (`option httpchk`, `check inter 1s`; HAProxy opens a connection per
# check, infergate keeps one per backend). They take turns for --rounds rounds of 10 s; each
# figure is the median share of one core over the rounds.
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
{
  printf 'global\n  nbthread 1\n  maxconn 8000\n  pidfile %s/probe-haproxy.pid\n' "$work"
  printf 'defaults\n  mode http\n  timeout connect 1s\n  timeout check 1s\n  timeout client 30s\n  timeout server 30s\n'
  printf 'frontend gateway\n  bind 127.0.0.1:%s\n  default_backend inference\n' "$(free_port)"
  printf 'backend inference\n  option httpchk\n  http-check send meth GET uri /health ver HTTP/1.1 hdr Host infergate-bench\n'
  for ((i = 0; i < backends; i++)); do echo "  server s$i 127.0.0.1:$((base + i)) check inter 1s rise 1"; done
} > "$work/probe-haproxy.cfg"
seconds=$([[ $smoke -eq 1 ]] && echo 2 || echo 10)
probe_rounds=$([[ $smoke -eq 1 ]] && echo 1 || echo "$rounds")
# The share of one core a process used over `seconds`, in hundredths of a percent.
share_of() {
  local before after
  before=$(cpu_ticks "$1"); sleep "$seconds"; after=$(cpu_ticks "$1")
  echo $(((after - before) * 10000 / (hz * seconds)))
}
median() { tr ' ' '\n' | grep . | sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
pct() { awk -v v="$1" 'BEGIN {printf "%.2f", v / 100}'; }
ig_shares="" hp_shares="" healthy=0
for ((r = 0; r < probe_rounds; r++)); do
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
  ig_shares="$ig_shares $(share_of "$ig")"
  healthy=$(curl -s "http://127.0.0.1:$gport/ready" | grep -o '"healthy":[0-9]*' | cut -d: -f2)
  kill "$ig"; wait "$ig" 2>/dev/null || true

  haproxy -f "$work/probe-haproxy.cfg" -db >"$work/probe-haproxy.out" 2>&1 &
  hp=$!
  pids+=("$hp")
  sleep 3  # HAProxy spreads its first checks over the interval; a full interval and then some
  kill -0 "$hp" 2>/dev/null || { cat "$work/probe-haproxy.out" >&2; exit 1; }
  hp_shares="$hp_shares $(share_of "$hp")"
  kill "$hp"; wait "$hp" 2>/dev/null || true
done
ig_med=$(median <<<"$ig_shares")
hp_med=$(median <<<"$hp_shares")
ratio=$(awk -v a="$ig_med" -v b="$hp_med" 'BEGIN {if (b > 0) printf "%.2fx", a / b; else print "n/a"}')
echo
echo "health probing: $backends backends ($healthy healthy) probed every 1s, median of $probe_rounds round(s) of ${seconds}s:"
echo "  infergate used $(pct "$ig_med")% of one core (rounds:$(for v in $ig_shares; do printf ' %s%%' "$(pct "$v")"; done))"
echo "  HAProxy (option httpchk, check inter 1s) used $(pct "$hp_med")% (rounds:$(for v in $hp_shares; do printf ' %s%%' "$(pct "$v")"; done))"
echo "  infergate / HAProxy: $ratio"
kill "$pm"; wait "$pm" 2>/dev/null || true
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
