"""Every command line the docs show runs a script with flags that script knows, and every
documented training run divides its global batch among the processes its launcher starts.

The commands are read from README.md, docs/*.md, ds_configs/README.md, the headers of
slurm/*.sh and the docstrings of benchmarks/*.py: fenced shell blocks, and inline code that
runs a script with flags. Each script's flags come from its own ``--help``, all in one process;
preprocessing/run_beam.py also passes Apache Beam's flags on, so those count as known too.
A renamed flag, or an example sized for one process shown on eight, then fails here instead of
on a user's first run. The scripts in benchmarks/*.sh are read whole: a GPU check that passed a
flag the benchmark no longer takes would otherwise fail only on a GPU. A command whose text
leaves flags out ("…") or shows placeholders (FILE, N) has its flags checked, not its batch. A
whole benchmark command also passes the flags its script requires.
"""

import ast
import glob
import json
import os
import re
import shlex
import subprocess
import sys
from typing import NamedTuple

import pytest

from .conftest import REPO

# What runs a script: sbatch's scripts hand their arguments to the stage they start.
SLURM_STAGES = {"slurm/pretrain.sh": "pipeline/pretrain.py", "slurm/finetune.sh": "pipeline/finetune.py",
                "slurm/preprocess.sh": "preprocessing/run_beam.py"}
CONSOLE_SCRIPTS = {"bert-preprocess": "preprocessing/run_beam.py", "bert-pretrain": "pipeline/pretrain.py",
                   "bert-finetune": "pipeline/finetune.py", "bert-export": "pipeline/export.py",
                   "bert-embed": "pipeline/embed.py", "bert-report": "pipeline/report.py"}
SHELL_ENDS = {"|", "||", "&&", ";", ">", ">>", "2>&1", "&"}

# Run in a fresh interpreter: each script's --help, in-process (one import of torch for all).
HELP_ALL = r"""
import contextlib, io, json, os, runpy, sys
out = {}
path = list(sys.path)
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    sys.path[:] = [os.path.dirname(os.path.abspath(script)), *path]  # as `python script` has it
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit:
            pass
    out[script] = buf.getvalue()
print("HELP_JSON " + json.dumps(out))
"""


def doc_texts():
    """(source, text) of every place that shows commands."""
    for path in ["README.md", "ds_configs/README.md", *sorted(glob.glob("docs/*.md", root_dir=REPO))]:
        with open(os.path.join(REPO, path), encoding="utf-8") as f:
            text = f.read()
        for block in re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, re.S):
            yield path, block
        for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
            yield path, span.replace("\n", " ")  # a span the text wraps
    for path in sorted(glob.glob("slurm/*.sh", root_dir=REPO)):
        with open(os.path.join(REPO, path), encoding="utf-8") as f:
            header = [ln[1:] for ln in f.read().splitlines() if ln.startswith("#") and not ln.startswith("#!")]
        yield path, "\n".join(header)
    for path in sorted(glob.glob("benchmarks/*.sh", root_dir=REPO)):  # the commands they run, comments too
        with open(os.path.join(REPO, path), encoding="utf-8") as f:
            yield path, "\n".join(ln.lstrip("# ") for ln in f.read().splitlines() if not ln.startswith("#!"))
    for path in sorted(glob.glob("benchmarks/*.py", root_dir=REPO)):
        with open(os.path.join(REPO, path), encoding="utf-8") as f:
            yield path, ast.get_docstring(ast.parse(f.read())) or ""


def script_of(token: str) -> str | None:
    token = token.replace("$REPO/", "").replace('"', "")
    if token in CONSOLE_SCRIPTS:
        return CONSOLE_SCRIPTS[token]
    if token in SLURM_STAGES:
        return SLURM_STAGES[token]
    if re.fullmatch(r"(pipeline|preprocessing|benchmarks)/\w+\.py", token):
        return token
    return None


class Command(NamedTuple):
    source: str
    launcher: tuple[str, ...]  # the tokens before the script: python, torchrun --nproc-per-node 2, sbatch --nodes=4
    script: str
    args: tuple[str, ...]
    partial: bool  # "…" stands for flags the text leaves out, or FILE, N, DIR for values

    @property
    def flags(self) -> tuple[str, ...]:
        # without "=value", or the prose's ")" or ":" after a flag
        return tuple(m.group() for m in (re.match(r"--[a-zA-Z][\w-]*", a) for a in self.args) if m)


def documented_commands(bare: bool = False) -> list[Command]:
    """Each command line the docs show that runs one of the project's scripts with flags, once;
    with ``bare``, also those that run one without flags (``python benchmarks/host_ops.py``)."""
    commands = {}
    for source, text in doc_texts():
        text = re.sub(r"\\\n\s*#?", " ", text)  # continuation lines, in comments too
        for line in text.splitlines():
            line = line.split(" # ")[0].replace("[", " ").replace("]", " ")
            try:
                tokens = shlex.split(line.replace("…", " … "))
            except ValueError:  # an unbalanced quote in prose
                continue
            start = 0
            for i, token in enumerate(tokens):
                if token in SHELL_ENDS:
                    start = i + 1
                script = script_of(token)
                if not script:
                    continue
                args = []
                for arg in tokens[i + 1:]:
                    if arg in SHELL_ENDS or arg.startswith(">") or script_of(arg):
                        break
                    args.append(arg)
                command = Command(source, tuple(tokens[start:i]), script, tuple(a for a in args if a not in ("…", "...")),
                                  any(a in ("…", "...") or re.fullmatch(r"[A-Z][A-Z_]*", a) for a in args))
                # With no flag and no launcher: a file named in prose.
                if command.flags or (bare and command.launcher):
                    commands.setdefault(command[:4], command)
    return list(commands.values())


@pytest.fixture(scope="module")
def known_flags():
    commands = documented_commands()
    scripts = sorted({c.script for c in commands})
    proc = subprocess.run([sys.executable, "-c", HELP_ALL, *scripts], cwd=REPO, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600, env={**os.environ, "COLUMNS": "200"})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("HELP_JSON ")]
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    helps = json.loads(line[-1][len("HELP_JSON "):])
    flags = {script: set(re.findall(r"(?<![\w-])--[a-zA-Z][\w-]*", text)) for script, text in helps.items()}
    flags["preprocessing/run_beam.py"] |= beam_flags()
    # Bare commands of the scripts the flagged ones run: a `python script.py` must still pass the
    # script's required flags.
    bare = [c for c in documented_commands(bare=True) if not c.flags and c.script in helps]
    return commands, flags, (commands + bare, {script: required_flags(text) for script, text in helps.items()})


def required_flags(help_text: str) -> set[str]:
    """The flags argparse's usage line shows outside brackets: the required ones."""
    usage = help_text.split("\n\n")[0]
    while (shorter := re.sub(r"\[[^\[\]]*\]", "", usage)) != usage:  # nested optional groups, innermost first
        usage = shorter
    return set(re.findall(r"(?<![\w-])--[a-zA-Z][\w-]*", usage))


def beam_flags() -> set[str]:
    """The flags Apache Beam's PipelineOptions take, collected as run_beam.py's own check does."""
    import argparse

    from apache_beam.options.pipeline_options import PipelineOptions

    parser = argparse.ArgumentParser(add_help=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    return {o for a in parser._actions for o in a.option_strings}


def test_the_docs_show_commands_of_every_entry_script(known_flags):
    commands, _, _ = known_flags
    shown = {c.script for c in commands}
    for script in ("preprocessing/run_beam.py", "pipeline/pretrain.py", "pipeline/finetune.py",
                   "pipeline/export.py", "pipeline/embed.py", "pipeline/report.py",
                   "benchmarks/pretrain_gpu.py", "benchmarks/host_ops.py"):
        assert script in shown, f"no documented command runs {script}: is the extraction broken?"
    assert sum(len(c.flags) for c in commands) > 200
    gpu_checks = [c for c in commands if c.source == "benchmarks/gpu_checks.sh" and c.script.endswith("pretrain_gpu.py")]
    assert gpu_checks and {"--accumulation", "--budget", "--out"} <= set(gpu_checks[0].flags), gpu_checks


def test_every_documented_flag_is_one_its_script_knows(known_flags):
    commands, flags, _ = known_flags
    for script, known in flags.items():
        assert "--help" in known, f"{script} --help printed no flags"
    unknown = [f"{c.source}: {c.script} {flag}" for c in commands for flag in c.flags if flag not in flags[c.script]]
    assert not unknown, "flags the docs show that the script does not take:\n" + "\n".join(unknown)


def test_every_whole_benchmark_command_passes_its_required_flags(known_flags):
    # The benchmarks' commands only: the stages' names stand in the prose alone ("`python
    # pipeline/pretrain.py` trains ..."), and their sbatch scripts pass --data from DATA_DIR.
    _, _, (commands, required) = known_flags
    assert required["benchmarks/host_ops.py"] == {"--ds-config"}  # the usage line was read
    missing = [f"{c.source}: {' '.join(c.launcher)} {c.script} {' '.join(c.args)}: no {', '.join(sorted(need))}"
               for c in commands if c.script.startswith("benchmarks/") and not c.partial
               and (need := required[c.script] - set(c.flags))]
    assert not missing, "documented commands that would stop at a missing required flag:\n" + "\n".join(missing)


def option(tokens, *names, default=None):
    """The value of the first of ``names`` in ``tokens``, as ``--name N`` or ``--name=N``."""
    for i, token in enumerate(tokens):
        for name in names:
            if token == name and i + 1 < len(tokens):
                return tokens[i + 1]
            if token.startswith(name + "="):
                return token.split("=", 1)[1]
    return default


def sbatch_default(script: str, name: str) -> str:
    with open(os.path.join(REPO, script), encoding="utf-8") as f:
        return re.search(rf"^#SBATCH {name}=(\d+)", f.read(), re.M).group(1)


def processes(command: Command) -> int | None:
    """How many processes the command's launcher starts; None where the text does not say."""
    launcher = command.launcher
    if "sbatch" in launcher:
        script = next(s for s, stage in SLURM_STAGES.items() if stage == command.script)
        nodes = option(launcher, "--nodes", "-N", default=sbatch_default(script, "--nodes"))
        per_node = option(launcher, "--ntasks-per-node", default=sbatch_default(script, "--ntasks-per-node"))
        return int(nodes) * int(per_node)
    if "torchrun" in launcher:
        return (int(option(launcher, "--nnodes", default=1))
                * int(option(launcher, "--nproc_per_node", "--nproc-per-node", default=1)))
    if "deepspeed" in launcher:  # every GPU of the node: the README's examples are for 8
        return int(option(launcher, "--num_nodes", default=1)) * int(option(launcher, "--num_gpus", default=8))
    if launcher[-1:] in (("python",), ("python3",)):
        return 1
    return None


def test_documented_runs_divide_their_batch_among_their_processes():
    # A run whose global batch is not micro-batch x processes x accumulation stops at start-up, on
    # every rank (pipeline/ds_config.py: plan_batches); the defaults are for one process.
    from pipeline.ds_config import DsConfigError, plan_batches
    from pipeline.engine import EngineConfig
    from pipeline.finetuning.config import ENGINE_DEFAULTS as FINETUNE
    from pipeline.train_config import ENGINE_DEFAULTS as PRETRAIN

    defaults = {"pipeline/pretrain.py": PRETRAIN, "pipeline/finetune.py": FINETUNE}
    checked, failing = [], []
    for c in documented_commands():
        world = processes(c) if c.script in defaults and not c.partial else None
        if world is None:
            continue
        global_batch = int(option(c.args, "--global-batch-size",
                                  default=EngineConfig.__dataclass_fields__["global_batch_size"].default))
        micro = int(option(c.args, "--micro-batch-size", default=defaults[c.script]["micro_batch_size"]))
        try:
            plan_batches(global_batch, micro, world)
        except DsConfigError as err:  # names the sizes that would work
            failing.append(f"{c.source}: {' '.join(c.launcher)} {c.script} {' '.join(c.args)}\n  on {world}: {err}")
        checked.append(world)
    assert not failing, "\n".join(failing)
    assert checked.count(8) >= 4 and checked.count(1) >= 4, checked  # the GPU examples and the CPU ones
