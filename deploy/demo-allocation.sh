# shellcheck shell=bash
# The demo's simulated Slurm allocation, sourced by deploy/demo.sh (and by its test):
# `demo_allocation BASE_PORT` sets the environment the gateway discovers its backends from.
#
# The allocation is the demo's own whatever shell runs it: inside salloc or srun, the job's
# variables would otherwise change the layout (SLURM_GPUS_PER_NODE and SLURM_JOB_GPUS come before
# SLURM_GPUS_ON_NODE, so SLURM_JOB_GPUS=0 leaves 1 GPU per node, too few for INFER_TP=4), and so
# would an operator's INFERGATE_SLURM_*, INFERGATE_BACKENDS or INFERGATE_CONFIG. Flags given to
# demo.sh still reach the gateway.
demo_allocation() {  # base_port
  local var
  for var in $(compgen -e); do
    case "$var" in
      SLURM_* | INFERGATE_SLURM_* | INFERGATE_BACKENDS | INFERGATE_CONFIG) unset "$var" ;;
    esac
  done
  export SLURM_JOB_NODELIST="127.0.10.[1-3]" NUM_TRAINING_NODES=1 INFER_TP=4 SLURM_GPUS_PER_NODE=8
  export INFERGATE_SLURM_BASE_PORT="$1"
}
