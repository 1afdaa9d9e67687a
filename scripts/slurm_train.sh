#!/usr/bin/env bash
# Train on a SLURM cluster: srun starts one task per GPU and every task is one training process (no torchrun);
# d2_backbones reads its rank, the world size and rank 0's address from SLURM's variables (docs/training.md,
# "Four ways to start").
#
#   sbatch scripts/slurm_train.sh CONFIG [flags] [overrides]
#   sbatch scripts/slurm_train.sh configs/VoVNet/mask_rcnn_V_39_eSE_FPN_3x.yaml OUTPUT_DIR output/v39
#   sbatch --nodes 4 scripts/slurm_train.sh CONFIG OUTPUT_DIR output/run32        # 4 nodes x 8 GPUs
#   TRAINER=lazy_train sbatch scripts/slurm_train.sh CONFIG.py train.output_dir=output/run
#
# Adapt the header to your cluster (partition, account, GPUs and CPUs per node, time). Keep one task per GPU:
# --ntasks-per-node equal to the GPUs per node. SOLVER.IMS_PER_BATCH is the global batch over all tasks.
#SBATCH --job-name=d2b-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --requeue
set -euo pipefail

CONFIG=${1:?usage: sbatch scripts/slurm_train.sh CONFIG [flags] [overrides]}
shift
TRAINER=${TRAINER:-train_net}  # train_net (yaml configs) or lazy_train (Python configs)
PYTHON=${PYTHON:-python}

# Rank 0 listens on the first host of the job (read from SLURM_JOB_NODELIST) at this port, one per job.
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
# Seconds the tasks wait for each other at start (then they stop, naming the ranks that did not come).
export D2B_RDZV_TIMEOUT=${D2B_RDZV_TIMEOUT:-600}
# Threads per task: the CPUs SLURM gave it (data loading workers come on top: DATALOADER.NUM_WORKERS).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# A requeued job (preempted, a failed node; sbatch --requeue) continues from the last complete checkpoint.
RESUME=()
if [[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]]; then
    RESUME=(--resume)
fi

# --kill-on-bad-exit=1: one failed task ends the others at once (instead of leaving them waiting);
# --distribution=block: ranks numbered node after node, as detectron2's per-node process group needs.
srun --kill-on-bad-exit=1 --distribution=block \
    "$PYTHON" -m "d2_backbones.$TRAINER" --config-file "$CONFIG" ${RESUME[@]+"${RESUME[@]}"} "$@"
