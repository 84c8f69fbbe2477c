"""Fine-tune a BERT from pipeline/pretrain.py on a labelled text task, with DeepSpeed.

    python pipeline/finetune.py --model runs/tiny --data reviews.csv.bz2 --label-column category \
        --drop-label plot
    deepspeed pipeline/finetune.py --model runs/base128/hf/step00007038 --train train.tsv \
        --validation dev.tsv --test dev.tsv --text-column sentence1 --text-pair-column sentence2 \
        --label-column score --task regression --ds-config ds_configs/gpu_base_bf16_zero1_fused-adam.json \
        --register-name sts-b

Writes OUTPUT_DIR/model (Hugging Face, best validation epoch, label mapping in its config),
report.json (test metrics, confusion matrix), confusion_matrix.png and, for each --predict
input, predictions/NAME.tsv (GLUE's submission format); rank 0 logs one MLflow
run (stage=finetune, tags pretrain_run_id and data_run_id). Exit code 0, or 2 with one line
naming the file, row or flag for bad data, flags or model; 128 + N after stop signal N
(SIGTERM, SIGUSR1: SLURM's time limit, scancel, preemption), on every rank at the same
optimizer step, its MLflow run KILLED. Fine-tuning keeps no mid-run checkpoint: a stopped run
is started again.
"""

import logging
import os
import sys

if __package__ in (None, ""):  # run as a file: see pipeline/__init__.py
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pipeline.ds_config import DsConfigError  # noqa: E402
from pipeline.engine import LaunchError, end_distributed, ensure_distributed_env, exit_now  # noqa: E402
from pipeline.finetuning.config import FinetuneConfigError, check_output_dir, parse_args  # noqa: E402
from pipeline.finetuning.data import FinetuneDataError  # noqa: E402
from pipeline.finetuning.model import ModelSourceError  # noqa: E402
from pipeline.finetuning.report import log_to_mlflow, write_report  # noqa: E402
from pipeline.run_lock import RunDirError, acquire  # noqa: E402
from pipeline.tracking import Tracker, config_params, data_params  # noqa: E402
from preprocessing.mlflow_experiment import TrackingServerError, check_tracking  # noqa: E402
from preprocessing.write_failure import WriteFailure, writing  # noqa: E402

AGAIN = "fine-tune again (fine-tuning keeps no checkpoint)"
USER_ERRORS = (FinetuneDataError, ModelSourceError, FinetuneConfigError, DsConfigError, LaunchError,
               TrackingServerError, RunDirError)


def start_tracking(config, finetuner) -> tuple[Tracker, dict[str, str]]:
    """Rank 0's MLflow run: lineage tags, every flag and what the data and engine made of them; and
    the tags a registered version of its model is to carry (``version_description``)."""
    data = finetuner.data
    # The runs the model came from, those that are known; from a fine-tuned model, its run too.
    tags = {("parent_finetune_run_id" if k == "finetune_run_id" else k): v for k, v in finetuner.lineage.items()}
    tracker = Tracker("finetune", config.experiment, config.run_name, tags)
    flags = config_params(config)
    del flags["mlflow"]  # a run that logs it has it on
    labelled = data_params(data=config.data, train=config.train, validation=config.validation, test=config.test)
    tracker.log_params({**flags, "world_size": finetuner.world_size,
                        "accumulation_steps": finetuner.batches.accumulation_steps,
                        # what a flag left to the data or the model came to, under the flag's own name
                        "task": data.task, "metric": finetuner.metric, "max_seq_length": finetuner.max_length,
                        "labels": ",".join(data.labels), "model_dir": finetuner.hf_dir,
                        **labelled,
                        **{f"rows_{name}": len(split) for name, split in finetuner.splits.items()},
                        **{f"rows_dropped_{name}": n for name, n in data.dropped.items()}})
    tracker.log_json(finetuner.ds_config, "ds_config.json")
    return tracker, {**tags, "task": data.task, "metric": finetuner.metric, "data_sha256": labelled["data_sha256"]}


def version_description(labels: list[str], report: dict, run_id: str, tags: dict[str, str]
                        ) -> tuple[str, dict[str, str]]:
    """What a registered version says of itself: a line, and the run's lineage and test scores as tags."""
    test, metric = report["test"], report["metric"]
    classes = f" ({', '.join(labels)})" if labels else ""
    return (f"{report['task']}{classes} fine-tuned from {report['model']}: test {metric} {test[metric]:.4f} on "
            f"{report['rows']['test']} rows; MLflow run {run_id}",
            {**tags, **{f"test_{name}": f"{value:.4f}" for name, value in test.items()}})


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    lock = None
    try:
        try:
            if ensure_distributed_env("slurm/finetune.sh")[0] == 0:
                if config.mlflow:
                    check_tracking(config.experiment)
                # Rank 0 holds OUTPUT_DIR until the run ends: a second fine-tuning into it would clear
                # this one's outputs at its start (pipeline/run_lock.py).
                check_output_dir(config.output_dir, config.model)
                lock = acquire(config.output_dir, "--output-dir")
            from pipeline.finetuning.trainer import Finetuner

            finetuner = Finetuner(config)  # from here a stop signal is agreed on at the next optimizer step
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            if lock:  # refused before any output: no folder left behind that was not there
                lock.abandon()
            return 2
        except WriteFailure as err:  # exporting a run dir's checkpoint into OUTPUT_DIR/pretrained on a full disk
            print(f"error: {err}", file=sys.stderr)
            return 1
        return finetune(config, finetuner)
    finally:  # whatever happened: an in-process caller may fine-tune into this folder again
        if lock:
            lock.release()


def finetune(config, finetuner) -> int:
    """Trains, tests, saves and reports on rank 0; the exit code."""
    from pipeline.finetuning.trainer import Diverged, Stopped

    tracker, status, unregistered = None, "FAILED", False
    try:
        if config.mlflow and finetuner.is_rank0:
            tracker, version_tags = start_tracking(config, finetuner)
        best = finetuner.train(tracker)
        report = finetuner.test_report()  # every rank: the test pass is all-gathered
        report["predictions"] = finetuner.write_predictions(config.output_dir)  # every rank, as the test pass
        if finetuner.is_rank0:
            model_dir = os.path.join(config.output_dir, "model")
            with writing("the fine-tuned model", model_dir, AGAIN):
                finetuner.save_model(model_dir, report["test"])
            with writing("the report", config.output_dir, f"the model is saved in {model_dir}; fine-tune again for "
                                                          "its report"):
                paths = write_report(report, config.output_dir)
            test = "  ".join(f"{k}={v:.4f}" for k, v in report["test"].items())
            print(f"best epoch {best.epoch} (validation {finetuner.metric} {best.validation[finetuner.metric]:.4f}); "
                  f"test: {test}\nmodel: {model_dir}\nreport: {paths[0]}", flush=True)
            for written in report["predictions"].values():
                print(f"predictions: {os.path.join(config.output_dir, written['file'])} ({written['rows']} rows of "
                      f"{written['from']})", flush=True)
            if tracker:
                tracker.log_metrics({f"test/{k}": v for k, v in report["test"].items()}, best.epoch)
                what = "the report, predictions and model" + (
                    f" (to be registered as {config.register_name})" if config.register_name else "")
                logged = tracker.attempt(what, log_to_mlflow, tracker, paths,
                                         model_dir if config.log_model else None, finetuner.task, config.register_name,
                                         finetuner.max_length, finetuner.convert,
                                         [os.path.join(config.output_dir, w["file"])
                                          for w in report["predictions"].values()],
                                         version_description(finetuner.data.labels, report, tracker.run_id,
                                                             version_tags) if config.register_name else None)
                if config.register_name and not logged:  # asked for: its failure is the run's
                    unregistered = True
                    print(f"error: the model is saved in {model_dir}, but MLflow did not register it as "
                          f"{config.register_name} (the warning above says why)", file=sys.stderr)
        status = "FINISHED"
        end_distributed()
        return 1 if unregistered else 0
    except Stopped as stop:  # raised by every rank at the same optimizer step
        status, code = "KILLED", 128 + stop.signum
        print(f"error: stopped by {stop}: fine-tuning keeps no checkpoint; run it again to fine-tune",
              file=sys.stderr)
    except Diverged as err:  # raised by every rank at the same step (reduced or agreed values): one line each
        code = 1
        print(f"error: rank {finetuner.rank}: {err}", file=sys.stderr)
    except WriteFailure as err:  # rank 0 alone (a full disk): one line; the other ranks have left
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if tracker:
            tracker.finish(status)
    # Every rank is here. Under srun --kill-on-bad-exit=1 the first rank to exit non-zero ends the
    # others: none may leave before rank 0 has ended its MLflow run.
    if finetuner.world_size > 1:
        import torch

        torch.distributed.barrier()
    return code


def cli() -> None:
    """The command (``python pipeline/finetune.py``, the ``bert-finetune`` console script)."""
    exit_code = main()
    if exit_code != 0:
        exit_now(exit_code)  # after a stop the ranks leave the barrier together
    sys.exit(exit_code)


if __name__ == "__main__":
    cli()
