"""CPU training throughput: this pipeline's Trainer vs a plain Hugging Face ``Trainer`` MLM run.

Both sides train the same ``BertForPreTraining`` (same preset, vocabulary, SDPA attention,
fp32, same seed for the initial weights) on the same Parquet shards, with the same micro
batch, number of steps, AdamW learning rate / weight decay / epsilon / warmup / grad clip
and torch thread count, and are timed the same way: wall clock from the end of the
warmup steps to the end of the last step, over the real (non-pad, attention_mask = 1)
tokens of the timed steps. Each side runs in its own fresh subprocess, one after the other,
for ``--repeats`` rounds (3), the side that runs first alternating by round; the round with the
median ratio is printed in full, with every round's ratio.

- ours: ``pipeline.trainer.Trainer`` (DeepSpeed engine, ds_configs/cpu_fp32_zero2_torch-adamw.json,
  statically masked shards, length-grouped batches padded to a multiple of 8), timed with
  ``train(on_step=...)``; the final checkpoint is skipped (outside the timing anyway).
- hf: what users pick instead: ``datasets.load_dataset("parquet")`` on the same shards, the
  static masks undone (original ids restored), ``DataCollatorForLanguageModeling``
  (dynamic 15% masking, padding to the longest in the batch) with the data dir's tokenizer,
  ``transformers.Trainer`` with its default optimizer (AdamW), no eval, no checkpoints, no
  logging, timed with a ``TrainerCallback``.

Without --data, writes the dump-sample data dir (seq 128, vocab 8000, dupe factor 2) to a
temporary folder first (~10 s). About 1-2 minutes a side and round on a 2-core CPU with the defaults.

    python benchmarks/pretrain_cpu.py [--data DIR] [--model mini] [--steps 30] [--warmup 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
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

SAMPLE = os.path.join(REPO, "preprocessing", "sample_data", "enwiki-sample-pages-articles.xml.bz2")
RESULT = "PRETRAIN_CPU_RESULT "


def make_data_dir(output: str) -> None:
    print(f"writing the sample data dir to {output} ...", flush=True)
    subprocess.run([sys.executable, os.path.join(REPO, "preprocessing", "run_beam.py"), "--input", SAMPLE,
                    "--output", output, "--vocab-size", "8000", "--dupe-factor", "2", "--no-mlflow"],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)






# ---------------------------------------------------------------------------- ours
def run_ours(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from pipeline.train_config import TrainConfig
    from pipeline.trainer import Trainer

    class NoSaveTrainer(Trainer):
        def save(self) -> str:  # the end-of-run checkpoint is not what we time
            return ""

    with tempfile.TemporaryDirectory(prefix="pretrain_cpu_ours_") as run_dir:
        config = TrainConfig.from_flat(data=args.data, run_dir=run_dir, model=args.model,
                                       global_batch_size=args.batch_size, micro_batch_size=args.batch_size,
                                       steps=args.steps, learning_rate=args.learning_rate, warmup_steps=args.lr_warmup,
                                       weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
                                       log_every=args.steps, resume="none", mlflow=False)
        trainer = NoSaveTrainer(config)
        stamps, tokens = [], []

        def on_step(tr, metrics) -> None:
            stamps.append(stamp())
            tokens.append(metrics.real_tokens)

        trainer.train(on_step=on_step)
        share = trainer.loader.real_token_share
        params = sum(p.numel() for p in trainer.engine.module.parameters())
        optimizer = type(trainer.optimizer).__name__
        inner = getattr(trainer.optimizer, "optimizer", None)
        if inner is not None:
            optimizer += f"({type(inner).__name__}, foreach={inner.defaults.get('foreach')}, "
            optimizer += f"fused={inner.defaults.get('fused')})"
    return {**summarize(stamps, tokens, args.warmup, args.batch_size), "real_token_share": share,
            "parameters": params, "optimizer": optimizer, "threads_after": torch.get_num_threads()}


# ---------------------------------------------------------------------------- Hugging Face
def run_hf(args) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import datasets
    import transformers
    from transformers import (AutoTokenizer, BertForPreTraining, DataCollatorForLanguageModeling,
                              TrainingArguments)

    from pipeline.data_dir import read_manifest
    from pipeline.model import model_config

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    manifest = read_manifest(args.data)
    shards = [os.path.join(args.data, s["path"]) for s in manifest["shards"]]
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.data, manifest["tokenizer"]["path"]))
    assert tokenizer.pad_token_id == manifest["tokenizer"]["special_ids"]["pad"]
    assert tokenizer.mask_token_id == manifest["tokenizer"]["special_ids"]["mask"]

    raw = datasets.load_dataset("parquet", data_files=shards, split="train")

    def unmask(rows):
        ids = []
        for row, pos, orig in zip(rows["input_ids"], rows["masked_lm_positions"], rows["masked_lm_ids"]):
            row = np.asarray(row, dtype=np.int64)
            row[np.asarray(pos, dtype=np.int64)] = orig
            ids.append(row.tolist())
        return {"input_ids": ids, "token_type_ids": rows["segment_ids"],
                "next_sentence_label": rows["next_sentence_labels"]}

    train = raw.map(unmask, batched=True, remove_columns=raw.column_names)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.15)

    torch.manual_seed(args.seed)
    config = model_config(args.model, manifest)
    config._attn_implementation = "sdpa"
    model = BertForPreTraining(config)

    with tempfile.TemporaryDirectory(prefix="pretrain_cpu_hf_") as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
            adam_epsilon=1e-6, max_grad_norm=args.grad_clip, warmup_steps=args.lr_warmup,
            lr_scheduler_type="linear", seed=args.seed, data_seed=args.seed, use_cpu=True,
            eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_num_workers=0, dataloader_drop_last=True)
        trainer, tokens, stamps = timed_hf_trainer(model=model, args=targs, train_dataset=train,
                                                   data_collator=collator)
        trainer.train()
        optimizer = type(trainer.optimizer).__name__
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        optimizer += f"({type(inner).__name__}, optim={targs.optim}, foreach={inner.defaults.get('foreach')}, "
        optimizer += f"fused={inner.defaults.get('fused')})"
    assert len(stamps) == args.steps and len(tokens) == args.steps, (len(stamps), len(tokens))
    # pad share of this run's batching: longest-in-batch padding, random (not length-grouped) order
    lengths = np.array([len(x) for x in train["input_ids"]])
    order = np.random.default_rng(args.seed).permutation(len(lengths))
    order = order[:len(order) // args.batch_size * args.batch_size].reshape(-1, args.batch_size)
    share = float(lengths[order].sum() / (lengths[order].max(axis=1) * args.batch_size).sum())
    return {**summarize(stamps, tokens, args.warmup, args.batch_size), "real_token_share": share,
            "parameters": sum(p.numel() for p in model.parameters()), "optimizer": optimizer,
            "threads_after": torch.get_num_threads(), "transformers": transformers.__version__}


# ---------------------------------------------------------------------------- driver
def worker_cmd(side: str, args) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--worker", side, "--data", args.data,
            "--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--batch-size", str(args.batch_size), "--threads", str(args.threads),
            "--learning-rate", str(args.learning_rate), "--lr-warmup", str(args.lr_warmup),
            "--weight-decay", str(args.weight_decay), "--grad-clip", str(args.grad_clip), "--seed", str(args.seed)]


def launch(side: str, args) -> dict:
    return run_worker(side, worker_cmd(side, args), RESULT, args.threads, args.steps)


def main(argv=None) -> int:
    import torch

    p = cli_parser.Parser(description=__doc__.split("\n\n")[0], formatter_class=cli_parser.DefaultsFormatter)
    p.add_argument("--data", help="a data dir from preprocessing/run_beam.py (default: write the sample)")
    p.add_argument("--model", default="mini", help="preset of pipeline/model.py (tiny, mini, small, ...)")
    add_timing_arguments(p, steps=30)
    p.add_argument("--batch-size", type=int, default=32, help="micro = global batch size (sequences)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--lr-warmup", type=int, default=10, help="linear LR warmup steps, both sides")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--worker", choices=("ours", "hf"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    check_timing_arguments(p, args)
    args.lr_warmup = min(args.lr_warmup, args.steps)

    if args.worker:
        result = run_ours(args) if args.worker == "ours" else run_hf(args)
        print(RESULT + json.dumps(result), flush=True)
        return 0

    tmp = None
    if not args.data:
        tmp = tempfile.TemporaryDirectory(prefix="pretrain_cpu_data_")
        args.data = os.path.join(tmp.name, "data")
        make_data_dir(args.data)
    args.data = os.path.abspath(args.data)
    try:
        rounds = alternating_rounds(lambda side: launch(side, args), args.repeats)
    finally:
        if tmp:
            tmp.cleanup()

    import deepspeed
    import transformers

    middle, ratios = median_round(rounds, "tokens_per_s")
    ours, hf = middle["ours"], middle["hf"]
    print()
    print("== CPU pretraining throughput: pipeline Trainer (DeepSpeed) vs Hugging Face Trainer ==")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, os.cpu_count()={os.cpu_count()}, "
          f"torch threads={args.threads} (both sides; after the run: ours {ours['threads_after']}, "
          f"hf {hf['threads_after']})")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, deepspeed "
          f"{deepspeed.__version__}, transformers {transformers.__version__}")
    print(f"settings: model={args.model} BertForPreTraining (MLM+NSP, sdpa, fp32), parameters ours="
          f"{ours['parameters']:,} hf={hf['parameters']:,}; micro=global batch {args.batch_size}; "
          f"{args.steps} steps, first {args.warmup} untimed; lr {args.learning_rate} linear warmup "
          f"{args.lr_warmup} then decay; weight decay {args.weight_decay}; grad clip {args.grad_clip}; "
          f"seed {args.seed}; data {args.data}")
    print(f"optimizers: ours {ours['optimizer']}; hf {hf['optimizer']}")
    for name, r in (("ours", ours), ("hf  ", hf)):
        print(f"{name}: {r['tokens_per_s']:10,.0f} real tokens/s  {r['sequences_per_s']:7.2f} seq/s  "
              f"median step {r['median_step_s']:.3f} s  ({r['real_tokens']:,} real tokens in "
              f"{r['timed_steps']} steps, {r['seconds']:.2f} s; real-token share {r['real_token_share']:.3f}; "
              f"CPU {r['cpu_s_per_step']:.3f} s and {r['minor_faults_per_step']:,.0f} page faults a step; "
              f"process {r['process_s']:.0f} s)")
    print(ratio_line(middle, ratios, "tokens_per_s", "real tokens/s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
