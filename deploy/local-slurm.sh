#!/usr/bin/env bash
# Runs deploy/sbatch-example.sh, unchanged, on a real 3-node Slurm (22.05) brought up on this one
# machine, with mock inference servers and a curl trainer, and checks what Slurm made of it:
# the job succeeds, 2 inference nodes x 2 servers get GPUs 0,1 and 2,3 and CPUs of their own,
# the gateway and the trainer get different CPUs, the gateway logs 4 backends to
# infergate-<jobid>.log; then a second job is cancelled (scancel) while its trainer runs and the
# gateway's log must show its drain ("signal 15", "stopped"). Prints PASS/FAIL lines, exits 0
# only when all passed, and tears everything down on any exit.
#
# Usage: sudo deploy/local-slurm.sh          (root; a Debian 12 machine; takes about 20 s)
#   BUILD_DIR  where the built binaries are (default build/ in the repo root, as deploy/build.sh):
#              $BUILD_DIR/gateway/infergate and $BUILD_DIR/tests/mock/infergate-mock
#              (deploy/build.sh builds them). Missing Slurm/munge packages are installed.
#
# The cluster: nodes igslurm1..3 (slurmd -N each, own Port, NodeAddr 127.0.10.N, lines tagged
# in /etc/hosts), CPUs=2 and 4 fake GPUs each (gres.conf File= on character devices made under
# the temp dir), munge and every Slurm file under a temp dir (SLURM_CONF points there).
# CPU binding is task/affinity (sched_setaffinity: each step's tasks are held to the step's
# CPUs, which /proc/PID/status shows as Cpus_allowed_list) with proctrack/linuxproc. task/cgroup
# (cgroup/v1, ConstrainCores) bound the same way here, but left /sys/fs/cgroup/cpuset/slurm_<node>
# directories (and job_N/step_batch ones) behind on the host, and needs a cgroup v1 cpuset
# mount; affinity is all the CPU check needs and leaves nothing. Each node has CPUs=2, and the machine
# needs 2: the three nodes bind to the same real CPUs, and a node given more CPUs than the
# machine has gets its extra ones folded onto the real ones (with CPUs=4 on a 2-CPU machine, both
# servers of a node were bound to 0-1).
set -euo pipefail
started=$SECONDS
PATH=$PATH:/usr/sbin:/sbin  # slurmctld, slurmd, munged
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${BUILD_DIR:-$root/build}"  # as deploy/build.sh takes it
[[ "$build" == /* ]] || build="$PWD/$build"  # the job runs elsewhere: absolute paths
gateway_bin="$build/gateway/infergate"
mock_bin="$build/tests/mock/infergate-mock"
example="$root/deploy/sbatch-example.sh"
prefix=igslurm                    # node names igslurm1..3: never a real host's
marker="# infergate local-slurm"  # tags our /etc/hosts lines
lock=/run/lock/infergate-local-slurm.pid
[[ -d /run/lock ]] || lock=/tmp/infergate-local-slurm.pid
nodes=3 gpus=4 cpus=2

say() { echo "local-slurm: $*"; }
die() { echo "local-slurm: error: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (sudo deploy/local-slurm.sh): it starts slurmd and edits /etc/hosts"
for bin in "$gateway_bin" "$mock_bin"; do
  [[ -x "$bin" ]] || die "$bin is missing: build it first (deploy/build.sh), or set BUILD_DIR (now $build)"
done
[[ -f "$example" ]] || die "$example is missing"
(($(nproc) >= cpus)) || die "this machine has $(nproc) CPU(s) for this process; the nodes' steps need $cpus to be bound apart"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null ||
   ! command -v munged >/dev/null; then
  say "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null && apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null; } ||
    die "could not install slurmctld slurmd slurm-client munge"
fi

# An enclosing job's variables would leak into ours (sbatch passes the environment on).
while read -r var; do unset "$var"; done < <(compgen -e | grep -E '^(SLURM_|SBATCH_|SRUN_|SALLOC_|INFERGATE_)' || true)

listening() {  # port: is a TCP port listened on, on any address?
  [[ -n "$(ss -Hltn "sport = :$1")" ]]
}
free_ports() {  # count start: the first COUNT consecutive ports from START nobody listens on
  local p=$2 i
  while :; do
    for ((i = 0; i < $1; i++)); do listening $((p + i)) && break; done
    ((i == $1)) && { echo "$p"; return; }
    p=$((p + i + 1))
  done
}

tmp=$(mktemp -d /tmp/igslurm.XXXXXX)
conf="$tmp/slurm.conf"
export SLURM_CONF="$conf"
hosts_before="$tmp/hosts.before"
failures=0 checks=0 hosts_added=0
sbatch_pids=()
pass() { checks=$((checks + 1)); echo "PASS $*"; }
fail() { checks=$((checks + 1)); failures=$((failures + 1)); echo "FAIL $*"; }
check() {  # description command...: PASS or FAIL by the command's status
  local what=$1; shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}

our_procs() {  # pids, other than this shell's, whose environment holds our SLURM_CONF (builtins only)
  local dir pid env e
  for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
    mapfile -d '' env 2>/dev/null <"$dir/environ" || continue
    for e in "${env[@]}"; do
      if [[ $e == "SLURM_CONF=$conf" ]]; then echo "$pid"; break; fi
    done
  done
}
stop_daemons() {  # pid file...: SIGTERM to all at once, up to 10 s, then SIGKILL to the rest
  local file pid i alive pids=()
  for file; do
    if [[ -s "$file" ]] && pid=$(<"$file") && kill -TERM "$pid" 2>/dev/null; then pids+=("$pid"); fi
  done
  for ((i = 0; i <= 100; i++)); do
    alive=()
    for pid in "${pids[@]}"; do if kill -0 "$pid" 2>/dev/null; then alive+=("$pid"); fi; done
    ((${#alive[@]})) || return 0
    ((i < 100)) && sleep 0.1
  done
  say "still running 10 s after SIGTERM, killed: $(ps -o pid=,args= -p "$(IFS=,; echo "${alive[*]}")" | tr '\n' ';')"
  kill -KILL "${alive[@]}" 2>/dev/null || true
}

cleanup() {
  local rc=$? pid i left
  trap - EXIT
  trap 'say "tearing down, a moment"' INT TERM HUP  # a second Ctrl-C does not cut the teardown short
  trap '' PIPE  # output piped to a reader that left (| head): the teardown still runs
  set +eu
  echo "--- teardown"
  if [[ -s "$tmp/slurmctld.pid" ]] && kill -0 "$(<"$tmp/slurmctld.pid")" 2>/dev/null; then
    scancel --user=root >/dev/null 2>&1
    for ((i = 0; i < 400; i++)); do  # KillWait (30 s) bounds a job's end after its cancel
      [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
      sleep 0.1
    done
  fi
  for pid in "${sbatch_pids[@]}"; do kill "$pid" 2>/dev/null; done
  stop_daemons "$tmp"/slurmd-*.pid "$tmp/slurmctld.pid" "$tmp/munge/munged.pid"  # no job is left to need them
  wait 2>/dev/null
  mapfile -t left < <(our_procs)
  if ((${#left[@]})); then
    say "killing leftover processes of this cluster: $(ps -o pid=,args= -p "$(IFS=,; echo "${left[*]}")" | tr '\n' ';')"
    kill -KILL "${left[@]}" 2>/dev/null
    sleep 0.5
  fi
  if ((hosts_added)) && grep -qF "$marker" /etc/hosts; then
    grep -vF "$marker" /etc/hosts >"$tmp/hosts.new" && cat "$tmp/hosts.new" >/etc/hosts  # in place: /etc/hosts may be a mount
  fi
  if [[ -f "$hosts_before" ]]; then
    if cmp -s "$hosts_before" /etc/hosts; then pass "/etc/hosts is as before"; else fail "/etc/hosts differs from before"; diff "$hosts_before" /etc/hosts; fi
  fi
  mapfile -t left < <(our_procs; pgrep -f "$tmp" | grep -vx "$$" || true)
  if ((${#left[@]})); then
    fail "processes left behind:"; ps -o pid=,args= -p "$(IFS=,; echo "${left[*]}")"
  else
    pass "no process left behind (none with our SLURM_CONF in its environment or our temp dir in its command line)"
  fi
  rm -rf "$tmp"
  [[ "$(cat "$lock" 2>/dev/null)" == "$$" ]] && rm -f "$lock"
  ((rc == 0)) || fail "the script stopped early (exit status $rc)"
  echo "--- $((checks)) checks, $failures failed; total $((SECONDS - started)) s"
  if ((failures)); then echo "local-slurm: FAILED"; exit 1; fi
  echo "local-slurm: all checks passed"
  exit 0
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM HUP
trap 'exit 141' PIPE
# One run at a time: the nodes' names, addresses and the servers' ports are the same for all.
if [[ -s "$lock" ]] && kill -0 "$(<"$lock")" 2>/dev/null; then
  die "another run (pid $(<"$lock")) is going; $lock"
fi
echo $$ >"$lock"

# --- the cluster's files
mkdir -p "$tmp"/{munge,state,log,submit,jobs,bin}
chmod 0700 "$tmp/munge"
# Leftover lines of an earlier run that could not clean up: ours by the marker.
if grep -qF "$marker" /etc/hosts; then
  say "removing stale $prefix lines from /etc/hosts"
  grep -vF "$marker" /etc/hosts >"$tmp/hosts.new" && cat "$tmp/hosts.new" >/etc/hosts
fi
cp /etc/hosts "$hosts_before"
for ((i = 1; i <= nodes; i++)); do
  if getent hosts "$prefix$i" >/dev/null; then die "$prefix$i already resolves: $(getent hosts "$prefix$i")"; fi
done

# The example hard-codes the servers' ports 9000, 9001, ...: they must be free on the inference
# nodes' addresses (or on every address). Wait a little for them if something else has them.
for ((i = 0; i < 60; i++)); do
  listening 9000 || listening 9001 || break
  ((i == 0)) && say "waiting for ports 9000/9001 (the example's server ports) to be free: $(ss -Hltnp 'sport = :9000 or sport = :9001' | tr -s ' ' | head -2 | tr '\n' ';')"
  sleep 0.5
done
if listening 9000 || listening 9001; then die "ports 9000/9001, which deploy/sbatch-example.sh gives its servers, are taken"; fi
ctld_port=$(free_ports $((nodes + 1)) 16817)
gateway_port=$(free_ports 1 18080)
say "temp dir $tmp; slurmctld on port $ctld_port, slurmd on $((ctld_port + 1))-$((ctld_port + nodes)); gateway port $gateway_port"

hosts_added=1
for ((i = 1; i <= nodes; i++)); do echo "127.0.10.$i $prefix$i $marker"; done >>/etc/hosts

for ((i = 1; i <= nodes; i++)); do
  mkdir -p "$tmp/dev/$prefix$i" "$tmp/spool/$prefix$i"
  for ((g = 0; g < gpus; g++)); do mknod "$tmp/dev/$prefix$i/nvidia$g" c 1 3; done
done

cat >"$conf" <<EOF
ClusterName=$prefix
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$tmp/munge/munge.socket
StateSaveLocation=$tmp/state
SlurmdSpoolDir=$tmp/spool/%n
SlurmctldPidFile=$tmp/slurmctld.pid
SlurmdPidFile=$tmp/slurmd-%n.pid
SlurmctldLogFile=$tmp/log/slurmctld.log
SlurmdLogFile=$tmp/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
MailProg=/bin/true
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=4
KillWait=30
EOF
for ((i = 1; i <= nodes; i++)); do
  echo "NodeName=$prefix$i NodeAddr=127.0.10.$i Port=$((ctld_port + i)) CPUs=$cpus Gres=gpu:$gpus State=UNKNOWN"
done >>"$conf"
echo "PartitionName=local Nodes=${prefix}[1-$nodes] Default=YES MaxTime=INFINITE State=UP" >>"$conf"
{
  echo "AutoDetect=off"
  for ((i = 1; i <= nodes; i++)); do
    echo "NodeName=$prefix$i Name=gpu File=$tmp/dev/$prefix$i/nvidia[0-$((gpus - 1))]"
  done
} >"$tmp/gres.conf"

# --- the job's programs
# An inference server: the mock on this node's address and the port given last; it records
# where it ran, its CPUs and its GPUs.
{
  echo '#!/usr/bin/env bash'
  printf 'jobs=%q mock=%q\n' "$tmp/jobs" "$mock_bin"
  cat <<'EOF'
set -euo pipefail
port=${!#}
addr=$(getent hosts "$SLURMD_NODENAME" | awk '{print $1; exit}')
mkdir -p "$jobs/$SLURM_JOB_ID"
printf '%s %s %s %s\n' "$SLURMD_NODENAME" "$port" \
  "$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/$$/status)" "${CUDA_VISIBLE_DEVICES-unset}" \
  >>"$jobs/$SLURM_JOB_ID/servers"
exec "$mock" --host "$addr" --port "$port" --quiet
EOF
} >"$tmp/bin/server"
# The trainer: records its CPUs and the gateway's (the job's infergate process), waits for the
# 4 backends to be healthy, sends 16 chat completions, and fails unless all got 200 from all 4
# backends. With LOCAL_SLURM_HOLD=1 it then waits (to be cancelled).
{
  echo '#!/usr/bin/env bash'
  printf 'jobs=%q conf=%q\n' "$tmp/jobs" "$conf"
  cat <<'EOF'
set -euo pipefail
url=${!#}
base=${url%/v1}
out="$jobs/$SLURM_JOB_ID"
mkdir -p "$out"
cpus() { sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' "/proc/$1/status"; }
echo "$SLURMD_NODENAME $(cpus $$) ${CUDA_VISIBLE_DEVICES-unset}" >"$out/trainer"
gateway=""
for pid in $(pgrep -x infergate); do
  env=$(tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null) || continue
  if grep -qx "SLURM_JOB_ID=$SLURM_JOB_ID" <<<"$env" && grep -qxF "SLURM_CONF=$conf" <<<"$env"; then
    gateway=$pid
    break
  fi
done
[[ -n "$gateway" ]] || { echo "trainer: no infergate process of job $SLURM_JOB_ID" >&2; exit 1; }
gpus=$(sed -n 's/^CUDA_VISIBLE_DEVICES=//p' <<<"$env")
echo "$gateway $(cpus "$gateway") ${gpus:-unset}" >"$out/gateway"
for ((i = 0; i < 100; i++)); do  # /ready is 200 with 1 healthy backend; wait for all 4
  [[ "$(curl -s "$base/ready")" == *'"healthy":4'* ]] && break
  sleep 0.2
done
body='{"model":"mock","messages":[{"role":"user","content":"Hello"}]}'
for ((i = 0; i < 16; i++)); do
  curl -s -o /dev/null -D - -H 'Content-Type: application/json' -d "$body" "$url/chat/completions" |
    tr -d '\r' | awk 'NR == 1 {status = $2} tolower($1) == "x-backend:" {backend = $2} END {print status, backend}'
done >"$out/requests"
ok=$(awk '$1 == 200' "$out/requests" | wc -l)
backends=$(awk '$1 == 200 {print $2}' "$out/requests" | sort -u | paste -sd ' ')
echo "trainer: $ok/16 answered 200, from: $backends" | tee "$out/trainer-result"
[[ $ok -eq 16 && $(wc -w <<<"$backends") -eq 4 ]] || exit 1
if [[ ${LOCAL_SLURM_HOLD:-0} == 1 ]]; then
  touch "$out/holding"
  sleep 300
fi
EOF
} >"$tmp/bin/trainer"
chmod 0755 "$tmp/bin/server" "$tmp/bin/trainer"

# --- bring it up
dd if=/dev/urandom of="$tmp/munge/munge.key" bs=1024 count=1 status=none
chmod 0400 "$tmp/munge/munge.key"
munged --socket="$tmp/munge/munge.socket" --key-file="$tmp/munge/munge.key" \
  --pid-file="$tmp/munge/munged.pid" --seed-file="$tmp/munge/munge.seed" \
  --log-file="$tmp/log/munged.log" --force ||
  die "munged did not start: $(tail -n 5 "$tmp/log/munged.log" 2>/dev/null)"
slurmctld -i || die "slurmctld did not start: $(tail -n 5 "$tmp/log/slurmctld.log" 2>/dev/null)"
for ((i = 1; i <= nodes; i++)); do
  slurmd -N "$prefix$i" || die "slurmd $prefix$i did not start: $(tail -n 5 "$tmp/log/slurmd-$prefix$i.log" 2>/dev/null)"
done
for ((i = 0; i < 150; i++)); do
  [[ "$(sinfo -h -o '%D %t' 2>/dev/null)" == "$nodes idle" ]] && break
  sleep 0.1
done
[[ "$(sinfo -h -o '%D %t' 2>/dev/null)" == "$nodes idle" ]] ||
  die "the nodes are not idle after 15 s: $(sinfo -h -N -o '%N %t %E' 2>&1 | tr '\n' ';')"
say "cluster up after $((SECONDS - started)) s: $(sinfo -h -o '%P %D %t %N %G')"

submit() {  # extra environment...: sbatch --wait the example; prints the job id on its stdout
  (cd "$tmp/submit" &&
    env NUM_TRAINING_NODES=1 INFER_TP=2 GATEWAY_CPUS=1 READY_TIMEOUT=60 READY_POLL=1 \
      PORT="$gateway_port" INFERGATE="$gateway_bin" SERVER_CMD="$tmp/bin/server" \
      TRAINER_CMD="$tmp/bin/trainer" "$@" \
      sbatch --parsable --wait -N3 --gpus-per-node=4 "$example")
}
lacks() { [[ -f "$2" ]] && ! grep -q "$1" "$2"; }  # text file: the file exists, without the text
field() { awk -v n="$1" -v f="$2" '$1 == n {print $f}' "$3" | sort | paste -sd ' '; }
distinct() {  # value...: at least 2 values, none empty, no two the same
  local v
  for v; do [[ -n "$v" ]] || return 1; done
  [[ $# -ge 2 && $(printf '%s\n' "$@" | sort -u | wc -l) -eq $# ]]
}

# --- job 1: runs to its end
echo "--- job 1: the example, to its end"
t=$SECONDS
submit >"$tmp/job1.id" &  # in the background: a signal to this script is handled at once
sbatch_pids+=($!)
rc=0
wait "${sbatch_pids[-1]}" || rc=$?
job=$(head -n 1 "$tmp/job1.id")
job=${job%%;*}
out="$tmp/jobs/$job"
log="$tmp/submit/infergate-$job.log"
say "job $job ended after $((SECONDS - t)) s, sbatch --wait exit code $rc"
check "job $job exited 0 (sbatch --wait: $rc)" test "$rc" -eq 0
[[ -f "$out/servers" ]] && sed 's/^/    server: /' "$out/servers"
for ((n = 2; n <= nodes; n++)); do
  node=$prefix$n
  read -ra gpu_sets <<<"$(field "$node" 4 "$out/servers" 2>/dev/null)"
  read -ra cpu_sets <<<"$(field "$node" 3 "$out/servers" 2>/dev/null)"
  check "$node ran 2 servers with CUDA_VISIBLE_DEVICES 0,1 and 2,3 (got: ${gpu_sets[*]:-none})" \
    test "${gpu_sets[*]:-}" == "0,1 2,3"
  check "$node's servers had different CPU sets (got: ${cpu_sets[*]:-none})" distinct "${cpu_sets[@]}"
done
trainer_node="" trainer_cpus="" trainer_gpus="" gateway_cpus="" gateway_gpus=""
[[ -f "$out/trainer" ]] && read -r trainer_node trainer_cpus trainer_gpus <"$out/trainer"
[[ -f "$out/gateway" ]] && read -r _ gateway_cpus gateway_gpus <"$out/gateway"
echo "    gateway: ${trainer_node:-?} CPUs ${gateway_cpus:-?} CUDA_VISIBLE_DEVICES ${gateway_gpus:-?}"
echo "    trainer: ${trainer_node:-?} CPUs ${trainer_cpus:-?} CUDA_VISIBLE_DEVICES ${trainer_gpus:-?}"
check "gateway and trainer on ${trainer_node:-?} had different CPU sets (gateway: ${gateway_cpus:-?}, trainer: ${trainer_cpus:-?})" \
  distinct "$gateway_cpus" "$trainer_cpus"
check "the gateway step had no GPU (CUDA_VISIBLE_DEVICES ${gateway_gpus:-?})" test "${gateway_gpus:-}" == unset
check "$(cat "$out/trainer-result" 2>/dev/null || echo 'trainer: no result')" \
  grep -q '16/16 answered 200' "$out/trainer-result"
check "infergate-$job.log is in the submit directory" test -s "$log"
check "the gateway found 4 backends: $(grep -o '[0-9]* backend(s): .*' "$log" 2>/dev/null || echo 'no such line')" \
  grep -q ' 4 backend(s): ' "$log"
check "no step waited for another's resources (srun: \"step creation temporarily disabled\")" \
  lacks "step creation temporarily disabled" "$tmp/submit/slurm-$job.out"
if ((failures)); then
  echo "    the job's output (slurm-$job.out), end:"; tail -n 15 "$tmp/submit/slurm-$job.out" 2>/dev/null | sed 's/^/    | /'
  echo "    the gateway's log (infergate-$job.log), end:"; tail -n 15 "$log" 2>/dev/null | sed 's/^/    | /'
fi

# --- job 2: cancelled while the trainer runs
echo "--- job 2: the example, cancelled (scancel) while the trainer runs"
t=$SECONDS
submit LOCAL_SLURM_HOLD=1 >"$tmp/job2.id" &
sbatch_pids+=($!)
job=""
for ((i = 0; i < 600; i++)); do
  if [[ -s "$tmp/job2.id" ]]; then
    job=$(head -n 1 "$tmp/job2.id")
    job=${job%%;*}
    [[ -e "$tmp/jobs/$job/holding" ]] && break
  fi
  kill -0 "${sbatch_pids[-1]}" 2>/dev/null || break
  sleep 0.1
done
if [[ -n "$job" && -e "$tmp/jobs/$job/holding" ]]; then
  pass "job $job: the trainer is running ($(cat "$tmp/jobs/$job/trainer-result")); scancel $job"
  scancel "$job"
  rc=0
  wait "${sbatch_pids[-1]}" || rc=$?
  say "job $job ended $((SECONDS - t)) s after its start, sbatch --wait exit code $rc"
  log="$tmp/submit/infergate-$job.log"
  for ((i = 0; i < 50; i++)); do grep -q 'stopped' "$log" 2>/dev/null && break; sleep 0.1; done
  check "infergate-$job.log is in the submit directory" test -s "$log"
  check "the gateway logged the cancel's SIGTERM (\"signal 15\")" grep -q ' signal 15: ' "$log"
  check "the gateway logged its drain's end (\"stopped\")" grep -q ' stopped$' "$log"
  grep -E ' signal 15: | stopped$' "$log" 2>/dev/null | cut -c1-110 | sed 's/^/    | /'
  ((failures == 0)) || { echo "    the gateway's log (infergate-$job.log), end:"; tail -n 8 "$log" 2>/dev/null | sed 's/^/    | /'; }
else
  fail "job ${job:-?}: the trainer never got to hold (job output: $(tail -n 5 "$tmp/submit/slurm-$job.out" 2>/dev/null | tr '\n' ';'))"
fi
