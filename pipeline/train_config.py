"""The pretraining flags, parsed into one frozen config; cross-field checks name the flag."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence

from pipeline import hf_init
from pipeline.engine import (EngineConfig, EngineConfigError, add_engine_flags, add_launcher_flag, nest,
                             parse_stage_flags)
from preprocessing import cli_parser
from preprocessing.mlflow_experiment import HELP as EXPERIMENT_HELP, experiment_flag

# Pretraining's own defaults for the engine settings whose good values differ between the stages.
ENGINE_DEFAULTS = {"micro_batch_size": 8, "learning_rate": 5e-4}


class TrainConfigError(EngineConfigError):
    """A bad flag value; the message names the flag."""


DEFAULT_MODEL = "tiny"  # the preset, unless a Hugging Face --init-from brings its own config.json


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data: str
    run_dir: str = "runs/pretrain"
    model: str | None = DEFAULT_MODEL  # None (the command line's): DEFAULT_MODEL, or an HF --init-from's config.json
    engine: EngineConfig = dataclasses.field(default_factory=lambda: EngineConfig(**ENGINE_DEFAULTS))
    steps: int = 100
    warmup_steps: int | None = None  # None: a tenth of --steps
    log_every: int = 10
    checkpoint_every: int = 0
    checkpoint_minutes: float = 0.0
    keep_checkpoints: int = 2
    resume: str = "auto"
    peak_tflops: float = 0.0
    eval_shards: int | None = None  # None: 1 when the data has 2+ shards, else 0
    eval_every: int = 0
    eval_batches: int = 50
    init_from: str | None = None
    mlflow: bool = True
    experiment: str | None = None  # None: $MLFLOW_EXPERIMENT_NAME, else bert-pipeline (preprocessing/mlflow_experiment.py)
    run_name: str | None = None
    data_cache: str | None = None  # None: DATA/flat
    compile: bool = False

    def __post_init__(self):
        if self.init_from and not os.path.exists(self.init_from):
            # before: the default preset silently, then a resume's "saved with --model giving
            # {hidden_size: 128}, this run has 64" when a published BERT's folder had moved
            raise TrainConfigError(f"--init-from {self.init_from}: no such file or directory: name a pretrain.py "
                                   "run dir (or its checkpoints/, or one checkpoint) or a Hugging Face BERT folder "
                                   "(config.json and weights); a resume of a run continued from it needs it too, "
                                   "for its architecture")
        if self.model is None:
            # Continued pretraining of a Hugging Face BERT: its own architecture. Resolved here, so that
            # train_config.json (what the export rebuilds the model from) records it.
            object.__setattr__(self, "model", hf_init.config_path(self.init_from)
                               if hf_init.is_hf_dir(self.init_from) else DEFAULT_MODEL)
        if self.warmup_steps is None:
            object.__setattr__(self, "warmup_steps", self.steps // 10)
        checks = [
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (0 <= self.warmup_steps <= self.steps,
             f"--warmup-steps must be in [0, --steps={self.steps}], got {self.warmup_steps}"),
            (self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}"),
            (self.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {self.checkpoint_every}"),
            (self.checkpoint_minutes >= 0, f"--checkpoint-minutes must be >= 0, got {self.checkpoint_minutes}"),
            (self.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.eval_shards is None or self.eval_shards >= 0,
             f"--eval-shards must be >= 0, got {self.eval_shards}"),
            (self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}"),
            (self.eval_batches >= 0, f"--eval-batches must be >= 0, got {self.eval_batches}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainConfigError(message)

    @classmethod
    def from_flat(cls, **values) -> TrainConfig:
        """From the flags' flat names (``learning_rate=…`` rather than ``engine=EngineConfig(…)``)."""
        return cls(**nest(values, ENGINE_DEFAULTS))

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.run_dir, "checkpoints")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(data="")
    e = d.engine
    p = cli_parser.Parser(
        prog="python pipeline/pretrain.py",
        description="Pretrain BERT (MLM + NSP, or MLM alone, as the data was made) with DeepSpeed on the shards of preprocessing/run_beam.py. "
                    "Runs as one process, or under torchrun / deepspeed / srun (one process per GPU).",
        formatter_class=cli_parser.DefaultsFormatter)
    p.add_argument("--data", required=True, help="data dir written by preprocessing/run_beam.py")
    p.add_argument("--data-cache",
                   help="where the data dir's shards are converted once into flat memory-mapped arrays "
                        "(default: DATA/flat; pass one for a read-only data dir, or to put them on local disk)"
                        "%(default).0s")
    p.add_argument("--run-dir", default=d.run_dir, help="checkpoints/, latest and the export go here")
    p.add_argument("--model", default=None,
                   help=f"preset (tiny, mini, small, base, large) or a config.json (default: {DEFAULT_MODEL}; with a "
                        "Hugging "
                        "Face --init-from, the directory's config.json, and an explicit one must match it)"
                        "%(default).0s")  # an empty format: no "(default: None)" after the real default
    add_engine_flags(p, e, seed_help="weight initialisation, dropout, data order and dynamic masks")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup, then linear decay to 0 at --steps (default: a tenth of --steps)%(default).0s")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between metric logs")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="steps between checkpoints (0 = only at the end and on a stop signal)")
    p.add_argument("--checkpoint-minutes", type=float, default=d.checkpoint_minutes,
                   help="also checkpoint when this many minutes have passed since the last save (0 = off); "
                        "bounds the work a crash loses, whatever the step time")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                   help="complete checkpoints kept in RUN_DIR/checkpoints (older ones are deleted)")
    p.add_argument("--resume", default=d.resume,
                   help="auto (newest complete checkpoint in --run-dir, if any), none, or a checkpoint: its step "
                        "(3000) or tag (step00003000)")
    p.add_argument("--peak-tflops", type=float, default=d.peak_tflops,
                   help="the hardware's dense peak TFLOP/s per process, to report mfu_model and mfu_executed "
                        "(0 = not reported; bf16/fp16 on H100 SXM and H200: 989.5, A100: 312)")
    p.add_argument("--eval-shards", type=int, default=None,
                   help="the data dir's last N shards are held out of training and evaluated on "
                        "(default: 1 when the data has 2 or more shards, else 0 = no evaluation)%(default).0s")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="steps between evaluations on the held-out shards (0 = only at the end)")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches,
                   help="global batches' worth of held-out rows per evaluation (0 = all held-out rows); the "
                        "same rows for any number of processes")
    p.add_argument("--init-from",
                   help="start from the weights of another run's checkpoint (a run dir, its checkpoints/ "
                        "or one tag dir) with a fresh optimizer and schedule: phase 2 (seq 512) after "
                        "phase 1 (seq 128); or from a Hugging Face BERT directory (config.json + "
                        "model.safetensors or pytorch_model.bin, e.g. a downloaded bert-base-chinese or "
                        "RUN_DIR/hf/<tag>): continued pretraining, with the directory's architecture and a "
                        "corpus preprocessed with its tokenizer. Ignored when --run-dir already has a "
                        "checkpoint to resume")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder (Inductor). Batches are then padded to the data's "
                        "max_seq_length so that one graph serves every step; the first steps are slower "
                        "while it compiles. Checkpoints and exports are the same as without it. Not with a ZeRO "
                        "stage 3 config, whose parameter gathering keeps the layers from compiling")
    p.add_argument("--no-mlflow", dest="mlflow", action="store_false", help="log no MLflow run")
    p.add_argument("--experiment", type=experiment_flag, default=d.experiment, help=EXPERIMENT_HELP)
    p.add_argument("--run-name", help="MLflow run name (default: MLflow's generated one)")
    add_launcher_flag(p)
    return p


def parse_args(argv: Sequence[str] | None) -> TrainConfig:
    return parse_stage_flags(build_parser(), argv, TrainConfig)
