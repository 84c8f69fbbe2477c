#!/usr/bin/env bash
# Pretraining on SLURM: pipeline/pretrain.py (DeepSpeed) with one process per GPU on every
# node of the job. Submit from the repository root, in the project's environment:
#
#   DATA_DIR=data/wiki128 RUN_DIR=runs/base128 sbatch slurm/pretrain.sh \
#       --model base --ds-config ds_configs/gpu_base_bf16_zero1_fused-adam.json \
#       --global-batch-size 4096 --micro-batch-size 128 --learning-rate 1e-3 --steps 7038
#   DATA_DIR=… RUN_DIR=… sbatch --nodes=4 slurm/pretrain.sh …           # 4 nodes x 8 GPUs, no edits
#   DATA_DIR=… RUN_DIR=… sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 \
#       --cpus-per-task=N slurm/pretrain.sh                             # CPU (tests): N <= a node's CPUs
#                   (a job asking more CPUs than a node has stays PENDING, reason PartitionConfig)
#
# Arguments after the script go to pipeline/pretrain.py (see its --help); they come after
# the flags set from the variables below, so they win.
#
# Settings: any #SBATCH line below can be overridden on the sbatch command line. The
# ranks per node are --ntasks-per-node (keep it equal to --gpus-per-node). Variables,
# read from the environment sbatch passes on:
#   DATA_DIR        required: data dir written by preprocessing (slurm/preprocess.sh)
#   RUN_DIR         required: checkpoints/, metrics.jsonl and hf/<tag>/ go here; a requeued
#                   or resubmitted job with the same RUN_DIR resumes from its newest checkpoint
#   MODEL           --model: preset (tiny … large) or a config.json     [trainer default]
#   DS_CONFIG       --ds-config: a file in ds_configs/ (a relative path is the submit dir's)
#                                                                       [trainer default: CPU]
#   STEPS           --steps: optimizer steps in all                     [trainer default]
#   INIT_FROM       --init-from: phase 2 starts from this phase-1 run dir's weights with a fresh
#                   optimizer; once RUN_DIR has a checkpoint, a requeued job resumes that instead
#   CHECKPOINT_MINUTES  --checkpoint-minutes: a checkpoint at least this often, so a crash, a
#                   node failure or a stop whose save outlasts KillWait loses at most this
#                   much (0: only at the end and on a stop signal)           [30]
#   RUN_NAME        --run-name: MLflow run name                         [JOBNAME-JOBID]
#   TRAIN_ARGS      more trainer flags, split on spaces                 [none]
#   MLFLOW_TRACKING_URI  MLflow server for rank 0                       [sqlite:///mlflow.db in the submit dir]
#   REPO            the repository                                      [the folder sbatch ran in]
#   SETUP           a file sourced first: module loads, venv or conda activation  [none]
#   PYTHON          the interpreter                                     [python]
#   SRUN_ARGS       more srun options, e.g. --container-image=… (pyxis) [none]
#   MASTER_ADDR / MASTER_PORT  rendezvous [NodeAddr of the first node / 15000 + job id % 15000,
#                   or the next port free on the first node]
#   MAX_REQUEUES    requeues allowed after stop signals                 [20]
#   NCCL_*          passed through. NCCL_DEBUG=WARN unless set; on multi-rail or Ethernet
#                   clusters set NCCL_SOCKET_IFNAME (e.g. ib0 or eth0) and NCCL_IB_HCA (e.g.
#                   mlx5); NCCL_IB_DISABLE=1 forces TCP. Without GPUs the backend is gloo.
#   TORCH_EXTENSIONS_DIR  where DeepSpeed builds its ops; a lock there over an hour old is
#                   warned about (a job killed mid-build leaves it)  [~/.cache/torch_extensions]
#
# Preemption: 300 s before --time runs out SLURM sends USR1 to this shell (--signal=B:…),
# which passes it to every rank; they finish the current step, checkpoint, and exit 3; the
# job then requeues itself and, on its next start, resumes with `--resume auto`. The 300 s
# must cover one step plus one checkpoint save (SLURM may signal up to 60 s early).
# `scancel --signal=USR1 JOBID` (signals the ranks) and `scancel --batch --signal=USR1 JOBID`
# (this shell) do the same by hand. Preemption with GraceTime sends SIGTERM to the ranks:
# they checkpoint, exit 3, and the job requeues (also under PreemptMode=CANCEL). A SIGTERM
# to this shell (plain `scancel`, the time limit) stops the ranks with a checkpoint but ends
# the job.
#
# Failures: a rank that fails (an exception, out of memory, a crash) exits non-zero, and srun
# ends the other ranks at once (--kill-on-bad-exit=1, see slurm/common.sh); a non-finite loss
# stops every rank at the same step. The job fails (srun's exit code), is not requeued, and
# keeps its newest complete checkpoint. A rank that hangs without exiting is ended by the
# others' process-group timeout: TRAIN_ARGS="--dist-timeout-minutes N" (default: see pipeline/pretrain.py --help).
#
#SBATCH --job-name=bert-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

set -euo pipefail

STAGE=pretrain.sh
if [[ -n "${REPO:-}" && -f "$REPO/slurm/common.sh" ]]; then
  common="$REPO/slurm/common.sh"
else
  common="${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
fi
[[ -f "$common" ]] || {
  echo "error: slurm/common.sh not found: submit from the repository root or set REPO" >&2
  exit 2
}
# shellcheck source=slurm/common.sh
source "$common"

# ---- settings, all checked before srun starts anything ------------------------------------
find_repo
require DATA_DIR "set DATA_DIR to the data dir written by preprocessing (it holds manifest.json)"
require RUN_DIR "set RUN_DIR to the folder for checkpoints and metrics (the same one resumes)"
[[ -d "$DATA_DIR" ]] || die "DATA_DIR=$DATA_DIR does not exist: run preprocessing first (slurm/preprocess.sh)"
[[ -f "$DATA_DIR/manifest.json" ]] ||
  die "DATA_DIR=$DATA_DIR has no manifest.json: preprocessing did not finish there (it writes the manifest last)"
if [[ -n "${DS_CONFIG:-}" && ! -f "$DS_CONFIG" ]]; then
  die "DS_CONFIG=$DS_CONFIG does not exist (see ds_configs/)"
fi
if [[ -n "${INIT_FROM:-}" && ! -e "$INIT_FROM" ]]; then
  die "INIT_FROM=$INIT_FROM does not exist: set it to the phase-1 RUN_DIR"
fi
prepare_ranks

args=(--data "$DATA_DIR" --run-dir "$RUN_DIR" --run-name "${RUN_NAME:-$SLURM_JOB_NAME-$SLURM_JOB_ID}")
[[ -z "${MODEL:-}" ]] || args+=(--model "$MODEL")
[[ -z "${DS_CONFIG:-}" ]] || args+=(--ds-config "$DS_CONFIG")
[[ -z "${STEPS:-}" ]] || args+=(--steps "$STEPS")
[[ -z "${INIT_FROM:-}" ]] || args+=(--init-from "$INIT_FROM")
args+=(--checkpoint-minutes "${CHECKPOINT_MINUTES:-30}")
read -r -a train_args <<<"${TRAIN_ARGS:-}"
args+=(${train_args[@]+"${train_args[@]}"} "$@") # empty: unbound before bash 4.4
check_flags pipeline.train_config "${args[@]}"
check_free --run-dir "$RUN_DIR"

log "nodes $SLURM_JOB_NODELIST, $RANKS_PER_NODE ranks per node, world size $SLURM_NTASKS," \
  "master $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"

# ---- the ranks ------------------------------------------------------------------------------
srun_ranks "$PYTHON" "$REPO/pipeline/pretrain.py" "${args[@]}"
code=0
wait_forwarding_signals || code=$?
finish_or_requeue "$code"
