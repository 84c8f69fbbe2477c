"""Host work per training step: aten operations the trainer dispatches, by phase, against a plain
PyTorch loop on the same model.

On a GPU each aten operation costs the host a few microseconds (dispatch, and a kernel launch
for most), while a small step's kernels take little longer than that: once the host dispatches
more than the GPU can run, the GPU waits (one H200, BERT-base at 128 tokens, micro-batch 256:
the GPU computed 60 ms of a 93-123 ms step; docs/PRETRAINING.md). The count hardly depends on
the device, so it is measured here on a CPU and compares DeepSpeed configs before a GPU run. The
exception is attention with dropout, which a CPU computes on torch's math path: 78 aten
operations a layer's forward and 80 its backward here, against 19 and 59 for the CPU's fused
kernel without dropout (a GPU runs one fused kernel either way), so at least 12 x 80 = 960 of
every row's count for BERT-base are CPU-only; the same in every row, so their differences stand.

- ours: ``pipeline.trainer.Trainer`` with ``--ds-config`` (each given file), ``--accumulation``
  micro-batches per optimizer step (1 by default); counted with ``torch.profiler`` around
  ``pretraining_losses`` (forward), the trainer's backward and ``optimizer_step``, each op once however
  deeply nested.
- plain: the same ``BertForPreTraining`` (sparse MLM head) in bf16, ``loss.backward()``,
  ``clip_grad_norm_`` and fused ``AdamW``, no DeepSpeed: what a one-GPU script does.

Without a GPU, a config's fused Adam (a CUDA kernel) is replaced by torch's fused AdamW, one
operation for all tensors on either device, the same for every row: the rows differ in their
engine settings (ZeRO stage, precision, overflow check), not in the optimizer. Gradient
clipping's foreach norm has no CPU fast path and counts a norm per tensor here, fewer on a GPU.
About 4 minutes a row on 2 cores (8 for the plain loop and one file). ``--accumulation N``
counts per micro-batch with N of them per optimizer step: DeepSpeed's step, and the gradient
bucketing its backward hooks do at the boundary, are then spread over N micro-batches.

    python benchmarks/host_ops.py --ds-config ds_configs/gpu_base_bf16_zero1_fused-adam.json \\
        --ds-config benchmarks/results/h200_2026-12-04/z1_torchadam.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from preprocessing import cli_parser  # noqa: E402

PHASES = ("forward", "backward", "step")


def aten_ops(fn) -> tuple[object, int]:
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def cpu_engine_config(path: str, out: str) -> str:
    """The file with torch's AdamW in place of a CUDA-only optimizer, when there is no GPU."""
    import torch

    with open(path) as f:
        config = json.load(f)
    optimizer = config.get("optimizer", {})
    if not torch.cuda.is_available() and not optimizer.get("params", {}).get("torch_adam"):
        params = {k: v for k, v in optimizer.get("params", {}).items() if k in ("betas", "eps")}
        config["optimizer"] = {"type": "AdamW", "params": {**params, "torch_adam": True, "fused": True}}
    with open(out, "w") as f:
        json.dump(config, f)
    return out


def count_trainer(ds_config: str, model: str, micro: int, steps: int, accumulation: int = 1) -> dict[str, float]:
    """Operations per micro-batch by phase; ``step`` is DeepSpeed's step, which applies the
    update on every ``accumulation``-th micro-batch only."""
    from benchmarks.pretrain_gpu import write_synthetic_data
    from pipeline import trainer as T
    from pipeline.engine import optimizer_step
    from pipeline.train_config import TrainConfig

    with tempfile.TemporaryDirectory(prefix="host_ops_") as tmp:
        data = write_synthetic_data(os.path.join(tmp, "data"), 128, micro * accumulation * (steps + 2))
        config = TrainConfig.from_flat(
            data=data, run_dir=os.path.join(tmp, "run"), model=model,
            ds_config=cpu_engine_config(ds_config, os.path.join(tmp, "ds.json")),
            global_batch_size=micro * accumulation,
            micro_batch_size=micro, steps=steps, learning_rate=1e-4, warmup_steps=0, log_every=steps,
            resume="none", eval_shards=0, mlflow=False)
        trainer = T.Trainer(config)
        totals = dict.fromkeys(PHASES, 0)
        for micro_step in range(steps * accumulation):
            step = micro_step // accumulation
            batch = next(trainer.loader)
            (mlm, nsp, _), forward = aten_ops(lambda: T.pretraining_losses(trainer.engine, batch))
            _, backward = aten_ops(lambda: trainer.backward(mlm + nsp))  # the trainer's: the fp16 repair too
            _, optimizer = aten_ops(lambda: optimizer_step(trainer.engine))
            if step:  # the first step builds buffers and states once
                for phase, n in zip(PHASES, (forward, backward, optimizer)):
                    totals[phase] += n
        trainer.loader.close()
    return {phase: n / ((steps - 1) * accumulation) for phase, n in totals.items()}


def count_plain(model: str, micro: int, steps: int, accumulation: int = 1) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from pipeline.model import build_model, model_config

    manifest = {"tokenizer": {"vocab_size": 32000, "special_ids": {"pad": 0}}, "max_seq_length": 128}
    net = build_model(model_config(model, manifest), sparse_mlm=True).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(5, 32000, (micro, 128))
    positions = torch.arange(0, micro * 128, 7)
    labels, nsp = torch.randint(5, 32000, (len(positions),)), torch.randint(0, 2, (micro,))
    totals = dict.fromkeys(PHASES, 0)
    for micro_step in range(steps * accumulation):
        step = micro_step // accumulation
        (mlm, cls), forward = aten_ops(lambda: net(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                   token_type_ids=torch.zeros_like(ids), mlm_positions=positions))
        loss = F.cross_entropy(mlm.float(), labels) + F.cross_entropy(cls.float(), nsp)
        _, backward = aten_ops(loss.backward)  # gradients accumulate in .grad
        optimizer_ops = 0
        if (micro_step + 1) % accumulation == 0:
            _, optimizer_ops = aten_ops(lambda: (torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0, foreach=True),
                                                 optimizer.step(), optimizer.zero_grad()))
        if step:
            for phase, n in zip(PHASES, (forward, backward, optimizer_ops)):
                totals[phase] += n
    return {phase: n / ((steps - 1) * accumulation) for phase, n in totals.items()}


def main(argv=None) -> int:
    p = cli_parser.Parser(description=__doc__.split("\n\n")[0], formatter_class=cli_parser.DefaultsFormatter)
    p.add_argument("--ds-config", action="append", required=True, help="a DeepSpeed config (repeatable)")
    p.add_argument("--model", default="base", help="a preset of pipeline/model.py")
    p.add_argument("--micro-batch", type=int, default=2, help="does not change the count; small is quick")
    p.add_argument("--steps", type=int, default=4, help="counted steps + 1 (the first is left out)")
    p.add_argument("--accumulation", type=int, default=1,
                   help="micro-batches per optimizer step: the step's operations are spread over them")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2: the first step is left out")
    if args.accumulation < 1:
        p.error("--accumulation must be >= 1")
    missing = [path for path in args.ds_config if not os.path.isfile(path)]
    if missing:  # before the plain loop's minutes
        p.error(f"--ds-config {missing[0]}: no such file")
    n = args.accumulation
    rows = [("plain PyTorch loop", count_plain(args.model, args.micro_batch, args.steps, n))]
    for path in args.ds_config:
        rows.append((os.path.basename(path), count_trainer(path, args.model, args.micro_batch, args.steps, n)))
    plain = sum(rows[0][1].values())
    print(f"\naten ops per micro-batch, BERT-{args.model}, {n} micro-batch{'es' if n > 1 else ''} per optimizer "
          "step")
    print(f"{'':<48} {'forward':>8} {'backward':>9} {'step':>7} {'total':>7} {'x plain':>8}")
    for name, counts in rows:
        total = sum(counts.values())
        print(f"{name:<48} {counts['forward']:>8,.0f} {counts['backward']:>9,.0f} {counts['step']:>7,.0f} "
              f"{total:>7,.0f} {total / plain:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
