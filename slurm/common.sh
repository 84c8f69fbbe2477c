# shellcheck shell=bash
# Shell functions shared by the sbatch scripts in slurm/ (sourced, not run).
#
# What they settle once for every stage:
#   - fail fast, before srun starts anything, with a message that names the variable;
#   - the rendezvous address: the first node of the job, mapped through SLURM's NodeAddr
#     (node names need not resolve by DNS), and a port derived from the job id, the next free
#     one if another process listens there;
#   - one srun task per rank, with RANK / LOCAL_RANK / WORLD_SIZE taken from SLURM;
#   - stop signals: the batch shell forwards USR1/TERM to the ranks, and a stage that
#     checkpointed and exited 3 is requeued with `scontrol requeue`;
#   - failures: the first rank to exit non-zero ends every rank (srun --kill-on-bad-exit=1),
#     and the job fails with srun's code, not requeued.

# A stop signal to the batch shell before the ranks run (the checks, SETUP, prepare_ranks): bash
# dies of USR1 by default, which ended the job without a requeue (the time limit's B:USR1 too,
# on a slow start). Remembered here; acted on when the ranks would start (srun_ranks), or passed
# on to them if it comes while they start (wait_forwarding_signals).
_EARLY_SIGNAL=""
trap '[[ $_EARLY_SIGNAL == TERM ]] || _EARLY_SIGNAL=USR1' USR1  # a TERM stays the reason
trap '_EARLY_SIGNAL=TERM' TERM

log() {
  printf '%s %s[job %s%s]: %s\n' "$(date '+%F %T')" "${STAGE:-slurm}" "${SLURM_JOB_ID:-?}" \
    "${SLURM_RESTART_COUNT:+, restart $SLURM_RESTART_COUNT}" "$*" >&2
}

die() {
  log "error: $*"
  exit 2
}

# check_flags MODULE ARGS...: the stage's flags parsed once here, before srun, and its global batch
# split among the job's SLURM_NTASKS processes as the ranks will (global = micro-batch x processes
# x accumulation; the error proposes sizes that fit). A bad one ended every rank with the same
# line, and srun's kill of the slower ranks made the job's exit code 143.
check_flags() {
  local module=$1
  shift
  "$PYTHON" -c 'import importlib, os, sys; sys.path.insert(0, sys.argv.pop(1))
stage = importlib.import_module(sys.argv.pop(1))
config = stage.parse_args(sys.argv[1:])
from pipeline.ds_config import DsConfigError
try:
    config.engine.batches(int(os.environ["SLURM_NTASKS"]))
except DsConfigError as err:
    stage.build_parser().error(str(err))' "$REPO" "$module" "$@" || exit 2
}

# check_with MODULE FUNCTION ERROR ARG...: MODULE.FUNCTION(ARG...) of the project; its ERROR (an
# exception class of MODULE) ends the job here with the error's one line.
check_with() {
  local refused
  refused=$("$PYTHON" -c 'import importlib, sys; sys.path.insert(0, sys.argv[1])
module = importlib.import_module(sys.argv[2])
try:
    getattr(module, sys.argv[3])(*sys.argv[5:])
except getattr(module, sys.argv[4]) as err:
    print(err)' "$REPO" "$@") || die "cannot run the check $1.$2 (see above)"
  [[ -z "$refused" ]] || die "$refused"
}

# check_free FLAG DIR: a DIR another run holds now (its .lock, pipeline/run_lock.py) ends the job
# here, naming the holder; nothing is created or written. The ranks take the lock themselves (two
# jobs starting at once are told apart there); refused there, rank 0 exited 2 while its peers
# waited for it in the rendezvous until srun killed them, and the job ended 137.
check_free() {
  check_with pipeline.run_lock check_free RunDirError "$2" "$1"
}

# require NAME MESSAGE: the variable must be set and not empty, else the job ends with MESSAGE
# (in this file's format and exit code, not bash's ${NAME:?} line naming the spool copy).
require() {
  [[ -n "${!1:-}" ]] || die "$2"
}

# The folder of the repository the job runs: REPO, else the folder sbatch ran in.
# (SLURM runs a copy of the script from its spool folder, so $0 does not tell.)
find_repo() {
  : "${SLURM_JOB_ID:?not inside a SLURM job: submit this script with sbatch}"
  REPO=${REPO:-$SLURM_SUBMIT_DIR}
  [[ -f "$REPO/pipeline/pretrain.py" ]] ||
    die "REPO=$REPO is not the bert-pipeline repository: submit from its root or set REPO"
}

# Sources SETUP (module loads, a virtualenv, a conda env) and checks the interpreter.
setup_python() {
  if [[ -n "${SETUP:-}" ]]; then
    [[ -f "$SETUP" ]] || die "SETUP=$SETUP does not exist"
    # Activation scripts (conda's activate.d among them) read unset variables: not under -eu.
    local rc=0
    set +eu
    # shellcheck disable=SC1090
    source "$SETUP" || rc=$?
    set -eu
    ((rc == 0)) || die "SETUP=$SETUP failed (exit $rc)"
  fi
  PYTHON=${PYTHON:-python}
  command -v "$PYTHON" >/dev/null ||
    die "PYTHON=$PYTHON not found on PATH: activate the project's environment before sbatch, or set SETUP or PYTHON"
  export PYTHONUNBUFFERED=1 # log lines reach slurm-%j.out as they happen
}

# torch serializes JIT builds of DeepSpeed's ops (the CPU comm op, FusedAdam, …) across
# processes with a `lock` file in the extensions folder; a process killed while holding it
# (a job stopped during its first, cold build) leaves it behind, and every later job then
# waits on it forever. Warn about old ones; whether one is stale only the user can tell.
warn_stale_build_locks() {
  local folder=${TORCH_EXTENSIONS_DIR:-${HOME:-/root}/.cache/torch_extensions} lock
  [[ -d "$folder" ]] || return 0
  while IFS= read -r lock; do
    log "warning: $lock is over an hour old; if no job is compiling ops now, delete it, or the ranks wait on it forever"
  done < <(find "$folder" -maxdepth 3 -name lock -mmin +60 2>/dev/null)
}

# MASTER_ADDR: the first node of the job as the other nodes reach it. A node's NodeAddr is
# what slurmd itself is contacted at; NodeName often resolves too, but need not.
set_master() {
  local first addr
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p) # sed reads all: no SIGPIPE
  addr=$(scontrol show node "$first" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p') || addr="" # NodeName then
  if [[ -n "${MASTER_ADDR:-}" && "$MASTER_ADDR" != "${addr:-$first}" && "$MASTER_ADDR" != "$first" ]]; then
    # sbatch passes the submitting shell's environment on: one left by torchrun or salloc
    log "warning: MASTER_ADDR=$MASTER_ADDR from the environment is not this job's first node ($first):" \
      "the ranks meet there; unset it before sbatch unless that is meant"
  fi
  export MASTER_ADDR=${MASTER_ADDR:-${addr:-$first}}
  if [[ -n "${MASTER_PORT:-}" ]]; then
    if [[ "${SLURMD_NODENAME:-}" != "$first" ]] || ! port_in_use "$MASTER_PORT"; then
      export MASTER_PORT
      return
    fi
    # One left in the submitting shell by torchrun (29500): every rank's rendezvous would fail to bind
    log "warning: MASTER_PORT=$MASTER_PORT from the environment is in use on $first: choosing a free port" \
      "(unset MASTER_PORT before sbatch to let this script choose)"
  fi
  # Below the Linux ephemeral range (32768+) and unique among running jobs unless their ids are
  # 15000 apart; a requeued job keeps its id and so its port. This shell runs on the first node
  # (SLURM's batch host), where rank 0 listens: a port taken there (another job sharing the node,
  # any other server) moves on to the next free one, rather than failing every rank's rendezvous.
  local default=$((15000 + SLURM_JOB_ID % 15000)) port next tries=0
  port=$default
  if [[ "${SLURMD_NODENAME:-}" == "$first" ]]; then
    while port_in_use "$port"; do
      tries=$((tries + 1))
      if ((tries > 100)); then
        log "warning: ports $default and the 100 after it are in use on $first: using $default; set MASTER_PORT"
        port=$default
        break
      fi
      next=$((port < 29999 ? port + 1 : 15000))
      log "port $port is in use on $first: trying $next"
      port=$next
    done
  fi
  export MASTER_PORT=$port
}

# port_in_use PORT: something listens on PORT on this node (a bind fails with EADDRINUSE; any
# other failure of the probe counts as free, and the rendezvous itself will say what is wrong).
port_in_use() {
  local code=0
  "$PYTHON" -c 'import errno, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the rendezvous store binds: TIME_WAIT is free
try:
    s.bind(("", int(sys.argv[1])))
except OSError as err:
    sys.exit(1 if err.errno == errno.EADDRINUSE else 0)' "$1" 2>/dev/null || code=$?
  ((code == 1))
}

# srun_ranks CMD...: one task per rank on every node, in the background (SRUN_PID).
# Tasks per node come from the job (--ntasks-per-node); SRUN_ARGS adds srun options.
srun_ranks() {
  [[ -z "$_EARLY_SIGNAL" ]] || stopped_before_ranks
  local -a extra=()
  read -r -a extra <<<"${SRUN_ARGS:-}"
  # srun does not inherit the job's --cpus-per-task (SLURM >= 22.05).
  if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}
  fi
  # The rank variables torch.distributed reads, from the task's SLURM variables; exec
  # makes the Python process the task itself, so SLURM's signals reach it directly.
  # --kill-on-bad-exit=1: the first task to exit non-zero ends the step (SIGTERM, then SIGKILL
  # after KillWait), so a failed rank's peers do not wait for it in a collective until the
  # process-group timeout (NCCL does not notice a dead peer; gloo does). A non-zero exit is never
  # early: after a stop (3) or an agreed failure, pretrain.py's ranks meet at a final barrier once
  # rank 0 has written its checkpoint and closed its MLflow run, then all exit at once; after a
  # stop, finetune.py's ranks do the same (128 + the signal, no checkpoint).
  # shellcheck disable=SC2016
  # --wait=0: no site WaitTime may end the ranks still at work once one has exited 0 (rank 0
  # writes the export, fine-tuning's rank 0 the model, after the others are done).
  # ${a[@]+"${a[@]}"}: an empty array under set -u is an unbound variable to bash before 4.4 (RHEL 7)
  srun --label --kill-on-bad-exit=1 --wait=0 ${extra[@]+"${extra[@]}"} bash -c \
    'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' rank "$@" &
  SRUN_PID=$!
}

STOP_SIGNAL=""
_SIGNALLED=0

_forward() {
  # A SIGTERM (scancel, the time limit) stays the reason: a later USR1 (the time limit's warning)
  # must not turn a cancelled job into a requeued one.
  [[ "$STOP_SIGNAL" == TERM ]] || STOP_SIGNAL=$1
  _SIGNALLED=1
  log "received SIG$1: ${ON_STOP:-every rank checkpoints at the end of its current step, then exits 3}"
  # As USR1 whatever came (the ranks treat both alike): srun passes USR1 on to every task, but
  # answers SIGTERM by SIGKILLing them ("forcing job termination"), before any checkpoint.
  kill -s USR1 "$SRUN_PID" 2>/dev/null || true
}

# Waits for the srun started by srun_ranks, forwarding USR1 and TERM to it; returns srun's
# exit status. A shell runs no trap while a foreground command runs, hence srun in the
# background and `wait`, which a trapped signal interrupts: then wait again, for srun's own.
wait_forwarding_signals() {
  local code
  trap '_forward USR1' USR1
  trap '_forward TERM' TERM
  [[ -z "$_EARLY_SIGNAL" ]] || _forward "$_EARLY_SIGNAL"  # came while srun started
  while :; do
    _SIGNALLED=0
    code=0
    wait "$SRUN_PID" || code=$?
    ((_SIGNALLED)) || break
  done
  # srun is gone: a USR1 now (a repeated scancel --signal=USR1) would kill this shell before it
  # requeues a job whose ranks checkpointed; ignored instead. TERM keeps its default: the job ends.
  trap '' USR1
  trap - TERM
  return "$code"
}

# After the ranks ended: 0 ends the job; 3 (checkpointed on a stop signal) requeues it; a rank
# killed by USR1 itself (before the trainer installed its handler) too, since resume starts
# from the newest complete checkpoint. Not when this shell got a SIGTERM: SLURM sends it to
# the whole job for `scancel` and at the time limit, where the job must end. (Preemption with
# GraceTime sends SIGTERM to the ranks only: they exit 3 and the job requeues, also under
# PreemptMode=CANCEL, tested.) Anything else is a failure.
finish_or_requeue() {
  local code=$1
  if ((code == 0)); then
    log "finished"
    exit 0
  fi
  if ((code != 3 && code != 128 + 10)) && [[ "$STOP_SIGNAL" != USR1 || $code -lt 128 ]]; then
    log "failed: the ranks exited with code $code (see the lines above)"
    exit "$code"
  fi
  if [[ "$STOP_SIGNAL" == TERM ]]; then
    log "stopped by SIGTERM with a checkpoint (exit $code): not requeued (scancel, time limit or preemption);" \
      "resubmit with the same RUN_DIR to continue"
    exit "$code"
  fi
  if ((code == 3)); then
    requeue "stopped with a checkpoint (exit 3)"
  fi
  requeue "the ranks were stopped by USR1 before the trainer could checkpoint (exit $code)"
}

# requeue WHY: scontrol requeue (up to MAX_REQUEUES), then exit 3.
requeue() {
  local restarts=${SLURM_RESTART_COUNT:-0}
  MAX_REQUEUES=${MAX_REQUEUES:-20}
  if ((restarts >= MAX_REQUEUES)); then
    log "$1; not requeued: requeued $restarts times already (MAX_REQUEUES=$MAX_REQUEUES)"
    exit 3
  fi
  log "$1: requeueing; the job resumes from its newest checkpoint"
  scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed: resubmit with the same RUN_DIR to continue"
  exit 3
}

# A stop signal came before the ranks started: nothing to checkpoint. USR1 (the time limit's, or
# scancel --batch --signal=USR1) requeues; TERM (scancel) ends the job.
stopped_before_ranks() {
  if [[ "$_EARLY_SIGNAL" == TERM || -n "${NO_REQUEUE:-}" ]]; then
    log "received SIG$_EARLY_SIGNAL before the ranks started: not started, not requeued"
    exit $((128 + $(kill -l "$_EARLY_SIGNAL")))
  fi
  STOP_SIGNAL=USR1
  requeue "received SIGUSR1 before the ranks started (nothing to checkpoint)"
}

# Before the ranks start: one rank per GPU (ranks per node = --ntasks-per-node, sets
# RANKS_PER_NODE), the interpreter, the rendezvous address, stale build locks, NCCL's logging.
prepare_ranks() {
  local gpus=${SLURM_GPUS_PER_NODE:-0}
  gpus=${gpus##*:} # "a100:8" -> 8
  RANKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-$((SLURM_NTASKS / SLURM_JOB_NUM_NODES))}
  if ((gpus > 0 && gpus != RANKS_PER_NODE)); then
    die "--gpus-per-node=$gpus but --ntasks-per-node=$RANKS_PER_NODE: one rank per GPU, set both to the same number"
  fi
  setup_python
  set_master
  warn_stale_build_locks
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
}
