"""Pretrained weights for finetuning: load safely, keep what fits, say what does not.

``--pretrained`` may name a Kinetics-400 checkpoint (400-class head) while the data has 4 classes.
Instead of handing the file to mmengine's ``load_from`` (which would unpickle it and log the head
mismatch among many lines), sfdeploy loads it with ``weights_only=True``, compares every tensor
with the model built from the config, writes the matching ones to ``WORK/pretrained.pth`` (plain
tensors) and points ``load_from`` there. The head is then re-initialised, and the summary says so.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sfdeploy.compat import ensure_mmaction, load_checkpoint_file
from sfdeploy.errors import InputError
from sfdeploy.fsutil import replace_atomically

log = logging.getLogger("sfdeploy")

PRETRAINED_FILE = "pretrained.pth"


@dataclass
class PretrainedInfo:
    """What loading pretrained weights did, for the log and ``finetune_summary.json``: how much
    of the model the checkpoint filled, and which tensors it could not (a classification head
    re-initialised for the new classes is expected; much more is worth a look)."""

    source: str
    loaded: int  # tensors copied into the model
    total: int  # tensors in the model
    reinitialised: list[str]  # model keys kept at their fresh initialisation (shape mismatch)
    missing: list[str]  # model keys the checkpoint does not have
    unused: int  # checkpoint tensors the model has no place for

    def to_dict(self) -> dict[str, Any]:
        """As plain data, for ``finetune_summary.json``."""
        return asdict(self)


def pretrained_source(cfg: Any, pretrained: str | None) -> str | None:
    """What ``--pretrained`` names: "default" is the preset's ``load_from`` (None for presets
    trained from scratch), "none"/None nothing, anything else a path or URL."""
    if pretrained in (None, "none"):
        return None
    if pretrained == "default":
        return cfg.get("load_from") or None
    return str(pretrained)


def extract_state_dict(checkpoint: Any, source: str) -> dict[str, Any]:
    """The model weights of a loaded checkpoint: its ``state_dict`` (MMAction2's checkpoints) or the
    checkpoint itself (``torch.save(model.state_dict())``), DDP's ``module.`` prefix removed; an
    :class:`InputError` for anything that is not a dict of tensors."""
    import torch

    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError("not a model checkpoint (expected a state_dict of tensors)", path=source,
                         fix="pass a .pth written by MMAction2 / torch.save(model.state_dict())")
    return {k.removeprefix("module."): v for k, v in state.items()}


def prepare_pretrained(source: str, model_cfg: Any, work_dir: Path) -> tuple[Path, PretrainedInfo]:
    """Write the usable part of ``source`` to ``WORK/pretrained.pth``; return it and a report."""
    ensure_mmaction()
    from mmaction.registry import MODELS

    state = extract_state_dict(load_checkpoint_file(source), source)
    reference = MODELS.build(model_cfg).state_dict()
    if not any(k in reference for k in state) and any(f"backbone.{k}" in reference for k in state):
        state = {f"backbone.{k}": v for k, v in state.items()}  # a bare backbone checkpoint
    keep = {k: v for k, v in state.items() if k in reference and v.shape == reference[k].shape}
    reinit = sorted(k for k, v in state.items() if k in reference and v.shape != reference[k].shape)
    missing = sorted(k for k in reference if k not in state)
    if not keep:
        raise InputError(
            "the checkpoint shares no weights with the model of this preset",
            path=source,
            fix="pass a checkpoint of the same architecture, or --pretrained none to train from scratch",
        )
    body_mismatch = [k for k in reinit if not k.startswith("cls_head.")]
    if body_mismatch:
        log.warning("pretrained: %d backbone tensor(s) differ in shape and stay re-initialised: %s",
                    len(body_mismatch), ", ".join(body_mismatch[:5]))
    head = [k for k in reinit if k.startswith("cls_head.")]
    if head:
        old = state[head[0]].shape[0]
        log.warning("pretrained: classification head re-initialised (checkpoint has %d classes, "
                    "the data has %d)", old, model_cfg.cls_head.num_classes)
    info = PretrainedInfo(source=str(source), loaded=len(keep), total=len(reference),
                          reinitialised=reinit, missing=missing, unused=len(state) - len(keep) - len(reinit))
    import torch

    path = Path(work_dir) / PRETRAINED_FILE
    checkpoint = {"state_dict": keep, "meta": {"sfdeploy_pretrained": info.to_dict()}}
    replace_atomically(path, lambda tmp: torch.save(checkpoint, tmp))
    return path, info
