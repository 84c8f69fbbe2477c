"""Optimizer parameter groups: weight decay on the matrices, none on biases and LayerNorm.

The BERT recipe (Google's ``optimization.py``, NVIDIA's ``run_pretraining.py``, Hugging Face's
``Trainer``) excludes biases and LayerNorm gains and shifts from weight decay: decaying them pulls
a normalisation's scale towards zero and a bias towards no offset, which regularises nothing
useful. Layers are told apart by module type, not by name, so a renamed or extra LayerNorm is
still found; embeddings are matrices and decay, as in all three.

LAMB scales each tensor's update by a trust ratio ||w|| / ||update||, clamped by DeepSpeed's
FusedLamb to [min_coeff, max_coeff] = [0.01, 10]. NVIDIA's recipe (apex FusedLAMB,
``use_nvlamb=False``) applies the ratio to the decayed group only: a bias or LayerNorm shift
starts at zero, so after its first update (ratio 1: DeepSpeed's kernel skips a zero norm) its
ratio is about the learning rate, below the 0.01 floor, and it barely moves again. The exempt
group's coefficient is therefore pinned to 1.
"""

from __future__ import annotations

import torch


def decays(module: torch.nn.Module, name: str) -> bool:
    """Whether parameter ``name`` (its name inside ``module``, e.g. ``bias``) takes weight decay."""
    return not (isinstance(module, torch.nn.LayerNorm) or name == "bias")


def weight_decay_groups(model: torch.nn.Module, weight_decay: float, ds_config: dict | None = None) -> list[dict]:
    """Two groups for ``torch.optim``/DeepSpeed: ``[{decayed, weight_decay}, {the rest, 0.0}]``;
    with ``ds_config``'s optimizer LAMB, the rest without a trust ratio.

    Each group carries its own ``weight_decay``, which overrides the optimizer's default, so a
    DeepSpeed config's injected value applies to the first group only. A parameter shared by
    two modules (BERT ties the MLM output projection to the word embeddings) appears once.
    """
    decayed, exempt, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            (decayed if decays(module, name) else exempt).append(param)
    return [{"params": params, **settings}
            for params, settings in zip((decayed, exempt), group_settings(weight_decay, ds_config))]


def group_settings(weight_decay: float, ds_config: dict | None = None) -> list[dict]:
    """The two groups' settings, without their parameters: also what a resume puts back over
    the ones its checkpoint restored."""
    exempt = {"weight_decay": 0.0}
    if str(((ds_config or {}).get("optimizer") or {}).get("type", "")).lower() == "lamb":
        exempt.update(max_coeff=1.0, min_coeff=1.0)
    return [{"weight_decay": weight_decay}, exempt]

