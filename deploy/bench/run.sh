#!/usr/bin/env bash
# Peer benchmark: the same fast backends (nginx returning a fixed chat completion on 4 ports)
# reached directly, through infergate, through nginx and through HAProxy, in one run on one
# machine, with wrk. Prints a Markdown table with ratios, since absolute numbers are noisy.
# A fourth proxy, infergate-bench-bare (tests/bench/bare_forwarder.cpp), forwards requests and
# responses unchanged with nothing else (two receives and two sends per request): its ratio to
# HAProxy (and nginx) in the same rounds is the ceiling: the most any proxy can lead by on this
# machine.
#
# Usage: deploy/bench/run.sh [--smoke] [--duration SECONDS] [--threads "1 2"] [--conns "1 64 256"]
#                            [--rounds N] [--backend-workers N] [--proxy-cpu CORES]
#   --duration: seconds per wrk run (default 5).
#   --rounds: interleaved rounds per case (default 3). For each thread count the four proxies are
#     started once and stay up together; for each case (conns x body) every round runs direct,
#     then the proxies back to back, their order rotated by one each round (round 1: infergate,
#     nginx, haproxy, bare; round 2: nginx, haproxy, bare, infergate; ...), so slow drift in the
#     machine's speed hits all of them alike instead of showing up as a ratio.
#   --backend-workers: worker processes of the backend nginx (default 4, as the benchmark's brief
#     asks; on a 2-core machine 2 workers raise every target's req/s alike).
#   --proxy-cpu: hold each proxy (its whole process tree) to CORES of CPU time (e.g. 0.5) with a
#     cgroup CPU quota (10 ms period; cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`; needs root), so
#     the proxy is the bottleneck however few cores the machine has. Without it the proxies share
#     the cores with wrk and the backends, and req/s follows what all of them spend per request.
#     Direct runs are not held (they have no proxy), so "p50 added over direct" grows with it.
#   --smoke: 1 s per case, c=64, 1 thread, 1 round; fails if any proxy served nothing or infergate
#     returned non-2xx or socket errors (used by CI).
#
# Each figure in the table is for the median round: req/s is the median over the rounds, and
# p50/p99 latency and CPU per 1k requests are those of the round whose req/s is that median (for
# an even number of rounds, the lower of the two middle rounds, so all figures come from one real
# run). Direct runs once per case per round of every thread count and its median is over all of
# them; "p50 added over direct" is infergate's median-round p50 minus direct's median-round p50
# for that case. CPU is the user+system ticks of the proxy's process tree during each wrk run (and
# separately its user-space ticks: the rest is kernel work, mostly the loopback TCP path);
# peak RSS (VmHWM) is read once per proxy and thread count after all cases, so it is the high-water
# mark over the whole run. Beside each ratio, in brackets, the lowest and highest of the per-round
# ratios (infergate's round r against the peer's round r, run within seconds of each other): the
# spread this machine gives the same two binaries. "errors (ig)" sums infergate's non-2xx and socket errors over the rounds.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
build="${BUILD_DIR:-$root/build}"
duration=5
threads_list="1 2"
conns_list="1 64 256"
rounds=3
backend_workers=4
large_body=32768
smoke=0
proxy_cpu=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) smoke=1; duration=1; threads_list="1"; conns_list="64"; rounds=1; shift ;;
    --duration) duration="$2"; shift 2 ;;
    --threads) threads_list="$2"; shift 2 ;;
    --conns) conns_list="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --backend-workers) backend_workers="$2"; shift 2 ;;
    --proxy-cpu) proxy_cpu="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "--rounds needs a positive integer, not '$rounds'" >&2; exit 2; }
[[ "$backend_workers" =~ ^[1-9][0-9]*$ ]] ||
  { echo "--backend-workers needs a positive integer, not '$backend_workers'" >&2; exit 2; }
if [[ -n "$proxy_cpu" ]]; then
  # The kernel takes no quota under 1 ms, a tenth of the 10 ms period.
  [[ "$proxy_cpu" =~ ^[0-9]*\.?[0-9]+$ ]] && awk -v c="$proxy_cpu" 'BEGIN { exit !(c >= 0.1) }' ||
    { echo "--proxy-cpu needs a number of cores of at least 0.1 (like 0.5), not '$proxy_cpu'" >&2; exit 2; }
fi

"$root/deploy/install-deps.sh" --bench
[[ -x "$build/gateway/infergate" && -x "$build/tests/bench/infergate-bench-bare" ]] || "$root/deploy/build.sh" >&2
infergate="$build/gateway/infergate"
bare="$build/tests/bench/infergate-bench-bare"
nginx_bin="$(command -v nginx || echo /usr/sbin/nginx)"
haproxy_bin="$(command -v haproxy || echo /usr/sbin/haproxy)"

work="$(mktemp -d /tmp/infergate-bench.XXXXXX)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  local dir
  for dir in "${cgroups[@]}"; do rmdir "$dir" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP  # run the EXIT trap (and so the cleanup) on these too
# stop PID: end one process started here and forget it, so the cleanup does not signal a reused pid.
stop() {
  local pid keep=()
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  for pid in "${pids[@]}"; do [[ "$pid" == "$1" ]] || keep+=("$pid"); done
  pids=("${keep[@]}")
}

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
# cpu_ticks PID [user]: user+system ticks, or user-space ticks only.
cpu_ticks() {
  local total=0 pid fields='$14 + $15'
  [[ "${2:-}" == user ]] && fields='$14'
  for pid in $(tree_pids "$1"); do
    [[ -r /proc/$pid/stat ]] || continue
    total=$((total + $(awk "{print $fields}" "/proc/$pid/stat")))
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
# CPU quota groups for --proxy-cpu: cgroup v2 (cpu.max) where its cpu controller is on, else v1.
cgroups=()
cg_root=""
if [[ -n "$proxy_cpu" ]]; then
  if grep -qw cpu /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
    cg_root=/sys/fs/cgroup
    if ! grep -qw cpu "$cg_root/cgroup.subtree_control"; then
      err=$( { echo +cpu > "$cg_root/cgroup.subtree_control"; } 2>&1 ) ||
        { echo "bench: --proxy-cpu: cannot enable the cpu controller for groups under $cg_root ($err; it needs" \
               "root, a writable cgroup mount, and no processes in $cg_root itself)" >&2; exit 1; }
    fi
  elif [[ -w /sys/fs/cgroup/cpu/cgroup.procs || -w /sys/fs/cgroup/cpu/tasks ]]; then
    cg_root=/sys/fs/cgroup/cpu
  else
    echo "bench: --proxy-cpu needs a writable cgroup CPU controller (cgroup v2 /sys/fs/cgroup or v1 /sys/fs/cgroup/cpu; run as root)" >&2
    exit 1
  fi
fi
# cpu_cap NAME PID: move PID and its children into a group of their own held to $proxy_cpu cores.
cpu_cap() {
  local dir="$cg_root/infergate-bench-$$-$1" quota pid
  quota=$(awk -v c="$proxy_cpu" 'BEGIN { printf "%d", c * 10000 + 0.5 }')
  mkdir -p "$dir"
  cgroups+=("$dir")
  if [[ -e "$dir/cpu.max" ]]; then
    echo "$quota 10000" > "$dir/cpu.max"
  else
    echo 10000 > "$dir/cpu.cfs_period_us"
    echo "$quota" > "$dir/cpu.cfs_quota_us"
  fi
  for pid in $(tree_pids "$2"); do echo "$pid" > "$dir/cgroup.procs"; done
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
  render backend-nginx.conf.in "$work/backend.conf" "$backend_workers" 0
  "$nginx_bin" -p "$work" -c "$work/backend.conf" -g "daemon off;" 2>"$work/backend.stderr" &
  pids+=($!)
  started=1
  for p in "${bp[@]}"; do wait_port "$p" || { started=0; cat "$work/backend.stderr" >&2; break; }; done
done
[[ $started -eq 1 ]] || { echo "bench: the backend nginx did not start" >&2; exit 1; }

results="$work/results.tsv"  # target threads conns body round req/s p50 p99 cpu/1k non2xx errors user-cpu/1k
rss_file="$work/rss.tsv"     # target threads peak-RSS-MiB
: > "$results"
: > "$rss_file"
hz=$(getconf CLK_TCK)
# run_case NAME PID PORT CONNS BODY_BYTES THREADS ROUND
run_case() {
  local name="$1" pid="$2" port="$3" conns="$4" body="$5" threads="$6" round="$7"
  local before after ubefore uafter out rps p50 p99 non2xx errors reqs cpu_per_k user_per_k
  before=$( [[ "$pid" == - ]] && echo 0 || cpu_ticks "$pid")
  ubefore=$( [[ "$pid" == - ]] && echo 0 || cpu_ticks "$pid" user)
  out=$(BODY_BYTES="$body" wrk -t1 -c"$conns" -d"${duration}s" --latency -s "$here/chat.lua" \
        "http://127.0.0.1:$port" 2>&1)
  after=$( [[ "$pid" == - ]] && echo 0 || cpu_ticks "$pid")
  uafter=$( [[ "$pid" == - ]] && echo 0 || cpu_ticks "$pid" user)
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  p50=$(to_us "$(awk '$1 == "50%" {print $2}' <<<"$out")")
  p99=$(to_us "$(awk '$1 == "99%" {print $2}' <<<"$out")")
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
  errors=$(awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10}' <<<"$out")
  if [[ "$pid" == - || -z "$reqs" || "$reqs" == 0 ]]; then
    cpu_per_k="-"; user_per_k="-"
  else
    cpu_per_k=$(awk -v t=$((after - before)) -v hz="$hz" -v n="$reqs" 'BEGIN {printf "%.3f", t / hz / n * 1000}')
    user_per_k=$(awk -v t=$((uafter - ubefore)) -v hz="$hz" -v n="$reqs" 'BEGIN {printf "%.4f", t / hz / n * 1000}')
  fi
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$name" "$threads" "$conns" "$body" "$round" \
    "${rps:-0}" "${p50:-0}" "${p99:-0}" "$cpu_per_k" "${non2xx:-0}" "${errors:-0}" "$user_per_k" >> "$results"
  echo "  round $round $name threads=$threads c=$conns body=$body: ${rps:-0} req/s, p50 ${p50:-?}us, p99 ${p99:-?}us, non-2xx ${non2xx:-0}" >&2
}

bodies=(0)
[[ $smoke -eq 0 ]] && bodies+=("$large_body")

for threads in $threads_list; do
  # All four proxies stay up together for this thread count (an idle one costs next to nothing).
  # infergate
  ig_port=$(free_port)
  "$infergate" --no-slurm --listen "127.0.0.1:$ig_port" --threads "$threads" --log-level warn \
    --set log.access=false --set health.healthy_threshold=1 --set health.interval=1s \
    $(for p in "${bp[@]}"; do echo --backend "http://127.0.0.1:$p"; done) >"$work/ig.out" 2>"$work/ig.err" &
  ig=$!
  pids+=("$ig")
  wait_port "$ig_port" || { cat "$work/ig.err" >&2; exit 1; }
  for ((i = 0; i < 100; i++)); do
    [[ $(curl -fs "http://127.0.0.1:$ig_port/ready" 2>/dev/null | grep -o '"healthy":[0-9]*' | cut -d: -f2) == 4 ]] && break
    sleep 0.1
  done

  # nginx
  ng_port=$(free_port)
  render proxy-nginx.conf.in "$work/proxy-nginx.conf" "$threads" "$ng_port"
  "$nginx_bin" -p "$work" -c "$work/proxy-nginx.conf" -g "daemon off;" 2>"$work/proxy-nginx.stderr" &
  ng=$!
  pids+=("$ng")
  wait_port "$ng_port" || { cat "$work/proxy-nginx.stderr" >&2; exit 1; }

  # HAProxy
  hp_port=$(free_port)
  render haproxy.cfg.in "$work/haproxy.cfg" "$threads" "$hp_port"
  "$haproxy_bin" -f "$work/haproxy.cfg" -db >"$work/haproxy.out" 2>&1 &
  hp=$!
  pids+=("$hp")
  wait_port "$hp_port" || { cat "$work/haproxy.out" >&2; exit 1; }

  # The bare forwarder: the ceiling (see the top of this file).
  bf_port=$(free_port)
  "$bare" --port "$bf_port" --threads "$threads" "${bp[@]}" >"$work/bare.out" 2>&1 &
  bf=$!
  pids+=("$bf")
  wait_port "$bf_port" || { cat "$work/bare.out" >&2; exit 1; }

  proxies=("infergate $ig $ig_port" "nginx $ng $ng_port" "haproxy $hp $hp_port" "bare $bf $bf_port")
  if [[ -n "$proxy_cpu" ]]; then
    cpu_cap "infergate-$threads" "$ig"; cpu_cap "nginx-$threads" "$ng"; cpu_cap "haproxy-$threads" "$hp"
    cpu_cap "bare-$threads" "$bf"
  fi
  for body in "${bodies[@]}"; do
    for c in $conns_list; do
      echo "== threads=$threads c=$c body=$body" >&2
      for ((r = 0; r < rounds; r++)); do
        run_case direct - "${bp[0]}" "$c" "$body" - $((r + 1))
        for ((j = 0; j < ${#proxies[@]}; j++)); do
          read -r name pid port <<<"${proxies[(r + j) % ${#proxies[@]}]}"
          run_case "$name" "$pid" "$port" "$c" "$body" "$threads" $((r + 1))
        done
      done
    done
  done

  # Peak RSS is a high-water mark: read it once, after every case of this thread count.
  printf "infergate\t%s\t%s\nnginx\t%s\t%s\nhaproxy\t%s\t%s\n" \
    "$threads" $(( $(peak_rss_kib "$ig") / 1024 )) "$threads" $(( $(peak_rss_kib "$ng") / 1024 )) \
    "$threads" $(( $(peak_rss_kib "$hp") / 1024 )) >> "$rss_file"
  stop "$ig"; stop "$ng"; stop "$hp"; stop "$bf"
done

# The table: one row per infergate case, with the peers' figures for the same case. Each (target,
# case) takes its median round by req/s (the lower middle one for an even count of rounds).
awk -F'\t' -v rounds="$rounds" -v duration="$duration" -v workers="$backend_workers" -v proxy_cpu="$proxy_cpu" '
  FILENAME == ARGV[1] { rss[$1 "/" $2] = $3; next }
  { key = ($1 == "direct" ? $3 "/" $4 : $2 "/" $3 "/" $4); t = $1 "/" key
    m = ++cnt[t]; rps[t, m] = $6; p50[t, m] = $7; p99[t, m] = $8; cpu[t, m] = $9; ucpu[t, m] = $12; bad[t] += $10 + $11
    if ($1 == "direct" && !(key in dseen)) { dseen[key] = 1; dkeys[++nd] = key }
    if ($1 == "infergate" && !(key in seen)) { seen[key] = 1; keys[++n] = key } }
  # med(t): the index of the median round of target/case t, by req/s.
  function med(t,    i, j, k, n, idx) {
    n = cnt[t]
    if (n == 0) return 0
    for (i = 1; i <= n; i++) idx[i] = i
    for (i = 2; i <= n; i++)
      for (j = i; j > 1 && rps[t, idx[j - 1]] + 0 > rps[t, idx[j]] + 0; j--) { k = idx[j]; idx[j] = idx[j - 1]; idx[j - 1] = k }
    return idx[int((n + 1) / 2)]
  }
  function get(a, t, m) { return m ? a[t, m] : "-" }
  # ratio(ti, tp, m, mp): the median rounds (m of ti, mp of tp) ratio, then "(lowest-highest)"
  # of the per-round ratios.
  function ratio(ti, tp, m, mp,    r, x, lo, hi, k) {
    if (!mp || rps[tp, mp] + 0 <= 0) return "-"
    r = sprintf("%.2fx", rps[ti, m] / rps[tp, mp])
    lo = ""; hi = ""
    for (k = 1; k <= cnt[ti] && k <= cnt[tp]; k++) {
      if (rps[tp, k] + 0 <= 0) continue
      x = rps[ti, k] / rps[tp, k]
      if (lo == "" || x < lo) lo = x
      if (hi == "" || x > hi) hi = x
    }
    return (cnt[ti] > 1 && lo != "") ? sprintf("%s (%.2f-%.2f)", r, lo, hi) : r
  }
  END {
    print "| threads | conns | body | infergate req/s | vs HAProxy | vs nginx | ceiling: bare forwarder vs HAProxy / nginx | infergate vs bare forwarder | p50 / p99 us | p50 added over direct us | CPU s / 1k req (ig, nginx, haproxy, bare) | of which user space (ig, nginx, haproxy) | peak RSS MiB over the run (ig, nginx, haproxy) | errors (ig) |"
    print "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    for (i = 1; i <= n; i++) {
      k = keys[i]; split(k, f, "/"); d = f[2] "/" f[3]
      ti = "infergate/" k; tn = "nginx/" k; th = "haproxy/" k; tb = "bare/" k; td = "direct/" d
      mi = med(ti); mn = med(tn); mh = med(th); mb = med(tb); md = med(td)
      ri = rps[ti, mi] + 0
      hr = ratio(ti, th, mi, mh); nr = ratio(ti, tn, mi, mn)
      cr = mb ? ratio(tb, th, mb, mh) " / " ratio(tb, tn, mb, mn) : "-"; br = ratio(ti, tb, mi, mb)
      added = md ? p50[ti, mi] - p50[td, md] : "-"
      printf "| %s | %s | %s | %.0f | %s | %s | %s | %s | %s / %s | %s | %s, %s, %s, %s | %s, %s, %s | %s, %s, %s | %d |\n",
        f[1], f[2], (f[3] == 0 ? "small" : f[3] " B"), ri, hr, nr, cr, br,
        p50[ti, mi], p99[ti, mi], added,
        cpu[ti, mi], get(cpu, tn, mn), get(cpu, th, mh), get(cpu, tb, mb),
        ucpu[ti, mi], get(ucpu, tn, mn), get(ucpu, th, mh),
        rss["infergate/" f[1]], rss["nginx/" f[1]], rss["haproxy/" f[1]], bad[ti]
    }
    printf "\nmedian of %d interleaved round%s, %s s each; backend nginx with %d worker%s", rounds,
      (rounds == 1 ? "" : "s"), duration, workers, (workers == 1 ? "" : "s")
    if (rounds > 1) printf "; in brackets the lowest and highest per-round ratio"
    if (proxy_cpu != "") printf "; each proxy held to %s of a core (cgroup CPU quota)", proxy_cpu
    printf "\n"
    print ""
    print "direct (no proxy), req/s by conns/body: "
    for (i = 1; i <= nd; i++) {
      d = dkeys[i]; td = "direct/" d; md = med(td)
      printf "  %s: %.0f req/s, p50 %s us\n", d, rps[td, md], p50[td, md]
    }
  }' "$rss_file" "$results"

if [[ $smoke -eq 1 ]]; then
  # The smoke fails when a proxy could not serve the load at all (in any round) or infergate
  # returned errors.
  awk -F'\t' '$1 != "direct" && ($6 + 0 == 0) { print "bench smoke: " $1 " served nothing (round " $5 ")" > "/dev/stderr"; bad = 1 }
              $1 == "infergate" && ($10 + $11 > 0) { print "bench smoke: infergate errors: " $10 " non-2xx, " $11 " socket errors" > "/dev/stderr"; bad = 1 }
              END { exit bad }' "$results"
  echo "bench smoke: ok"
fi
