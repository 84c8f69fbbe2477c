"""The fine-tuning flags, parsed into one frozen config; cross-field checks name the flag."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence

from pipeline.engine import (EngineConfig, EngineConfigError, add_engine_flags, add_launcher_flag, nest,
                             parse_stage_flags)
from pipeline.metrics import METRICS
from preprocessing import cli_parser
from preprocessing.mlflow_experiment import HELP as EXPERIMENT_HELP, experiment_flag

# Fine-tuning's own defaults for the engine settings whose good values differ between the stages.
ENGINE_DEFAULTS = {"micro_batch_size": 32, "learning_rate": 5e-5}
BEST_METRIC = {"classification": "accuracy", "regression": "pearson"}


def check_output_dir(output_dir: str, model: str) -> None:
    """Refuses an --output-dir that fine-tuning would damage: a file, the pretraining run dir it
    reads (its metrics.jsonl would be replaced by fine-tuning's), or --model itself."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FinetuneConfigError(f"--output-dir {output_dir}: a file, not a folder")
    if os.path.realpath(output_dir) == os.path.realpath(model):
        raise FinetuneConfigError(f"--output-dir {output_dir} is --model itself: fine-tuning writes model/, "
                                  "report.json and metrics.jsonl there; pass another folder")
    if os.path.realpath(model) == os.path.realpath(os.path.join(output_dir, "model")):
        raise FinetuneConfigError(f"--model {model} is the model/ that fine-tuning into --output-dir {output_dir} "
                                  "replaces (with the report its lineage is read from); pass another --output-dir")
    held = [name for name in ("checkpoints", "train_config.json") if os.path.exists(os.path.join(output_dir, name))]
    if held:
        raise FinetuneConfigError(f"--output-dir {output_dir} is a pretraining run dir (it holds {held[0]}): "
                                  "fine-tuning's metrics.jsonl would replace the run's; pass another folder")


def prediction_name(spec: str) -> str:
    """The name a --predict input's predictions are written under: a file's name without its
    extensions (dev.tsv.gz → dev), or a split's name (test_matched)."""
    name = os.path.basename(os.path.normpath(spec))
    for suffixes in ((".gz", ".bz2", ".xz", ".zst"), (".csv", ".tsv", ".jsonl", ".json", ".parquet")):
        stem, ext = os.path.splitext(name)
        if ext in suffixes and stem:
            name = stem
    return name


class FinetuneConfigError(EngineConfigError):
    """A bad flag value; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    model: str  # a Hugging Face export, or a pretrain run dir / checkpoints dir / checkpoint tag dir
    tokenizer: str | None = None  # None: the model dir's own tokenizer
    init: str = "pretrained"  # or "random": the same architecture and tokenizer, untrained (a baseline)
    reinit_pooler: bool = False
    data: str | None = None
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    validation_split: str | None = None  # a saved DatasetDict's split to validate on (MNLI's validation_matched)
    test_split: str | None = None
    predict: tuple[str, ...] = ()  # files, or splits of --data, to write predictions for
    predict_as: str = "label"  # or "id": the class index (a ClassLabel's own id; GLUE's server wants 0/1 for SST-2)
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    task: str | None = None  # None: inferred from the train labels
    drop_labels: tuple[str, ...] = ()
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int | None = None  # None: --seed
    max_seq_length: int | None = None  # None: the tokenizer's (the pretraining sequence length)
    output_dir: str = "runs/finetune"
    engine: EngineConfig = dataclasses.field(default_factory=lambda: EngineConfig(**ENGINE_DEFAULTS))
    eval_batch_size: int = 128
    group_by_length: bool = False  # train batches of rows of like length (pipeline/length_batches.py)
    epochs: int = 3
    warmup_fraction: float = 0.1
    metric: str | None = None  # None: accuracy (classification) or pearson (regression)
    patience: int = 2
    mlflow: bool = True
    experiment: str | None = None  # None: $MLFLOW_EXPERIMENT_NAME, else bert-pipeline (preprocessing/mlflow_experiment.py)
    run_name: str | None = None
    register_name: str | None = None
    log_model: bool = True

    def __post_init__(self):
        object.__setattr__(self, "drop_labels", tuple(self.drop_labels))
        object.__setattr__(self, "predict", tuple(self.predict))
        names = [prediction_name(spec) for spec in self.predict]
        twice = sorted({n for n in names if names.count(n) > 1})
        checks = [
            ((self.data is None) != (self.train is None), "give either --data or --train (not both, not neither)"),
            (self.data is None or not (self.validation or self.test),
             "--validation/--test go with --train; with --data the splits come from the data"),
            (self.data is not None or not (self.validation_split or self.test_split),
             "--validation-split/--test-split name splits of a saved DatasetDict given as --data"),
            (len({os.path.normpath(spec) for spec in self.predict}) == len(self.predict),
             "--predict: the same input given twice"),
            ("" not in (self.validation_split, self.test_split),
             "--validation-split/--test-split: empty (an unset shell variable?); name a split or leave the flag out"),
            (not twice, f"--predict: two inputs would both write predictions/{twice[0] if twice else ''}.tsv; "
                        "rename one file"),
            (self.predict_as in ("label", "id"), f"--predict-as must be label or id, got {self.predict_as!r}"),
            (not self.validation_split or self.validation_split != self.test_split,
             f"--validation-split and --test-split both name {self.validation_split!r}: the test metrics would "
             "measure the split that picked the best epoch"),
            ("train" not in (self.validation_split, self.test_split),
             "--validation-split/--test-split train: the train split trains; name another split"),
            (self.init in ("pretrained", "random"), f"--init must be pretrained or random, got {self.init!r}"),
            (self.task in (None, "classification", "regression"),
             f"--task must be classification or regression, got {self.task!r}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (0 <= self.warmup_fraction < 1, f"--warmup-fraction must be in [0, 1), got {self.warmup_fraction}"),
            (self.patience >= 0, f"--patience must be >= 0, got {self.patience}"),
            (self.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {self.eval_batch_size}"),
            (self.max_seq_length is None or self.max_seq_length >= 8,
             f"--max-seq-length must be >= 8, got {self.max_seq_length}"),
            (0 < self.validation_fraction < 1 and 0 < self.test_fraction < 1
             and self.validation_fraction + self.test_fraction < 1,
             "--validation-fraction and --test-fraction must be in (0, 1) with a sum below 1"),
            (self.metric is None or self.metric in METRICS,
             f"--metric must be one of {', '.join(sorted(METRICS))}, got {self.metric!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise FinetuneConfigError(message)

    @classmethod
    def from_flat(cls, **values) -> FinetuneConfig:
        """From the flags' flat names (``learning_rate=…`` rather than ``engine=EngineConfig(…)``)."""
        return cls(**nest(values, ENGINE_DEFAULTS))

    def best_metric(self, task: str) -> str:
        return self.metric or BEST_METRIC[task]


def build_parser() -> argparse.ArgumentParser:
    d = FinetuneConfig(model="", data="")
    e = d.engine
    p = cli_parser.Parser(
        prog="python pipeline/finetune.py",
        description="Fine-tune a BERT from pipeline/pretrain.py on a labelled text task (single-sentence or "
                    "sentence-pair classification, or regression) with DeepSpeed. Runs as one process, or under "
                    "deepspeed / torchrun (one process per GPU or CPU rank). Writes OUTPUT_DIR/model (Hugging "
                    "Face, with the label mapping), report.json and confusion_matrix.png; logs one MLflow run.",
        epilog="example: python pipeline/finetune.py --model runs/tiny --data reviews.csv --text-column text "
               "--label-column category --drop-label plot",
        formatter_class=cli_parser.DefaultsFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True,
                   help="a Hugging Face export (RUN_DIR/hf/<tag>), or a pretrain --run-dir, its checkpoints/ or one "
                        "checkpoint dir (exported on the fly, ZeRO partitions included)")
    m.add_argument("--tokenizer", help="tokenizer dir (default: the model's); refused if it does not match the "
                                       "model%(default).0s")
    m.add_argument("--init", choices=("pretrained", "random"), default=d.init,
                   help="random: same architecture and tokenizer, untrained weights (the baseline pretraining must beat)")
    m.add_argument("--reinit-pooler", action="store_true",
                   help="start the pooler (the [CLS] dense + tanh layer, trained on next-sentence prediction) fresh, "
                        "as Zhang et al. 2021 do for few-sample fine-tuning")
    data = p.add_argument_group("data (csv, tsv, jsonl, optionally .gz/.bz2/.xz/.zst; parquet; or a datasets.save_to_disk dir)")
    data.add_argument("--data", help="one file or saved dataset; missing validation/test splits are split off "
                                     "train (seeded, stratified)")
    data.add_argument("--train", help="train split file (instead of --data)")
    data.add_argument("--validation", help="validation split file (default: split off --train)%(default).0s")
    data.add_argument("--test", help="test split file (default: split off --train)%(default).0s")
    data.add_argument("--validation-split", metavar="SPLIT",
                      help="with a saved DatasetDict as --data: the split to validate on (e.g. MNLI's "
                           "validation_matched; default: validation, dev, valid or val)")
    data.add_argument("--test-split", metavar="SPLIT",
                      help="with a saved DatasetDict as --data: the split to test on (e.g. validation_mismatched; "
                           "default: test)")
    data.add_argument("--predict", action="append", default=[], metavar="FILE_OR_SPLIT",
                      help="after training, write the best model's predictions for every row of this file (or of "
                           "this split of --data's saved DatasetDict; labels not needed, e.g. GLUE's test sets) to "
                           "OUTPUT_DIR/predictions/NAME.tsv (columns index, prediction); repeatable")
    data.add_argument("--predict-as", choices=("label", "id"), default=d.predict_as,
                      help="label: the class's name as the data gives it; id: its index (a datasets ClassLabel's "
                           "own id, as GLUE's server wants for CoLA, SST-2, MRPC and QQP)")
    data.add_argument("--text-column", default=d.text_column, help="column with the text")
    data.add_argument("--text-pair-column", help="second text of a sentence-pair task")
    data.add_argument("--label-column", default=d.label_column, help="column with the label")
    data.add_argument("--task", choices=("classification", "regression"),
                      help="default: regression if every train label is a number and some are not whole"
                           "%(default).0s")
    data.add_argument("--drop-label", dest="drop_labels", action="append", default=[], metavar="LABEL",
                      help="skip rows with this label (repeatable; '' for blank labels); skipped rows are "
                           "counted and logged")
    data.add_argument("--validation-fraction", type=float, default=d.validation_fraction,
                      help="share of --train (or --data) split off for validation when no --validation file is given")
    data.add_argument("--test-fraction", type=float, default=d.test_fraction,
                      help="share of --train (or --data) split off for test when no --test file is given")
    data.add_argument("--split-seed", type=int, help="seed of those splits (default: --seed; set it to keep the "
                                                     "same split across a sweep of seeds)%(default).0s")
    data.add_argument("--max-seq-length", type=int, help="tokens per example (default: the tokenizer's, i.e. the "
                                                        "pretraining length)%(default).0s")
    t = p.add_argument_group("training")
    t.add_argument("--output-dir", default=d.output_dir, help="model, report.json and metrics.jsonl go here")
    add_engine_flags(t, e, seed_help="split, classifier initialisation and batch order")
    t.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="per process")
    t.add_argument("--group-by-length", action="store_true",
                   help="train on batches of rows of similar length (windows of up to 64 global batches, at least 4 "
                        "an epoch, sorted by length, the batches then shuffled): less padding, so faster where lengths "
                        "vary; a batch's rows are less random (as Hugging Face's group_by_length)")
    t.add_argument("--epochs", type=int, default=d.epochs, help="at most; early stopping may end sooner")
    t.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction,
                   help="linear warmup over this share of the steps, then linear decay to 0")
    others = ", ".join(name for name in METRICS if name not in BEST_METRIC.values())
    t.add_argument("--metric", help=f"validation metric that picks the best epoch (default: "
                                    f"{BEST_METRIC['classification']}, or {BEST_METRIC['regression']} for "
                                    f"regression; also {others})%(default).0s")
    t.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many epochs without a better validation metric (0 = never stop early)")
    tr = p.add_argument_group("tracking (MLflow; MLFLOW_TRACKING_URI selects the server)")
    tr.add_argument("--no-mlflow", dest="mlflow", action="store_false", help="log no MLflow run")
    tr.add_argument("--experiment", type=experiment_flag, default=d.experiment, help=EXPERIMENT_HELP)
    tr.add_argument("--run-name", help="MLflow run name (default: MLflow's generated one)")
    tr.add_argument("--register-name", help="register the logged model under this name in the model registry")
    tr.add_argument("--no-log-model", dest="log_model", action="store_false",
                    help="do not log the model to MLflow (the report and metrics still are)%(default).0s")
    add_launcher_flag(p)
    return p


def parse_args(argv: Sequence[str] | None) -> FinetuneConfig:
    parser = build_parser()
    config = parse_stage_flags(parser, argv, FinetuneConfig)
    if config.register_name and not (config.mlflow and config.log_model):
        parser.error("--register-name needs the model logged to MLflow: drop --no-mlflow / --no-log-model")
    return config
