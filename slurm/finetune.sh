#!/usr/bin/env bash
# Fine-tuning on SLURM: pipeline/finetune.py (DeepSpeed) with one process per GPU on every
# node of the job. Submit from the repository root, in the project's environment:
#
#   MODEL=runs/base512 OUTPUT_DIR=runs/sst2 sbatch slurm/finetune.sh \
#       --train sst2/train.tsv --validation sst2/dev.tsv --test sst2/dev.tsv --text-column sentence \
#       --label-column label --ds-config ds_configs/gpu_base_bf16_zero1_fused-adam.json --register-name sst2-base
#   MODEL=… OUTPUT_DIR=… sbatch --nodes=1 --ntasks-per-node=1 --gpus-per-node=0 \
#       --cpus-per-task=N slurm/finetune.sh …                           # CPU: N <= a node's CPUs
#
# Arguments after the script go to pipeline/finetune.py (see its --help: data files, columns,
# task, epochs, learning rate); they come after the flags set from the variables below.
#
# Settings: any #SBATCH line below can be overridden on the sbatch command line; ranks per
# node are --ntasks-per-node (keep it equal to --gpus-per-node). Variables:
#   MODEL           required: a pretrain RUN_DIR (its newest checkpoint is exported on the fly),
#                   one checkpoint dir, or a Hugging Face export (RUN_DIR/hf/<tag>)
#   OUTPUT_DIR      required: model/, report.json and confusion_matrix.png go here
#   DS_CONFIG       --ds-config: a file in ds_configs/                  [fine-tuner default: CPU]
#   RUN_NAME        --run-name: MLflow run name                         [JOBNAME-JOBID]
#   FINETUNE_ARGS   more fine-tuner flags, split on spaces              [none]
#   MLFLOW_TRACKING_URI, REPO, SETUP, PYTHON, SRUN_ARGS, MASTER_ADDR / MASTER_PORT, NCCL_*,
#   TORCH_EXTENSIONS_DIR: as in slurm/pretrain.sh
#
# Fine-tuning keeps no mid-run checkpoints (a GLUE-size task takes minutes on a GPU): a
# preempted or requeued job starts again from the pretrained weights. A stop signal ends it.
#
#SBATCH --job-name=bert-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue

set -euo pipefail

STAGE=finetune.sh
ON_STOP="passing it to the ranks, which end without a checkpoint (fine-tuning keeps none)"
NO_REQUEUE=1 # a stop before the ranks start ends the job too
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
require MODEL "set MODEL to a pretrain RUN_DIR, a checkpoint dir or a Hugging Face export"
require OUTPUT_DIR "set OUTPUT_DIR to the folder for the fine-tuned model and its report"
[[ -e "$MODEL" ]] || die "MODEL=$MODEL does not exist: pretrain first (slurm/pretrain.sh), or fix the path"
if [[ -n "${DS_CONFIG:-}" && ! -f "$DS_CONFIG" ]]; then
  die "DS_CONFIG=$DS_CONFIG does not exist (see ds_configs/)"
fi
prepare_ranks

args=(--model "$MODEL" --output-dir "$OUTPUT_DIR" --run-name "${RUN_NAME:-$SLURM_JOB_NAME-$SLURM_JOB_ID}")
[[ -z "${DS_CONFIG:-}" ]] || args+=(--ds-config "$DS_CONFIG")
read -r -a finetune_args <<<"${FINETUNE_ARGS:-}"
args+=(${finetune_args[@]+"${finetune_args[@]}"} "$@") # empty: unbound before bash 4.4
check_flags pipeline.finetuning.config "${args[@]}"
# An OUTPUT_DIR fine-tuning would damage (a pretraining run dir, MODEL itself, a file), in
# fine-tuning's words: the lock check would call a busy pretraining run dir only "in use".
check_with pipeline.finetuning.config check_output_dir FinetuneConfigError "$OUTPUT_DIR" "$MODEL"
check_free --output-dir "$OUTPUT_DIR"

log "nodes $SLURM_JOB_NODELIST, $RANKS_PER_NODE ranks per node, world size $SLURM_NTASKS," \
  "master $MASTER_ADDR:$MASTER_PORT, model $MODEL, output $OUTPUT_DIR"

# ---- the ranks ------------------------------------------------------------------------------
srun_ranks "$PYTHON" "$REPO/pipeline/finetune.py" "${args[@]}"
code=0
wait_forwarding_signals || code=$?
if ((code == 0)); then
  log "finished: $OUTPUT_DIR/report.json"
  exit 0
fi
log "failed: the ranks exited with code $code (see the lines above)"
exit "$code"
