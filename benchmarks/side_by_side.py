"""What the CPU benchmarks share: each side runs in its own fresh process and is timed the same way."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Launcher variables are dropped: a plain process is a 1-process world on a free port.
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class Stamp(NamedTuple):
    """The end of a step: wall clock, and the process's CPU time (all threads, user + system,
    OpenMP threads spinning at a barrier included) and minor page faults so far. CPU seconds
    compare the sides' work where the VM's speed drifts; faults count pages the allocator
    handed back to the kernel and took again."""
    wall: float
    cpu: float
    minor_faults: int


def stamp() -> Stamp:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return Stamp(time.perf_counter(), usage.ru_utime + usage.ru_stime, usage.ru_minflt)


def summarize(stamps: list[Stamp], tokens: list[int], warmup: int, batch: int) -> dict:
    """stamps[k] = end of step k+1, tokens[k] = its real tokens; steps 1..warmup are not timed."""
    timed = len(stamps) - warmup
    first, last = stamps[warmup - 1], stamps[-1]
    seconds = last.wall - first.wall
    real = sum(tokens[warmup:])
    durations = sorted(b.wall - a.wall for a, b in zip(stamps[warmup - 1:], stamps[warmup:]))
    return {"timed_steps": timed, "seconds": seconds, "real_tokens": real, "tokens_per_s": real / seconds,
            "sequences_per_s": timed * batch / seconds, "median_step_s": durations[len(durations) // 2],
            "cpu_s_per_step": (last.cpu - first.cpu) / timed,
            "minor_faults_per_step": (last.minor_faults - first.minor_faults) / timed}


def timed_hf_trainer(**trainer_kwargs):
    """A Hugging Face ``Trainer`` that records each step's real tokens and end time, for ``summarize``.

    Returns ``(trainer, tokens, stamps)``; the lists fill as ``trainer.train()`` runs.
    """
    from transformers import Trainer, TrainerCallback

    tokens: list[int] = []
    stamps: list[Stamp] = []

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, *rest, **kw):
            tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *rest, **kw)

    class Timer(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            stamps.append(stamp())

    return CountingTrainer(callbacks=[Timer()], **trainer_kwargs), tokens, stamps


def run_worker(side: str, cmd: list[str], result_prefix: str, threads: int, steps: int) -> dict:
    """Runs one side's worker process; the JSON it printed after ``result_prefix``, plus its wall time."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"[{side}] running {steps} steps ...", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(result_prefix)]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise SystemExit(f"[{side}] worker failed with exit code {proc.returncode}")
    result = json.loads(lines[-1][len(result_prefix):])
    result["process_s"] = time.perf_counter() - started
    return result


def add_timing_arguments(parser, steps: int, warmup: int = 5) -> None:
    """``--steps``, ``--warmup`` and ``--repeats``, the same in both benchmarks."""
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=warmup, help="first steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both sides, the first side alternating")


def check_timing_arguments(parser, args) -> None:
    """A run that would time no step, or run no round, is a usage error (exit 2)."""
    if not 1 <= args.warmup < args.steps:
        parser.error("--warmup must be in [1, --steps)")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")


def alternating_rounds(launch, repeats: int) -> list[dict[str, dict]]:
    """``repeats`` rounds of both sides, ``launch("ours")`` and ``launch("hf")``, the side that runs
    first alternating by round (ours first in the odd-numbered ones): this VM's speed drifts
    between runs (one config's ours/hf rounds spread from 0.84 to 1.02), so one pair cannot
    resolve a few percent, and a fixed order would hand the drift to one side."""
    rounds = []
    for r in range(repeats):
        order = ("ours", "hf") if r % 2 == 0 else ("hf", "ours")
        rounds.append({side: launch(side) for side in order})
    return rounds


def median_round(rounds: list[dict[str, dict]], key: str) -> tuple[dict[str, dict], list[float]]:
    """The round whose ours/hf ratio of ``key`` is the median (the lower middle one of an even
    count), and every round's ratio in run order."""
    ratios = [r["ours"][key] / r["hf"][key] for r in rounds]
    middle = sorted(range(len(rounds)), key=ratios.__getitem__)[(len(rounds) - 1) // 2]
    return rounds[middle], ratios


def ratio_line(middle: dict[str, dict], ratios: list[float], key: str, what: str) -> str:
    """The closing line of a benchmark: the median round's ratio of ``key``, and every round's."""
    return (f"ratio ours/hf ({what}), the median round's: {middle['ours'][key] / middle['hf'][key]:.3f} "
            f"(rounds in run order, the first side alternating from ours: {', '.join(f'{q:.3f}' for q in ratios)})")
