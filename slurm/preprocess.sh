#!/usr/bin/env bash
# Preprocessing on SLURM, for sites without a Dataflow, Flink or Spark cluster.
#
# What this is: preprocessing/run_beam.py with Apache Beam's LOCAL runner (the FnApiRunner,
# the engine behind the DirectRunner) on ONE node, one worker process per CPU of the job
# (--direct_running_mode=multi_processing). It does not spread over nodes. Memory does not
# grow with the corpus (each worker streams its read tasks bucket by bucket; 0.7-1.2 GB
# per worker process, see "Scaling out" in docs/PREPROCESSING.md), so one big node handles the full
# English Wikipedia; for more, use a cluster runner.
# It has no checkpoints: a job that is stopped starts over (the manifest is written last,
# so a stopped run never looks complete). Submit from the repository root:
#
#   DATA_DIR=data/wiki128 INPUT='dumps/enwiki-*-multistream.xml.bz2' sbatch slurm/preprocess.sh
#   DATA_DIR=data/wiki128 sbatch --cpus-per-task=64 slurm/preprocess.sh --vocab-size 32000
#
# Arguments after the script go to run_beam.py (see its --help) and win over the flags
# below. Variables: DATA_DIR (required: the data dir, --output), INPUT (files or globs,
# split on spaces; default: run_beam.py's bundled sample), MLFLOW_TRACKING_URI, REPO,
# SETUP, PYTHON (as in slurm/pretrain.sh).
#
#SBATCH --job-name=bert-preprocess
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --no-requeue

set -euo pipefail

STAGE=preprocess.sh
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
trap - USR1 TERM # no ranks to stop and requeue: signals end the shell as before

find_repo
require DATA_DIR "set DATA_DIR to the output data dir (run_beam.py --output)"
((${SLURM_JOB_NUM_NODES:-1} == 1)) || die "the local Beam runner uses one node: submit with --nodes=1"
setup_python

workers=${SLURM_CPUS_PER_TASK:-1}
args=(--output "$DATA_DIR" --direct_num_workers="$workers" --direct_running_mode=multi_processing)
if [[ -n "${INPUT:-}" ]]; then
  read -r -a inputs <<<"$INPUT"
  args+=(--input ${inputs[@]+"${inputs[@]}"}) # empty: unbound before bash 4.4
fi
args+=("$@")

log "Beam local runner on $(hostname), $workers worker processes, output $DATA_DIR"
"$PYTHON" "$REPO/preprocessing/run_beam.py" "${args[@]}"
