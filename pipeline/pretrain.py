"""Pretrain BERT (MLM + NSP, or MLM alone) with DeepSpeed on the shards of preprocessing/run_beam.py.

    python pipeline/pretrain.py --data output/data --run-dir runs/tiny --steps 200
    torchrun --nproc_per_node 8 pipeline/pretrain.py --data … --model base \
        --ds-config ds_configs/gpu_base_bf16_zero1_fused-adam.json --global-batch-size 4096

Exit code 2 with one line naming the flag, file or field for a bad data dir, DeepSpeed config,
model or checkpoint; 0 when --steps are done (rank 0 then exports the last checkpoint in Hugging Face
format to RUN_DIR/hf/<tag>, see pipeline/export.py); 3 when a stop signal (SIGTERM/SIGUSR1, Ctrl-C) was honoured
with a checkpoint, so a scheduler can requeue the job and --resume auto continues it; 1 on a failure
(a write that fails, e.g. on a full disk, is one `error: …` line naming the file).
A failure on one rank ends every rank in bounded time: a non-finite loss is agreed, so all raise it
at the same step; a rank that raises exits at once, and its peers' collectives fail (gloo) or the
launcher ends them (torchrun, deepspeed, srun --kill-on-bad-exit=1); --dist-timeout-minutes bounds
the rest (a rank that hangs without exiting).
"""

import logging
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: see pipeline/__init__.py
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from pipeline.checkpoint import CheckpointError, CheckpointWriteError  # noqa: E402
from pipeline.data_dir import DataDirError  # noqa: E402
from pipeline.ds_config import DsConfigError  # noqa: E402
from pipeline.engine import LaunchError, end_distributed, ensure_distributed_env, exit_now  # noqa: E402
from pipeline.export import ExportError, export_checkpoint, write_train_config  # noqa: E402
from pipeline.model import ModelConfigError  # noqa: E402
from pipeline.run_lock import RunDirError, acquire  # noqa: E402
from pipeline.tracking import Tracker, architecture_params, config_params  # noqa: E402
from pipeline.train_config import parse_args  # noqa: E402
from pipeline.trainer import NonFiniteLoss, Trainer  # noqa: E402
from preprocessing.mlflow_experiment import TrackingServerError, check_tracking  # noqa: E402
from preprocessing.write_failure import WriteFailure  # noqa: E402

USER_ERRORS = (DataDirError, DsConfigError, ModelConfigError, ExportError, CheckpointError, LaunchError,
               RunDirError, TrackingServerError)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    lock = None
    try:
        try:
            # Rank 0 holds the run dir until the run ends: a second run into it is refused here, and
            # the other ranks check that they see the same folder (pipeline/run_lock.py).
            is_rank0 = ensure_distributed_env("slurm/pretrain.sh")[0] == 0
            if config.mlflow and is_rank0:
                check_tracking(config.experiment)
            lock = acquire(config.run_dir) if is_rank0 else None
            trainer = Trainer(config)
        except USER_ERRORS as err:  # a bad flag, data dir or checkpoint: one line that names it, no traceback
            print(f"error: {err}", file=sys.stderr)
            if lock:  # refused before any output: no run dir left behind that was not there
                lock.abandon()
            return 2
        return train(config, trainer)
    finally:  # whatever happened: an in-process caller may start another run in this run dir
        if lock:
            lock.release()


def summary(trainer: Trainer, export: str, seconds: float) -> str:
    """The run's last line: where its step, checkpoint, held-out figures and export are."""
    held_out = trainer.final_eval
    figures = (f"; held-out loss {held_out['eval_loss']:.4f}, MLM accuracy {held_out['eval_mlm_accuracy']:.4f}"
               if held_out else "")
    took = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
    return (f"finished at step {trainer.step} in {took}: checkpoint "
            f"{os.path.join(trainer.config.checkpoint_dir, os.path.basename(export))}{figures}; export {export}")


def train(config, trainer: Trainer) -> int:
    """Trains, exports on rank 0, and tracks it in MLflow; the exit code."""
    done = trainer.finished_export()
    if done:
        if trainer.is_rank0:
            logging.getLogger(__name__).warning(
                "%s already finished: its checkpoint %s is at step %d (--steps %d) and exported to %s; nothing to "
                "do, no MLflow run logged (raise --steps to train on, or remove that export to evaluate and "
                "export the checkpoint again)", config.run_dir, trainer.resume_tag, trainer.step, config.steps, done)
        return 0
    tracker = None
    if config.mlflow and trainer.is_rank0:
        # An id that is not known (preprocessed with --no-mlflow) is left out, not written as "None".
        tags = {"data_run_id": str(trainer.manifest["data_run_id"])} if trainer.manifest.get("data_run_id") else {}
        if trainer.init_info:  # phase 2 or continued pretraining (resumed too): the weights it began from
            tags["init_from"] = str(trainer.init_info["init_from"])
            if trainer.init_info.get("init_from_run_id"):  # a published model has none
                tags["init_from_run_id"] = str(trainer.init_info["init_from_run_id"])
        if trainer.resumed_from_run_id:  # a resume: the run whose checkpoint it continues, and its step
            tags["resumed_from_run_id"] = str(trainer.resumed_from_run_id)
            tags["resumed_at_step"] = str(trainer.step)
        tracker = Tracker("pretrain", config.experiment, config.run_name, tags)
        trainer.run_id = tracker.run_id
        if trainer.resumed_from_run_id:
            tracker.end_stale(str(trainer.resumed_from_run_id))
        tracker.log_params({**config_params(config), "world_size": trainer.world_size,
                            "accumulation_steps": trainer.batches.accumulation_steps,
                            "eval_shards_used": trainer.eval_shards, "train_rows": trainer.train_rows,
                            **architecture_params(trainer.model_config, trainer.parameters)})
        tracker.log_json(trainer.ds_config, "ds_config.json")
        tracker.log_json(trainer.model_config.to_dict(), "model_config.json")
    status, code, agreed, started = "FAILED", 1, True, time.monotonic()
    try:
        if trainer.is_rank0:
            write_train_config(config, tracker.run_id if tracker else None)  # what the export rebuilds from
        code = trainer.train(tracker)
        if tracker and trainer.final_eval:
            tracker.log_json(trainer.final_eval, "final_eval.json")
        # The export reads the saved checkpoint files only (no collectives): rank 0 alone writes it,
        # after save()'s barriers have put every rank's shards on disk. The other ranks exit 0 meanwhile,
        # which ends no one; if the export fails, rank 0 alone exits 1 and nobody waits for it.
        if code == 0 and trainer.is_rank0:
            out = export_checkpoint(config.run_dir)
            logging.getLogger(__name__).info("Hugging Face export: %s", out)
            logging.getLogger(__name__).info("%s", summary(trainer, out, time.monotonic() - started))
        status = "FINISHED" if code == 0 else "KILLED"
    except NonFiniteLoss as err:  # raised by every rank at the same step: one line each, no traceback
        print(f"error: rank {trainer.rank}: {err}", file=sys.stderr)
    # A full disk, or another job in the run dir (rank 0 only): one line; the newest checkpoint resumes
    except (CheckpointWriteError, WriteFailure, RunDirError) as err:
        code = 1  # also after a finished training whose export failed
        print(f"error: rank {trainer.rank}: {err}", file=sys.stderr)
        # Not agreed with the other ranks (they may have written their files): this rank exits at once
        # and the launcher ends its peers, as for any failed rank; the barrier below would not match.
        agreed = False
    finally:
        if tracker:
            tracker.finish(status)
    # After a stop (3) or an agreed failure every rank is here. Under srun --kill-on-bad-exit=1 the first
    # rank to exit non-zero ends the others: none may leave before rank 0 has finished its MLflow run.
    if code != 0 and agreed and trainer.world_size > 1:
        torch.distributed.barrier()
    return code


def cli() -> None:
    """The command (``python pipeline/pretrain.py``, the ``bert-pretrain`` console script)."""
    try:
        exit_code = main()
    except Exception:
        sys.excepthook(*sys.exc_info())  # torch.distributed's hook prefixes each line with [rankN]
        exit_code = 1
    if exit_code != 0:
        exit_now(exit_code)  # after a stop, a rank killed while tearing down would turn the job's 3 into 137
    end_distributed()
    sys.exit(exit_code)


if __name__ == "__main__":
    cli()
