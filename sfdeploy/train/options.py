"""What ``sfdeploy finetune`` was asked for, and how sfdeploy adds its modules to a config: the
facts :mod:`sfdeploy.train.config` and :mod:`sfdeploy.train.strategies` both build on (owned here,
so that neither imports the other for them)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfdeploy.data.layout import PreparedData
from sfdeploy.train.files import RUN_INFO
from sfdeploy.train.presets import DEFAULT_PRESET

#: each shipped preset's distillation student (``--distill-from`` without ``--preset``): the same clips,
#: a slimmer network (:mod:`sfdeploy.train.distill`)
STUDENT_PRESETS = {"slowfast_tiny": "slowfast_tiny_student", "slowfast_r50_4x16": "slowfast_r18_4x16",
                   "slowfast_r50_8x8": "slowfast_r18_4x16"}


def default_preset(distill_from: Path | None = None) -> str:
    """The preset of a run that names none: with a teacher (``--distill-from``), its preset's student
    (:data:`STUDENT_PRESETS`, the teacher's preset read from its ``sfdeploy_run.json``); else (or for a
    teacher trained from a user's own config) :data:`DEFAULT_PRESET`."""
    info = Path(distill_from) / RUN_INFO if distill_from is not None else None
    preset = json.loads(info.read_text()).get("preset") if info is not None and info.is_file() else None
    return STUDENT_PRESETS.get(preset, DEFAULT_PRESET) if preset else DEFAULT_PRESET


@dataclass
class FinetuneOptions:
    """What ``sfdeploy finetune`` was asked for; None means "the preset's value"."""

    work_dir: Path
    preset: str | None = None  # None: default_preset(distill_from), resolved on construction
    epochs: int | None = None
    batch_size: int | str | None = None  # an int, "auto" (resolved by sfdeploy.train.autobatch), None
    lr: float | None = None
    pretrained: str | None = "default"  # "default" (the preset's load_from), "none", path or URL
    amp: bool = False
    resume: bool = False
    gpus: int = 1
    flip: bool | None = None  # None: off when the data is direction-sensitive, else the preset's
    seed: int = 0
    deterministic: bool = False
    balanced: bool = False
    patience: int | None = None
    workers: int | None = None
    cfg_options: dict[str, Any] = field(default_factory=dict)
    # Finetuning strategies (sfdeploy.train.strategies)
    freeze_backbone: bool = False
    unfreeze_after: int | None = None  # epochs of head-only training before everything trains
    backbone_lr_mult: float | None = None
    accumulate: int = 1  # batches whose gradients make one optimizer step
    class_weights: str | None = None  # "auto" or a file of per-class weights
    overfit: int | None = None  # train and validate on this many training videos
    checkpointing: bool = False  # MMAction2's activation checkpointing (with_cp) in the backbone
    # Multi-node DDP (torchrun); --gpus stays the processes per node
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500
    # Knowledge distillation (sfdeploy.train.distill): the teacher's WORK, the softmax temperature,
    # and the weight of the distillation term (loss = (1 - W) * CE + W * T^2 * KL)
    distill_from: Path | None = None
    distill_temperature: float = 4.0
    distill_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.preset is None:  # one rule for the CLI and for Python callers
            self.preset = default_preset(self.distill_from)

    @property
    def world_size(self) -> int:
        """Training processes in all: per node times nodes."""
        return max(1, self.gpus) * max(1, self.nnodes)

    def effective_batch(self, batch: int) -> int:
        """Videos per optimizer step: ``batch`` per process x --accumulate x processes."""
        return batch * self.accumulate * self.world_size

    def train_videos(self, data: PreparedData) -> int:
        """Videos one epoch trains on: the train list, or the --overfit subset."""
        return self.overfit or len(data.train)


def add_custom_imports(cfg: Any, *modules: str) -> None:
    """Make ``WORK/config.py`` import ``modules`` (which register sfdeploy's mmengine components:
    sampler, hooks, transforms) wherever it is loaded. The one way sfdeploy adds imports: merged
    into ``custom_imports``, never replacing what is there (a user config's own
    ``allow_failed_imports`` is kept; by default a missing module fails loudly)."""
    current = dict(cfg.get("custom_imports") or {})
    imports = current.get("imports") or []
    imports = [imports] if isinstance(imports, str) else list(imports)
    imports += [module for module in modules if module not in imports]
    cfg.custom_imports = dict(current, imports=imports, allow_failed_imports=current.get("allow_failed_imports", False))
