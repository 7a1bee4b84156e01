#!/usr/bin/env bash
# An example job: node 1 trains, every other node runs 8/INFER_TP vLLM servers on ports
# 9000, 9001, ..., and infergate on the training node spreads the trainer's requests over them.
#SBATCH --job-name=rl-train
#SBATCH --nodes=5
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
set -euo pipefail
export NUM_TRAINING_NODES=${NUM_TRAINING_NODES:-1} INFER_TP=${INFER_TP:-2}
MODEL=${MODEL:-Qwen/Qwen2.5-7B-Instruct}
# What runs: an inference server (its port is appended), the trainer (the gateway's base URL is
# appended) and the gateway. Replace them with yours; deploy/local-slurm.sh runs this script on
# a Slurm of its own with mock servers and a curl loop.
SERVER_CMD=${SERVER_CMD:-"vllm serve $MODEL --tensor-parallel-size $INFER_TP --port"}
TRAINER_CMD=${TRAINER_CMD:-"python train.py --base-url"}
INFERGATE=${INFERGATE:-infergate}
PORT=${PORT:-8080}
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
trainer=${hosts[0]}
servers_per_node=$(( ${SLURM_GPUS_ON_NODE:-8} / INFER_TP ))
# Each step gets CPUs and GPUs of its own: `--exact` holds a step to what it asks for, so steps
# that ask for different CPUs and GPUs run side by side (with `--overlap` instead, every step is
# put on the node's lowest CPUs, the same ones, as Slurm 22.05 does). Each server gets a share of
# its node's CPUs and INFER_TP GPUs (Slurm sets CUDA_VISIBLE_DEVICES), the gateway GATEWAY_CPUS
# and no GPU (its worker threads follow its CPUs), the trainer the rest of its node.
# On a cluster that counts memory as a resource, give each step its share with --mem if steps
# start one after another: a step without it may be given all of the job's memory on its node.
cpus_on_node=${SLURM_CPUS_ON_NODE:-$servers_per_node}
cpus_per_server=$(( cpus_on_node / servers_per_node > 0 ? cpus_on_node / servers_per_node : 1 ))
gateway_cpus=${GATEWAY_CPUS:-4}
(( gateway_cpus < cpus_on_node )) || gateway_cpus=$(( cpus_on_node > 1 ? cpus_on_node - 1 : 1 ))
trainer_cpus=$(( cpus_on_node > gateway_cpus ? cpus_on_node - gateway_cpus : 1 ))

for host in "${hosts[@]:NUM_TRAINING_NODES}"; do
  for ((slot = 0; slot < servers_per_node; slot++)); do
    # shellcheck disable=SC2086  # SERVER_CMD is a command line
    srun --exact -N1 -n1 -c "$cpus_per_server" --gpus-per-node="$INFER_TP" -w "$host" \
      $SERVER_CMD $((9000 + slot)) &
  done
done

# The gateway discovers the servers above from the same variables and waits for them to load.
# Its log goes to a file of its own (-o): written by Slurm on the node, it keeps the drain's lines
# when the job is cancelled, which the job's own output loses with the batch script. The gateway
# is the step's process itself (no wrapper shell): Slurm signals that process alone, and a
# wrapper that does not `exec` would leave the gateway to be killed without a drain.
# If the gateway exits (bad input is a one-line error and exit code 2; a port another process
# listens on, exit code 1), the job ends instead of
# waiting for its time limit; so does a model that never loads within READY_TIMEOUT seconds.
srun --exact -N1 -n1 -c "$gateway_cpus" --gpus-per-node=0 -w "$trainer" -o "infergate-%j.log" \
  "$INFERGATE" --listen "0.0.0.0:$PORT" &
gateway=$!
deadline=$((SECONDS + ${READY_TIMEOUT:-3600}))
until curl -fs "http://$trainer:$PORT/ready" >/dev/null; do
  kill -0 "$gateway" 2>/dev/null || { echo "infergate exited before it was ready (see infergate-$SLURM_JOB_ID.log)" >&2; exit 1; }
  if ((SECONDS >= deadline)); then  # /ready's answer says why (how many are healthy, the commonest probe failure)
    echo "inference servers not ready after ${READY_TIMEOUT:-3600}s: $(curl -s "http://$trainer:$PORT/ready")" >&2
    exit 1
  fi
  sleep "${READY_POLL:-10}"
done

# shellcheck disable=SC2086  # TRAINER_CMD is a command line
srun --exact -N1 -n1 -c "$trainer_cpus" -w "$trainer" $TRAINER_CMD "http://$trainer:$PORT/v1"
