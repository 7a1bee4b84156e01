#!/usr/bin/env bash
# Peer benchmark: the same fast backends (nginx returning a fixed chat completion on 4 ports)
# reached directly, through infergate, through nginx and through HAProxy, in one run on one
# machine, with wrk. Prints a Markdown table with ratios, since absolute numbers are noisy.
#
# Usage: deploy/bench/run.sh [--smoke] [--duration SECONDS] [--threads "1 2"] [--conns "1 64 256"]
#   --smoke: 1 s per case, c=64, 1 thread; fails if any proxy returns errors (used by CI).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
build="${BUILD_DIR:-$root/build}"
duration=5
threads_list="1 2"
conns_list="1 64 256"
large_body=32768
smoke=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) smoke=1; duration=1; threads_list="1"; conns_list="64"; shift ;;
    --duration) duration="$2"; shift 2 ;;
    --threads) threads_list="$2"; shift 2 ;;
    --conns) conns_list="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

"$root/deploy/install-deps.sh" --bench
[[ -x "$build/gateway/infergate" ]] || "$root/deploy/build.sh" >&2
infergate="$build/gateway/infergate"
nginx_bin="$(command -v nginx || echo /usr/sbin/nginx)"
haproxy_bin="$(command -v haproxy || echo /usr/sbin/haproxy)"

work="$(mktemp -d /tmp/infergate-bench.XXXXXX)"
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
  while :; do
    p=$((20000 + RANDOM % 12000))  # below the ephemeral range: no clash with outgoing connections
    port_in_use "$p" || { echo "$p"; return; }
  done
}
wait_port() {  # port, deadline in tenths of a second
  local i
  for ((i = 0; i < ${2:-100}; i++)); do
    port_in_use "$1" && return 0
    sleep 0.1
  done
  echo "bench: nothing listens on port $1" >&2
  return 1
}
render() {  # template output THREADS PORT
  sed -e "s|@DIR@|$work|g" -e "s|@THREADS@|$3|g" -e "s|@PORT@|$4|g" \
      -e "s|@P0@|${bp[0]}|g" -e "s|@P1@|${bp[1]}|g" -e "s|@P2@|${bp[2]}|g" -e "s|@P3@|${bp[3]}|g" \
      "$here/$1" > "$2"
}
# CPU ticks (user+system) of a process and its children, and their summed peak RSS in KiB.
tree_pids() { echo "$1"; ps -o pid= --ppid "$1" 2>/dev/null | tr -d ' '; }
cpu_ticks() {
  local total=0 pid
  for pid in $(tree_pids "$1"); do
    [[ -r /proc/$pid/stat ]] || continue
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
  done
  echo "$total"
}
peak_rss_kib() {
  local total=0 pid v
  for pid in $(tree_pids "$1"); do
    v=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}
to_us() {  # wrk latency like 1.23ms / 850.00us / 1.02s -> microseconds
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u);
    if (u == "us") n = n; else if (u == "ms") n = n * 1000; else if (u == "s") n = n * 1000000;
    printf "%.0f", n }'
}

started=0
for ((try = 0; try < 3 && !started; try++)); do
  bp=()
  for i in 0 1 2 3; do bp+=("$(free_port)"); done
  render backend-nginx.conf.in "$work/backend.conf" 2 0
  "$nginx_bin" -p "$work" -c "$work/backend.conf" -g "daemon off;" 2>"$work/backend.stderr" &
  pids+=($!)
  started=1
  for p in "${bp[@]}"; do wait_port "$p" || { started=0; cat "$work/backend.stderr" >&2; break; }; done
done
[[ $started -eq 1 ]] || { echo "bench: the backend nginx did not start" >&2; exit 1; }

results="$work/results.tsv"
: > "$results"
# run_case NAME PID PORT CONNS BODY_BYTES THREADS
run_case() {
  local name="$1" pid="$2" port="$3" conns="$4" body="$5" threads="$6"
  local before after out rps p50 p99 non2xx reqs ticks cpu_per_k rss hz
  hz=$(getconf CLK_TCK)
  before=$( [[ "$pid" == - ]] && echo 0 || cpu_ticks "$pid")
  out=$(BODY_BYTES="$body" wrk -t1 -c"$conns" -d"${duration}s" --latency -s "$here/chat.lua" \
        "http://127.0.0.1:$port" 2>&1)
  after=$( [[ "$pid" == - ]] && echo 0 || cpu_ticks "$pid")
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  p50=$(to_us "$(awk '$1 == "50%" {print $2}' <<<"$out")")
  p99=$(to_us "$(awk '$1 == "99%" {print $2}' <<<"$out")")
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
  errors=$(awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10}' <<<"$out")
  if [[ "$pid" == - || -z "$reqs" || "$reqs" == 0 ]]; then
    cpu_per_k="-"
    rss="-"
  else
    cpu_per_k=$(awk -v t=$((after - before)) -v hz="$hz" -v n="$reqs" 'BEGIN {printf "%.3f", t / hz / n * 1000}')
    rss=$(( $(peak_rss_kib "$pid") / 1024 ))
  fi
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$name" "$threads" "$conns" "$body" \
    "${rps:-0}" "${p50:-0}" "${p99:-0}" "$cpu_per_k" "$rss" "${non2xx:-0}" "${errors:-0}" >> "$results"
  echo "  $name threads=$threads c=$conns body=$body: ${rps:-0} req/s, p50 ${p50:-?}us, p99 ${p99:-?}us, non-2xx ${non2xx:-0}" >&2
}

bodies=(0)
[[ $smoke -eq 0 ]] && bodies+=("$large_body")

echo "== direct" >&2
for body in "${bodies[@]}"; do
  for c in $conns_list; do run_case direct - "${bp[0]}" "$c" "$body" -; done
done

for threads in $threads_list; do
  # infergate
  port=$(free_port)
  "$infergate" --no-slurm --listen "127.0.0.1:$port" --threads "$threads" --log-level warn \
    --set log.access=false --set health.healthy_threshold=1 --set health.interval=1s \
    $(for p in "${bp[@]}"; do echo --backend "http://127.0.0.1:$p"; done) >"$work/ig.out" 2>"$work/ig.err" &
  ig=$!
  pids+=("$ig")
  wait_port "$port"
  for ((i = 0; i < 100; i++)); do
    curl -fs "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && [[ $(curl -s "http://127.0.0.1:$port/ready" | grep -o '"healthy":[0-9]*' | cut -d: -f2) == 4 ]] && break
    sleep 0.1
  done
  echo "== infergate threads=$threads" >&2
  for body in "${bodies[@]}"; do
    for c in $conns_list; do run_case infergate "$ig" "$port" "$c" "$body" "$threads"; done
  done
  kill "$ig"; wait "$ig" 2>/dev/null || true

  # nginx
  port=$(free_port)
  render proxy-nginx.conf.in "$work/proxy-nginx.conf" "$threads" "$port"
  "$nginx_bin" -p "$work" -c "$work/proxy-nginx.conf" -g "daemon off;" 2>"$work/proxy-nginx.stderr" &
  ng=$!
  pids+=("$ng")
  wait_port "$port"
  echo "== nginx threads=$threads" >&2
  for body in "${bodies[@]}"; do
    for c in $conns_list; do run_case nginx "$ng" "$port" "$c" "$body" "$threads"; done
  done
  kill "$ng"; wait "$ng" 2>/dev/null || true

  # HAProxy
  port=$(free_port)
  render haproxy.cfg.in "$work/haproxy.cfg" "$threads" "$port"
  "$haproxy_bin" -f "$work/haproxy.cfg" -db >"$work/haproxy.out" 2>&1 &
  hp=$!
  pids+=("$hp")
  wait_port "$port"
  echo "== haproxy threads=$threads" >&2
  for body in "${bodies[@]}"; do
    for c in $conns_list; do run_case haproxy "$hp" "$port" "$c" "$body" "$threads"; done
  done
  kill "$hp"; wait "$hp" 2>/dev/null || true
done

# The table: one row per infergate case, with the peers' figures for the same case.
awk -F'\t' '
  { key = $2 "/" $3 "/" $4; rps[$1 "/" key] = $5; p50[$1 "/" key] = $6; p99[$1 "/" key] = $7;
    cpu[$1 "/" key] = $8; rss[$1 "/" key] = $9; bad[$1 "/" key] = $10 + $11
    if ($1 == "direct") { drps[$3 "/" $4] = $5; dp50[$3 "/" $4] = $6 }
    if ($1 == "infergate") keys[++n] = key }
  END {
    print "| threads | conns | body | infergate req/s | vs HAProxy | vs nginx | p50 / p99 us | p50 added over direct us | CPU s / 1k req (ig, nginx, haproxy) | peak RSS MiB (ig, nginx, haproxy) | errors (ig) |"
    print "|---|---|---|---|---|---|---|---|---|---|---|"
    for (i = 1; i <= n; i++) {
      k = keys[i]; split(k, f, "/"); d = f[2] "/" f[3]
      hr = rps["haproxy/" k] > 0 ? sprintf("%.2fx", rps["infergate/" k] / rps["haproxy/" k]) : "-"
      nr = rps["nginx/" k] > 0 ? sprintf("%.2fx", rps["infergate/" k] / rps["nginx/" k]) : "-"
      added = (d in dp50) ? p50["infergate/" k] - dp50[d] : "-"
      printf "| %s | %s | %s | %.0f | %s | %s | %s / %s | %s | %s, %s, %s | %s, %s, %s | %d |\n",
        f[1], f[2], (f[3] == 0 ? "small" : f[3] " B"), rps["infergate/" k], hr, nr,
        p50["infergate/" k], p99["infergate/" k], added,
        cpu["infergate/" k], cpu["nginx/" k], cpu["haproxy/" k],
        rss["infergate/" k], rss["nginx/" k], rss["haproxy/" k], bad["infergate/" k]
    }
    print ""
    print "direct (no proxy), req/s by conns/body: "
    for (d in drps) printf "  %s: %.0f req/s, p50 %s us\n", d, drps[d], dp50[d]
  }' "$results"

if [[ $smoke -eq 1 ]]; then
  # The smoke fails when a proxy could not serve the load at all or infergate returned errors.
  awk -F'\t' '$1 != "direct" && ($5 + 0 == 0) { print "bench smoke: " $1 " served nothing" > "/dev/stderr"; bad = 1 }
              $1 == "infergate" && ($10 + $11 > 0) { print "bench smoke: infergate errors: " $10 " non-2xx, " $11 " socket errors" > "/dev/stderr"; bad = 1 }
              END { exit bad }' "$results"
  echo "bench smoke: ok"
fi
