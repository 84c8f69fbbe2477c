"""CPU fine-tuning throughput: pipeline/finetune.py's Finetuner vs a plain Hugging Face ``Trainer``.

Both sides fine-tune the same ``BertForSequenceClassification`` (same preset and weights, SDPA
attention, fp32) on the same rows of the bundled Rotten Tomatoes reviews (fresh vs rotten),
tokenized by the same tokenizer with the same max length, padded to the longest row of the
batch rounded up to 8, with the same batch, steps, AdamW learning rate / weight decay / grad
clip / linear warmup and torch thread count. Each side runs in its own fresh subprocess, one
after the other, and is timed the same way: wall clock from the end of the warmup steps to the
end of the last step (no evaluation inside the timing). ``--repeats`` rounds (3), the side that
runs first alternating by round; the round with the median ratio is printed in full, with every
round's ratio.

- ours: ``pipeline.finetuning.trainer.Finetuner`` (DeepSpeed engine, ds_configs/cpu_fp32_zero2_torch-adamw.json),
  one epoch over exactly ``steps x batch`` train rows, timed through its progress hook.
- hf: ``transformers.Trainer`` with ``DataCollatorWithPadding(pad_to_multiple_of=8)``, its default
  AdamW, no eval, no checkpoints, no logging, timed with a ``TrainerCallback``.

``--group-by-length`` batches rows of similar length on both sides (ours: ``--group-by-length``;
Hugging Face: ``train_sampling_strategy="group_by_length"``, its LengthGroupedSampler; both sort
windows of 10 batches here, at least 4 an epoch; Hugging Face's run longest first, its longest
batch first of all, so into the untimed steps): less padding, so both compute fewer tokens a step.

The model is a randomly initialised preset (weights do not change the speed) saved with the
tokenizer of a data dir: without --data, the dump sample is preprocessed to a temporary folder
first (vocab 8000, seq 128, ~15 s). About 1 minute a side and round on a 2-core CPU with the defaults.

    python benchmarks/finetune_cpu.py [--data DIR] [--model mini] [--steps 40] [--batch-size 32]
                                      [--ds-config FILE] [--group-by-length] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a file: the repo root, for benchmarks.* and pipeline.*

from preprocessing import cli_parser  # noqa: E402
from benchmarks.side_by_side import (add_timing_arguments, alternating_rounds,  # noqa: E402
                                     check_timing_arguments, median_round, ratio_line, run_worker,
                                     stamp, summarize, timed_hf_trainer)
from pipeline.ds_config import DEFAULT_DS_CONFIG  # noqa: E402

SAMPLE = os.path.join(REPO, "preprocessing", "sample_data", "enwiki-sample-pages-articles.xml.bz2")
REVIEWS = os.path.join(REPO, "pipeline", "sample_data", "rotten_tomatoes.csv.bz2")
RESULT = "FINETUNE_CPU_RESULT "




def prepare(args, root: str) -> None:
    """The model dir (random preset + the data dir's tokenizer) and the train/validation/test files."""
    import shutil

    import torch

    from pipeline.data_dir import read_manifest
    from pipeline.finetuning.data import read_table, stratified_split
    from pipeline.model import build_model, model_config

    if not args.data:
        args.data = os.path.join(root, "data")
        print(f"writing the sample data dir to {args.data} ...", flush=True)
        subprocess.run([sys.executable, os.path.join(REPO, "preprocessing", "run_beam.py"), "--input", SAMPLE,
                        "--output", args.data, "--vocab-size", "8000", "--dupe-factor", "1", "--no-mlflow"],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    manifest = read_manifest(args.data)
    torch.manual_seed(args.seed)
    model = build_model(model_config(args.model, manifest))
    args.model_dir = os.path.join(root, "model")
    model.save_pretrained(args.model_dir)
    tokenizer_dir = os.path.join(args.data, manifest["tokenizer"]["path"])
    for name in os.listdir(tokenizer_dir):
        shutil.copy2(os.path.join(tokenizer_dir, name), args.model_dir)

    table = read_table(REVIEWS)
    rows = [i for i, c in enumerate(table.columns["category"]) if c != "plot"]
    table = table.take(rows)
    n = args.steps * args.batch_size
    train, held_out, _ = stratified_split(table.columns["category"], [n / len(table), 64 / len(table)], args.seed)
    for name, part in (("train", train), ("validation", held_out), ("test", held_out)):
        with open(os.path.join(root, f"{name}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows((table.columns["text"][i], table.columns["category"][i]) for i in part)
    args.files = root




# ---------------------------------------------------------------------------- ours
def run_ours(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from pipeline.finetuning.config import FinetuneConfig
    from pipeline.finetuning.trainer import Finetuner, collate

    with tempfile.TemporaryDirectory(prefix="finetune_cpu_ours_") as out:
        config = FinetuneConfig.from_flat(
            model=args.model_dir, train=os.path.join(args.files, "train.csv"),
            validation=os.path.join(args.files, "validation.csv"), test=os.path.join(args.files, "test.csv"),
            max_seq_length=args.max_seq_length, output_dir=out, ds_config=args.ds_config,
            global_batch_size=args.batch_size,
            micro_batch_size=args.batch_size, epochs=1, learning_rate=args.learning_rate,
            warmup_fraction=args.lr_warmup / args.steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
            seed=args.seed, mlflow=False, group_by_length=args.group_by_length)
        finetuner = Finetuner(config)
        assert finetuner.steps_per_epoch == args.steps, finetuner.steps_per_epoch
        stamps = []

        class Stamps:  # the progress hook: called once per optimizer step
            def update(self, n):
                stamps.append(stamp())

            def set_postfix(self, **kw):
                pass

        finetuner.train_epoch(1, Stamps())
        pad = finetuner.tokenizer.pad_token_id
        tokens = [int(collate(finetuner.splits["train"], rows, pad, "classification")["attention_mask"].sum())
                  for step in finetuner.epoch_micro_batches(1) for rows in step]
        inner = getattr(finetuner.optimizer, "optimizer", finetuner.optimizer)
        optimizer = f"{type(finetuner.optimizer).__name__}({type(inner).__name__})"
    return {**summarize(stamps, tokens, args.warmup, args.batch_size), "optimizer": optimizer,
            "parameters": sum(p.numel() for p in finetuner.engine.module.parameters()),
            "threads_after": torch.get_num_threads()}


# ---------------------------------------------------------------------------- Hugging Face
def run_hf(args) -> dict:
    import datasets
    import torch

    torch.set_num_threads(args.threads)
    import transformers
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              TrainingArguments)

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    raw = datasets.load_dataset("csv", data_files=os.path.join(args.files, "train.csv"), split="train")
    labels = sorted(set(raw["label"]))
    train = raw.map(lambda rows: {**tokenizer(rows["text"], truncation=True, max_length=args.max_seq_length),
                                  "labels": [labels.index(x) for x in rows["label"]]},
                    batched=True, remove_columns=raw.column_names)
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=len(labels),
                                                               attn_implementation="sdpa")
    with tempfile.TemporaryDirectory(prefix="finetune_cpu_hf_") as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate, weight_decay=args.weight_decay, max_grad_norm=args.grad_clip,
            warmup_steps=args.lr_warmup, lr_scheduler_type="linear", adam_epsilon=1e-6, seed=args.seed,
            use_cpu=True, eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_num_workers=0,
            train_sampling_strategy="group_by_length" if args.group_by_length else "random")
        trainer, tokens, stamps = timed_hf_trainer(
            model=model, args=targs, train_dataset=train,
            data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8))
        trainer.train()
        optimizer = type(trainer.optimizer).__name__
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        optimizer += f"({type(inner).__name__}, optim={targs.optim})"
    assert len(stamps) == args.steps, len(stamps)
    return {**summarize(stamps, tokens, args.warmup, args.batch_size), "optimizer": optimizer,
            "parameters": sum(p.numel() for p in model.parameters()), "threads_after": torch.get_num_threads()}


# ---------------------------------------------------------------------------- driver
def launch(side: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--model-dir", args.model_dir,
           "--files", args.files, "--ds-config", args.ds_config,
           *(["--group-by-length"] if args.group_by_length else []), *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in (
               "steps", "warmup", "batch_size", "threads", "learning_rate", "lr_warmup", "weight_decay",
               "grad_clip", "seed", "max_seq_length")]]
    return run_worker(side, cmd, RESULT, args.threads, args.steps)


def main(argv=None) -> int:
    import torch

    p = cli_parser.Parser(description=__doc__.split("\n\n")[0], formatter_class=cli_parser.DefaultsFormatter)
    p.add_argument("--data", help="a data dir from preprocessing/run_beam.py, for its tokenizer "
                                  "(default: write the sample)")
    p.add_argument("--model", default="mini", help="preset of pipeline/model.py (tiny, mini, small, base, ...)")
    add_timing_arguments(p, steps=40)
    p.add_argument("--batch-size", type=int, default=32, help="micro = global batch size (sequences)")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--ds-config", default=DEFAULT_DS_CONFIG,
                   help="ours: the DeepSpeed engine settings")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--lr-warmup", type=int, default=4, help="linear LR warmup steps, both sides")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--group-by-length", action="store_true", help="both sides batch rows of similar length")
    p.add_argument("--worker", choices=("ours", "hf"), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    check_timing_arguments(p, args)
    if not 0 <= args.lr_warmup < args.steps:
        p.error(f"--lr-warmup {args.lr_warmup} must be at least 0 and below --steps {args.steps}")

    if args.worker:
        result = run_ours(args) if args.worker == "ours" else run_hf(args)
        print(RESULT + json.dumps(result), flush=True)
        return 0

    with tempfile.TemporaryDirectory(prefix="finetune_cpu_") as root:
        prepare(args, root)
        rounds = alternating_rounds(lambda side: launch(side, args), args.repeats)
    middle, ratios = median_round(rounds, "sequences_per_s")
    ours, hf = middle["ours"], middle["hf"]

    import deepspeed
    import transformers

    print()
    print("== CPU fine-tuning throughput: pipeline Finetuner (DeepSpeed) vs Hugging Face Trainer ==")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, os.cpu_count()={os.cpu_count()}, "
          f"torch threads={args.threads}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, deepspeed "
          f"{deepspeed.__version__}, transformers {transformers.__version__}")
    print(f"settings: model={args.model} BertForSequenceClassification (sdpa, fp32), parameters ours="
          f"{ours['parameters']:,} hf={hf['parameters']:,}; batch {args.batch_size}; max length "
          f"{args.max_seq_length}; {args.steps} steps, first {args.warmup} untimed; lr {args.learning_rate}; "
          f"data: Rotten Tomatoes reviews ({args.steps * args.batch_size} train rows); batches "
          f"{'grouped by length' if args.group_by_length else 'random'} on both sides")
    print(f"optimizers: ours {ours['optimizer']} ({os.path.basename(args.ds_config)}); hf {hf['optimizer']}")
    for name, r in (("ours", ours), ("hf  ", hf)):
        print(f"{name}: {r['sequences_per_s']:7.2f} seq/s  {r['tokens_per_s']:9,.0f} real tokens/s  median step "
              f"{r['median_step_s']:.3f} s  ({r['timed_steps']} steps in {r['seconds']:.2f} s; CPU "
              f"{r['cpu_s_per_step']:.3f} s and {r['minor_faults_per_step']:,.0f} page faults a step; process "
              f"{r['process_s']:.0f} s)")
    print(ratio_line(middle, ratios, "sequences_per_s", "sequences/s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
