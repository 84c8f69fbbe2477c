"""Builds the pretrained bundle that the proof that pretraining helps fine-tunes.

    python tests/data/pretrained_reviews/make_bundle.py --workdir runs/reviews_bundle
    python tests/data/pretrained_reviews/make_bundle.py --workdir W --model mini.json \
        --vocab-size 16000 --ds-config ds_configs/gpu_base_bf16_zero1_fused-adam.json --steps 50000

Pretraining takes longer than a test may (the defaults: ~90 minutes on 2 CPU cores), so
tests/test_finetune_pretraining_helps.py fine-tunes the bundle this writes (by default into
this folder, for committing) instead of pretraining in CI. The defaults' bundle does not beat
random init on both splits yet (docs/EXPERIMENTS.md, "Does pretraining help?"), so none is committed. The
steps are the user-facing commands, run as subprocesses:

1. ``pipeline.run_all.write_review_task``: the fine-tuning split (seed 42) and
   ``reviews_unlabelled.txt``, the train split's review text grouped by film plus the plot
   summaries. No validation or test review is in it; its SHA-256 goes into provenance.json
   so the test can check the bundle was pretrained on exactly the text it recomputes.
2. ``preprocessing/run_beam.py`` on that text alone: in-domain pretraining, with a vocabulary
   big enough (8,000 pieces) that sentiment words stay whole.
3. ``pipeline/pretrain.py`` (MLM + NSP) and ``pipeline/export.py``.

A step whose output exists is not run again, and a stopped pretraining resumes from its newest
checkpoint, so a build continues where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))

LABELLED, SEED = 1000, 42
MODEL = {"model_type": "bert", "vocab_size": 8000, "hidden_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 2, "intermediate_size": 512, "max_position_embeddings": 64,
         "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "type_vocab_size": 2,
         "pad_token_id": 0}
PREPROCESS = ["--max-seq-length", "64", "--dupe-factor", "40", "--num-shards", "8",
              "--seed", str(SEED), "--no-mlflow"]
PRETRAIN = ["--global-batch-size", "64", "--micro-batch-size", "64", "--learning-rate", "2e-3",
            "--warmup-steps", "800", "--log-every", "250", "--eval-every", "4000", "--eval-batches", "100",
            "--checkpoint-every", "2000", "--keep-checkpoints", "10", "--seed", str(SEED), "--no-mlflow"]
BUNDLE_FILES = ("config.json", "model.safetensors", "spm.model", "tokenizer.json", "tokenizer_config.json")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(cmd: list[str], workdir: str, commands: list[str], done: bool = False) -> float | None:
    """Runs CMD in WORKDIR unless DONE; records it in COMMANDS either way (the bundle's recipe)."""
    commands.append(shlex.join(["python", *[os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in cmd]]))
    if done:
        print(f"(done already) {commands[-1]}", flush=True)
        return None
    print(f"$ {commands[-1]}", flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, *cmd], cwd=workdir, check=True)
    return time.perf_counter() - started


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", required=True, help="data, run dir and export go here (a few hundred MB)")
    p.add_argument("--steps", type=int, default=16000, help="pretraining steps of 64 sequences")
    p.add_argument("--model", help="a BERT config.json to pretrain instead of the built-in one (hidden 128, "
                                   "2 layers, vocabulary 8,000; vocab_size must match --vocab-size)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--ds-config", help="DeepSpeed config for pretraining, e.g. a GPU one from ds_configs/ "
                                       "(default: pretrain.py's CPU one)")
    p.add_argument("--out", default=HERE, help="where the bundle is written")
    args = p.parse_args(argv)
    model = {**MODEL, "vocab_size": args.vocab_size}
    if args.model:
        try:
            with open(args.model) as f:
                model = json.load(f)
        except (OSError, ValueError) as err:
            p.error(f"--model {args.model}: not a readable BERT config.json ({err})")
    if model.get("vocab_size") != args.vocab_size:
        p.error(f"--model {args.model}: vocab_size {model.get('vocab_size')} differs from --vocab-size "
                f"{args.vocab_size}")

    from pipeline.run_all import write_review_task

    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    commands: list[str] = [shlex.join(["python", os.path.relpath(os.path.abspath(__file__), REPO),
                                       *(argv if argv is not None else sys.argv[1:])])]
    files = write_review_task(os.path.join(workdir, "reviews"), LABELLED, SEED)
    with open(os.path.join(workdir, "model.json"), "w") as f:
        json.dump(model, f, indent=1)

    tag = f"step{args.steps:08d}"
    export = os.path.join(workdir, "export")
    seconds = {
        "preprocess": run([os.path.join(REPO, "preprocessing", "run_beam.py"), "--input",
                           "reviews/reviews_unlabelled.txt", "--output", "data", "--vocab-size", str(args.vocab_size),
                           *PREPROCESS], workdir, commands,
                          done=os.path.exists(os.path.join(workdir, "data", "manifest.json"))),
        "pretrain": run([os.path.join(REPO, "pipeline", "pretrain.py"), "--data", "data", "--run-dir", "run",
                         "--model", "model.json", "--steps", str(args.steps), *PRETRAIN,
                         *(["--ds-config", os.path.abspath(args.ds_config)] if args.ds_config else [])],
                        workdir, commands, done=os.path.isdir(os.path.join(workdir, "run", "checkpoints", tag))),
    }
    run([os.path.join(REPO, "pipeline", "export.py"), "run", "--tag", tag, "--out", "export"], workdir, commands)

    os.makedirs(args.out, exist_ok=True)
    for name in BUNDLE_FILES:
        shutil.copy(os.path.join(export, name), os.path.join(args.out, name))
    info = json.load(open(os.path.join(export, "training_info.json")))
    for key in ("checkpoint", "data_dir", "model"):  # this machine's paths mean nothing elsewhere
        if os.path.isabs(info.get(key) or ""):
            info[key] = os.path.relpath(info[key], workdir)
    with open(os.path.join(args.out, "training_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    manifest = json.load(open(os.path.join(workdir, "data", "manifest.json")))
    evals = [json.loads(line) for line in open(os.path.join(workdir, "run", "eval.jsonl"))]
    provenance = {
        "commands": commands,
        "tag": tag,
        "unlabelled_reviews_sha256": sha256(files["unlabelled"]),
        "labelled": LABELLED,
        "seed": SEED,
        "model": model,
        "data_manifest": {k: manifest[k] for k in ("tokenizer", "max_seq_length", "masking", "dupe_factor",
                                                   "num_examples", "counters") if k in manifest},
        "held_out_eval": evals,
        "seconds_this_build": {k: round(v) for k, v in seconds.items() if v is not None},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }
    with open(os.path.join(args.out, "provenance.json"), "w") as f:
        json.dump(provenance, f, indent=1)
    print(f"bundle: {args.out}")


if __name__ == "__main__":
    main()
