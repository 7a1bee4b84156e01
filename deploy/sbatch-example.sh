#!/usr/bin/env bash
# An example job: node 1 trains, every other node runs 8/INFER_TP vLLM servers on ports
# 9000, 9001, ..., and infergate on the training node spreads the trainer's requests over them.
#SBATCH --job-name=rl-train
#SBATCH --nodes=5
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
set -euo pipefail
export NUM_TRAINING_NODES=1 INFER_TP=2
MODEL=${MODEL:-Qwen/Qwen2.5-7B-Instruct}
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
trainer=${hosts[0]}
servers_per_node=$(( ${SLURM_GPUS_ON_NODE:-8} / INFER_TP ))
# Each step gets CPUs of its own (a step gets one by default): each server a share of its node,
# the gateway GATEWAY_CPUS (its worker threads follow them), the trainer the rest of its node.
cpus_on_node=${SLURM_CPUS_ON_NODE:-$servers_per_node}
cpus_per_server=$(( cpus_on_node / servers_per_node > 0 ? cpus_on_node / servers_per_node : 1 ))
gateway_cpus=${GATEWAY_CPUS:-4}
trainer_cpus=$(( cpus_on_node > gateway_cpus ? cpus_on_node - gateway_cpus : 1 ))

for host in "${hosts[@]:NUM_TRAINING_NODES}"; do
  for ((slot = 0; slot < servers_per_node; slot++)); do
    gpus=$(seq -s, $((slot * INFER_TP)) $((slot * INFER_TP + INFER_TP - 1)))
    # Each server gets its own GPUs. Slurm sets CUDA_VISIBLE_DEVICES in every step (overriding
    # --export), so it is set inside the task.
    srun --overlap -N1 -n1 -c "$cpus_per_server" -w "$host" bash -c \
      "export CUDA_VISIBLE_DEVICES=$gpus; exec vllm serve '$MODEL' --port $((9000 + slot)) --tensor-parallel-size $INFER_TP" &
  done
done

# The gateway discovers the servers above from the same variables and waits for them to load.
# If the gateway exits (bad input is a one-line error and exit code 2; a port another process
# listens on, exit code 1), the job ends instead of
# waiting for its time limit; so does a model that never loads within READY_TIMEOUT seconds.
srun --overlap -N1 -n1 -c "$gateway_cpus" -w "$trainer" infergate --listen 0.0.0.0:8080 &
gateway=$!
deadline=$((SECONDS + ${READY_TIMEOUT:-3600}))
until curl -fs "http://$trainer:8080/ready" >/dev/null; do
  kill -0 "$gateway" 2>/dev/null || { echo "infergate exited before it was ready" >&2; exit 1; }
  if ((SECONDS >= deadline)); then  # /ready's answer says why (how many are healthy, the commonest probe failure)
    echo "inference servers not ready after ${READY_TIMEOUT:-3600}s: $(curl -s "http://$trainer:8080/ready")" >&2
    exit 1
  fi
  sleep 10
done

srun --overlap -N1 -n1 -c "$trainer_cpus" -w "$trainer" python train.py --base-url "http://$trainer:8080/v1"
