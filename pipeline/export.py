"""Export a DeepSpeed checkpoint of pretrain.py in Hugging Face format (contract 3).

    python pipeline/export.py runs/tiny                       # newest complete checkpoint
    python pipeline/export.py runs/tiny --tag step00000200 --out models/tiny

The export (default ``RUN_DIR/hf/<tag>``) holds ``model.safetensors`` + ``config.json``
(``save_pretrained``), the data dir's tokenizer files and ``training_info.json`` (tag,
step, data_run_id, pretrain_run_id), so that ``AutoModelForPreTraining`` (an ``mlm`` run's:
``AutoModelForMaskedLM``, which loads either), ``AutoTokenizer`` and ``pipeline("fill-mask")`` load
it and fine-tuning knows its inputs.
An existing output dir is replaced whole, but only when it is empty or an earlier export
(it holds ``training_info.json``); anything else needs ``--overwrite``.

The fp32 weights are rebuilt with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``
(ZeRO 1-3, any number of ranks), not the ``zero_to_fp32.py`` script copied into the
checkpoint, which fails with safetensors on BERT's tied embeddings/decoder. A ZeRO-0
checkpoint has no ZeRO partitions: loaded with ``torch.load(weights_only=True)``, its module
weights are taken as they are in fp32, and in fp16 or bf16 replaced by the fp32 masters of the
optimizer's state. DeepSpeed's own loaders unpickle whole objects: export and resume
only checkpoints of trusted runs.
The model is rebuilt from ``RUN_DIR/train_config.json`` (written by pretrain.py) and
the data dir's manifest, the same way the trainer built it.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import pickle
import shlex
import shutil
import sys

if __package__ in (None, ""):  # run as a file: see pipeline/__init__.py
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pipeline import checkpoint, model_card  # noqa: E402
from pipeline.engine import flat  # noqa: E402
from pipeline.output_path import built_beside, file_beside  # noqa: E402
from preprocessing import cli_parser  # noqa: E402
from preprocessing.write_failure import WriteFailure, writing  # noqa: E402

log = logging.getLogger(__name__)
TRAIN_CONFIG = "train_config.json"
TRAINING_INFO = "training_info.json"


class ExportError(ValueError):
    """A run dir or checkpoint that cannot be exported; the message names the path."""


def write_train_config(config, pretrain_run_id: str | None = None) -> str:
    """``RUN_DIR/train_config.json``: the trainer's resolved config (+ its MLflow run id),
    what the export needs to rebuild the model. Call on rank 0 only."""
    from pipeline.model import PRESETS, read_config_file

    path = os.path.join(config.run_dir, TRAIN_CONFIG)
    os.makedirs(config.run_dir, exist_ok=True)
    # Flat: the engine's settings beside the stage's, under their flag names (the MLflow params' keys).
    values = {**flat(config), "pretrain_run_id": pretrain_run_id}
    # Paths as the trainer saw them: relative ones would resolve against whoever exports
    # later (another working directory), not against where pretraining ran.
    values["data"] = os.path.abspath(config.data)
    if config.model not in PRESETS and os.path.isfile(config.model):  # a config.json (a preset name wins)
        values["model"] = os.path.abspath(config.model)
        # Its content too: the export must not depend on a file outside the run dir (a published
        # BERT's folder, continued from and then deleted or moved).
        values["model_config"] = read_config_file(config.model)
    with writing("the run's config", path), file_beside(path) as temp, open(temp, "w") as f:
        json.dump(values, f, indent=2)
    return path


def resolve(path: str, tag: str | None = None, given_as: str | None = None) -> tuple[str, str, str]:
    """(run dir, checkpoints dir, tag) from a run dir, its ``checkpoints/`` or one tag dir.

    Without ``tag``: the newest complete one (a damaged one is skipped with a warning). A given tag
    without a COMPLETE marker, or whose marker does not vouch for its files, is refused.
    ``given_as``: the flag of another stage that named ``path`` (``--init-from``), said first in an
    error, which then gives no advice about exporting.
    """
    shown = path

    def refused(message: str, export_advice: str = "") -> ExportError:
        return ExportError(f"{given_as} {shown}: {message}" if given_as else message + export_advice)

    path = os.path.abspath(path)
    if tag is not None and tag.isdigit():  # --tag 200, as --resume 200 takes it
        tag = checkpoint.tag_for(int(tag))
    if os.path.exists(path) and not os.path.isdir(path):
        raise refused(f"{path} is a file, not a folder", " (pass the --run-dir of pipeline/pretrain.py)")
    if not os.path.isdir(path):
        raise refused(f"{path} does not exist", " (pass the --run-dir of pipeline/pretrain.py)")
    if os.path.isfile(os.path.join(path, checkpoint.COMPLETE)) or (
            os.path.basename(path).startswith("step") and os.path.basename(os.path.dirname(path)) == "checkpoints"):
        checkpoints, path_tag = os.path.dirname(path), os.path.basename(path)
        if tag is not None and tag != path_tag:
            raise ExportError(f"{path} is checkpoint {path_tag}, but --tag {tag} was asked for")
        tag = path_tag
    elif os.path.isdir(os.path.join(path, "checkpoints")):
        checkpoints = os.path.join(path, "checkpoints")
    elif os.path.basename(path) == "checkpoints" or os.path.exists(os.path.join(path, checkpoint.LATEST)):
        checkpoints = path
    else:
        raise refused(f"{path} has no checkpoints/ folder: no complete checkpoint",
                      " to export (pass the --run-dir of a pipeline/pretrain.py run that finished a save)")
    run_dir = os.path.dirname(checkpoints)
    if tag is None:
        tag = checkpoint.find_latest(checkpoints)
        if tag is None:
            raise refused(f"{checkpoints} has no complete checkpoint (no step*/ with a {checkpoint.COMPLETE} marker)",
                          ": train until a save finishes, then export")
    elif not os.path.isfile(os.path.join(checkpoints, tag, checkpoint.COMPLETE)):
        have = checkpoint.complete_tags(checkpoints)
        raise ExportError(f"{os.path.join(checkpoints, tag)} is not a complete checkpoint (missing, or its "
                          f"save did not finish); complete tags: {', '.join(have) or 'none'}")
    else:
        try:  # a damaged marker, or files missing or shorter than it lists
            checkpoint.read_meta(checkpoints, tag)
        except checkpoint.CheckpointError as err:
            raise refused(str(err)) from None
    return run_dir, checkpoints, tag


def read_train_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, TRAIN_CONFIG)
    if not os.path.isfile(path):
        raise ExportError(f"{path} is missing: it records the model and data the run used (pretrain.py "
                          "writes it); without it, pass the data dir (--data DATA_DIR) and the model is the "
                          "default preset")
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, ValueError) as err:
        raise ExportError(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(values, dict) or not isinstance(values.get("data"), str):
        raise ExportError(f"{path}: not the JSON object pretrain.py writes (no \"data\" entry naming the data dir); "
                          "pass --data DATA_DIR, or restore the file")
    # Written flat (write_train_config); a nested "engine" (dataclasses.asdict of a TrainConfig) reads the same.
    engine = values.pop("engine", None) or {}
    return {**values, **engine}


def fp32_state_dict(checkpoints: str, tag: str, model=None) -> dict:
    """The full fp32 weights of one tag, from any ZeRO stage and number of ranks.

    ZeRO 0 in fp16 keeps its fp32 master weights in the optimizer's state, the module's being
    their fp16 copies: ``model`` (the trained architecture) says which master is which parameter.
    """
    import torch

    tag_dir = os.path.join(checkpoints, tag)
    if glob.glob(os.path.join(tag_dir, "*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(checkpoints, tag=tag)
    # ZeRO 0: no partitioned optimizer files; the module's weights are whole in the model states.
    files = sorted(glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")))
    if not files:
        raise ExportError(f"{tag_dir} holds no DeepSpeed model states (mp_rank_*_model_states.pt)")
    try:  # tensors and plain values only: a checkpoint cannot run code in the exporting process
        with torch.serialization.safe_globals(_client_state_globals()):
            states = torch.load(files[0], map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ExportError(f"{files[0]}: refused to unpickle: it holds more than tensors and plain values "
                          f"({str(err).splitlines()[0]})") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    if model is not None and any(v.dtype in (torch.float16, torch.bfloat16) for v in states["module"].values()):
        state.update(zero0_master_weights(states.get("optimizer") or {}, model))
    return state


class ModelMismatch(ExportError):
    """The checkpoint's master weights do not fit the model: ``load_weights`` names both."""


def zero0_master_weights(optimizer_state: dict, model) -> dict:
    """The fp32 master weights that DeepSpeed's fp16 optimizers without ZeRO save
    (``engine.masters_by_param``), by state-dict name, their order that of the parameter groups
    the trainer gave the engine (``param_groups.weight_decay_groups``)."""
    from pipeline.engine import masters_by_param
    from pipeline.param_groups import weight_decay_groups

    groups = [group["params"] for group in weight_decay_groups(model, 0.0)]
    try:
        by_id = masters_by_param(groups, optimizer_state)
    except ValueError as err:
        raise ModelMismatch(str(err)) from None
    # keep_vars: tied names (the MLM decoder and the word embeddings) share one parameter object
    return {name: by_id[id(t)].float() for name, t in model.state_dict(keep_vars=True).items() if id(t) in by_id}


def _client_state_globals() -> list:
    """The classes beyond tensors and plain values in DeepSpeed's model states: the trainer's client
    state holds numpy's RNG state, a uint32 array (torch's own advice for numpy arrays)."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct  # numpy 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct  # numpy 1
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_weights(model, checkpoints: str, tag: str, model_name: str) -> None:
    """Loads the fp32 weights of ``checkpoints/tag`` into ``model`` (a BertForPreTraining),
    keeping its tied embeddings; a checkpoint of another shape is an ExportError naming both."""
    try:
        state = fp32_state_dict(checkpoints, tag, model)
    except ModelMismatch as err:
        raise ExportError(f"{checkpoints}/{tag} does not fit {model_name}: {err}") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        # A file damaged in place (its size, which the marker checks, unchanged): torch's or
        # DeepSpeed's traceback, from deep in the load. Not memory or permissions: no tag would do.
        if isinstance(err, RuntimeError) and not any(sign in str(err) for sign in _DAMAGED):
            raise
        raise ExportError(f"{checkpoints}/{tag}: a checkpoint file cannot be read ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else 'no detail'}); the tag is damaged: "
                          f"use an earlier one (complete tags: "
                          f"{', '.join(checkpoint.complete_tags(checkpoints)) or 'none'})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ: another model
        raise ExportError(f"{checkpoints}/{tag} does not fit {model_name}: "
                          f"{str(err).splitlines()[-1].strip()}") from None
    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    if set(missing) - tied or unexpected:
        raise ExportError(f"{checkpoints}/{tag} does not match {model_name}: "
                          f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    model.tie_weights()


# What torch says of a checkpoint file that is not the zip archive torch.save wrote.
_DAMAGED = ("PytorchStreamReader", "central directory", "torch.save", "zip archive", "load key")


def is_own_export(path: str) -> bool:
    """``path`` is a directory this module wrote: its ``training_info.json`` names a tag and checkpoint."""
    try:
        with open(os.path.join(path, TRAINING_INFO)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and {"tag", "checkpoint"} <= set(info)


def is_export_of(path: str, checkpoints: str, tag: str) -> bool:
    """``path`` is the export of this save of ``tag``: its ``training_info.json`` has the save's id,
    not that of an earlier save of the same name (another branch's, which checkpoint.prune set
    aside) nor none (an export of a checkpoint from before save ids)."""
    try:
        with open(os.path.join(path, TRAINING_INFO)) as f:
            info = json.load(f)
        save_id = checkpoint.read_meta(checkpoints, tag).get("save_id")
    except (OSError, ValueError, checkpoint.CheckpointError):
        return False
    return isinstance(info, dict) and save_id is not None and info.get("save_id") == save_id


def check_out_dir(out: str, overwrite: bool) -> None:
    """The export replaces ``out`` whole: only an empty directory or an earlier export is replaced
    without ``overwrite``, so a mistyped --out never deletes someone's files. Its folder must take
    the export (written beside it, then renamed): found before the minutes of loading weights."""
    from pipeline.output_path import OutputPathError, check_writable_parent

    try:
        check_writable_parent("--out", out)
    except OutputPathError as err:
        raise ExportError(str(err)) from None
    if not os.path.lexists(out) or overwrite or is_own_export(out):
        return
    if os.path.isdir(out) and not os.path.islink(out) and not os.listdir(out):
        return
    what = "a non-empty directory" if os.path.isdir(out) else "a file"
    raise ExportError(f"--out {out} is {what} that is not an export of pipeline/export.py (no {TRAINING_INFO} "
                      "in it); the export would replace it whole: pass --overwrite to allow that, or "
                      "another --out")


def _refuse_out_over_sources(out: str, sources: dict[str, str]) -> None:
    """The export replaces --out whole, --overwrite or not: an --out that is, holds, or lies in
    what it is made from would delete it, or part of it (--out RUN_DIR --overwrite left the run its
    export alone; --out RUN/checkpoints/TAG, the tag). In the run dir only RUN/hf/, where the
    exports go, and paths not there yet are free."""
    target = os.path.realpath(out)
    # What to name: the source --out is; else the outermost one it holds; else the innermost it lies in.
    found = []
    for what, path in sources.items():
        source = os.path.realpath(path)
        if _within(source, target):
            found.append(((0, 0) if source == target else (1, len(source)), "is" if source == target else "holds",
                          what, path))
        elif _within(target, source) and not (
                what == "run dir" and (_within(target, os.path.join(source, "hf")) or not os.path.lexists(out))):
            found.append(((2, -len(source)), "lies in", what, path))
    if found:
        _, where, what, path = min(found, key=lambda f: f[0])
        raise ExportError(f"--out {out}: {where} the {what} the export is made from ({path}), which replacing "
                          "it would damage; export to another --out (by default RUN_DIR/hf/TAG)")


def _within(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies under it (both resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def export_checkpoint(run_dir_or_checkpoint_dir: str, tag: str | None = None, out_dir: str | None = None,
                      data_dir: str | None = None, pretrain_run_id: str | None = None,
                      overwrite: bool = False) -> str:
    """Writes the Hugging Face export of ``tag`` (default: newest complete) and returns its dir.

    An existing ``out_dir`` is replaced only if it is empty or an earlier export (``check_out_dir``),
    or with ``overwrite``."""
    from pipeline.data_dir import DataDirError, read_manifest
    from pipeline.model import build_model, model_config
    from pipeline.train_config import TrainConfig

    run_dir, checkpoints, tag = resolve(run_dir_or_checkpoint_dir, tag)
    out = os.path.abspath(out_dir or os.path.join(run_dir, "hf", tag))
    check_out_dir(out, overwrite)  # before the minutes of loading weights
    # Without train_config.json (a run not started by pretrain.py), data_dir must be given
    # and the model is the trainer's default preset; a wrong guess fails on the shapes.
    has_config = os.path.isfile(os.path.join(run_dir, TRAIN_CONFIG))
    train_config = read_train_config(run_dir) if has_config or data_dir is None else {}
    given = data_dir is not None
    data_dir = data_dir or train_config["data"]
    try:
        manifest = read_manifest(data_dir)
    except DataDirError as err:
        if given or os.path.isdir(data_dir):  # a damaged data dir, not a moved one
            raise ExportError(str(err)) from None
        raise ExportError(f"{err} (the data dir {run_dir}/{TRAIN_CONFIG} names); if it moved, export with "
                          f"python pipeline/export.py {run_dir} --data NEW_PATH, and pass the export as --model"
                          ) from None
    # The export ships the data dir's tokenizer with the checkpoint's weights: they must be a pair
    # (a data dir preprocessed again, even with the same vocabulary size, has other ids).
    trained_with = checkpoint.read_meta(checkpoints, tag).get("tokenizer_fingerprint")
    if trained_with and trained_with != manifest["tokenizer"].get("fingerprint"):
        raise ExportError(f"{checkpoints}/{tag} was trained with tokenizer {trained_with[:12]}… but {data_dir} has "
                          f"{str(manifest['tokenizer'].get('fingerprint'))[:12]}… (manifest field "
                          "tokenizer.fingerprint): export with --data naming the data dir it was trained on")
    _refuse_out_over_sources(out, {"run dir": run_dir, "checkpoint dir": checkpoints, "data dir": data_dir})
    model = build_model(model_config(train_config.get("model", TrainConfig.model), manifest,
                                     values=train_config.get("model_config")))
    log.info("exporting %s/%s", checkpoints, tag)
    load_weights(model, checkpoints, tag, f"the model of {run_dir}/{TRAIN_CONFIG} "
                                          f"({train_config.get('model')!r})")

    # A temporary dir of its own beside ``out`` (never a name someone else could be using); a crash
    # leaves only it behind.
    # A full disk: one line, and the checkpoint (complete, never touched here) exports again later.
    again = shlex.join(["python", "pipeline/export.py", os.path.join(checkpoints, tag)] + (["--out", out] if out_dir else [])
                     + (["--data", data_dir] if given else []) + (["--overwrite"] if overwrite else []))
    # A finished export replaces the older one (or, with overwrite, whatever was there) whole.
    with writing("the Hugging Face export", out, f"export it again: {again}"), built_beside(out) as temp:
        _write_export(model, manifest, data_dir, temp, tag, checkpoints, train_config, pretrain_run_id)
    log.info("exported %s to %s", tag, out)
    return out


def masked_lm_only(model):
    """``BertForMaskedLM`` with a ``BertForPreTraining``'s encoder and MLM head: what an MLM-only run
    (no NSP term, so a next-sentence head and pooler that never learned) is exported as, so that
    ``AutoModelForPreTraining`` does not load that head as if it were trained."""
    from transformers import BertForMaskedLM

    masked_lm = BertForMaskedLM(model.config)
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith(("bert.pooler.", "cls.seq_relationship."))}
    masked_lm.load_state_dict(state, strict=True)
    return masked_lm  # save_pretrained records its class as the architecture


def _write_export(model, manifest: dict, data_dir: str, temp: str, tag: str, checkpoints: str,
                  train_config: dict, pretrain_run_id: str | None) -> None:
    objective = manifest.get("objective", "mlm-nsp")
    (masked_lm_only(model) if objective == "mlm" else model).save_pretrained(temp, safe_serialization=True)
    tokenizer_dir = os.path.join(data_dir, manifest["tokenizer"].get("path", "tokenizer"))
    for name in sorted(os.listdir(tokenizer_dir)):
        source = os.path.join(tokenizer_dir, name)
        if os.path.isfile(source) and not name.startswith("."):  # a write attempt's leftover
            shutil.copy2(source, os.path.join(temp, name))
    meta = checkpoint.read_meta(checkpoints, tag)
    # The weights the run began from, as the tag's marker recorded them: train_config.json is the
    # latest start's flags, and a resume ignores --init-from (or is given none). Markers from before
    # the resume checks (no train_rows) did not record it.
    init_from = meta.get("init_from") if "train_rows" in meta else train_config.get("init_from")
    info = {"tag": tag, "step": int(tag[len("step"):]) if tag[len("step"):].isdigit() else None,
            "data_run_id": manifest.get("data_run_id"),
            # The run that wrote the tag (its marker's); older checkpoints: the run dir's latest start.
            "pretrain_run_id": pretrain_run_id or meta.get("pretrain_run_id") or train_config.get("pretrain_run_id"),
            "init_from": init_from, "init_from_run_id": meta.get("init_from_run_id"),
            "train_rows": meta.get("train_rows"),
            "checkpoint": os.path.join(checkpoints, tag), "data_dir": os.path.abspath(data_dir),
            "model": train_config.get("model"), "tokenizer_fingerprint": manifest["tokenizer"].get("fingerprint"),
            "save_id": meta.get("save_id"),
            # the script conversion the text went through: fine-tuning applies it to its texts too
            "convert": manifest.get("convert"), "objective": objective, "language": manifest.get("language"),
            "max_seq_length": manifest["max_seq_length"]}
    with open(os.path.join(temp, TRAINING_INFO), "w") as f:
        json.dump(info, f, indent=2)
    model_card.write_card(temp, model_card.pretrained_card(model.config, info, manifest, init_from))


# The tokenizer files an export (and a fine-tuned model) carries beside its weights.
TOKENIZER_FILES = ("tokenizer", "vocab", "spm", "special_tokens", "sentencepiece")


def estimated_bytes(parameters: int, tokenizer_dir: str) -> int:
    """About what an export of a model of ``parameters`` weights takes on disk (a fine-tuned model
    too): the safetensors in fp32, and the tokenizer's files in ``tokenizer_dir``."""
    try:
        names = os.listdir(tokenizer_dir)
    except OSError:  # none (the benchmarks' synthetic data): the weights alone
        names = []
    tokenizer = sum(os.path.getsize(os.path.join(tokenizer_dir, name)) for name in names
                    if name.startswith(TOKENIZER_FILES) and os.path.isfile(os.path.join(tokenizer_dir, name)))
    return 4 * parameters + tokenizer


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = cli_parser.Parser(
        formatter_class=cli_parser.DefaultsFormatter,
        prog="python pipeline/export.py",
        description="Export a pretrain.py checkpoint in Hugging Face format (safetensors + config + "
                    "tokenizer), loadable with AutoModelForPreTraining.from_pretrained (an --objective mlm run's: "
                    "AutoModelForMaskedLM, which loads either) and pipeline('fill-mask').")
    p.add_argument("run_dir", help="the --run-dir of pipeline/pretrain.py (or its checkpoints/ or one tag dir)")
    p.add_argument("--tag", help="checkpoint tag, e.g. step00000200, or its step, 200 (default: the newest "
                                 "complete one)")
    p.add_argument("--out", help="output dir (default: RUN_DIR/hf/<tag>); an existing one is replaced only if it "
                                 "is empty or an earlier export (it holds training_info.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it is a non-empty directory (or a file) that is not an export")
    p.add_argument("--data", help="the data dir, if it moved since training (default: from train_config.json)")
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.run_dir, args.tag, args.out, args.data, overwrite=args.overwrite)
    except (ExportError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except WriteFailure as err:  # a full disk: one line, the checkpoint untouched
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
