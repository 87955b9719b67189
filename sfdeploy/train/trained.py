"""The trained model of a work dir: ``WORK/config.py`` + a checkpoint + class names; what export,
eval and bench start from, and what teaches a distilled student (:mod:`sfdeploy.train.distill`).

The checkpoint must fit the config exactly. MMAction2's ``init_recognizer`` loads with
``strict=False`` and only logs what did not fit, which would export a half-random model; here
any missing, unexpected or mis-shaped tensor is an error that names both files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sfdeploy.compat import ensure_mmaction, load_checkpoint_file, load_config
from sfdeploy.data.layout import CLASS_INDEX, read_class_index
from sfdeploy.errors import ExportError, InputError
from sfdeploy.train.files import CONFIG_FILE, RUN_INFO, SUMMARY_FILE
from sfdeploy.train.pretrained import extract_state_dict

_IGNORED_PREFIXES = ("data_preprocessor.",)  # MMAction2's publish script strips these

#: the entry of a distilled run's model config that names its teacher (:mod:`sfdeploy.train.distill`)
DISTILL_KEY = "distill"


def plain_model_cfg(model_cfg: Any) -> Any:
    """The model a work dir deploys: a distilled run's config builds the training wrapper (student +
    frozen teacher, ``type=DistillRecognizer3D``); this is its student alone, as the recognizer type it
    wraps. Its checkpoint holds the student's tensors only, so export, eval and bench load it as any run's.
    Any other model config is returned as it is."""
    if DISTILL_KEY not in model_cfg:
        return model_cfg
    plain = {k: v for k, v in model_cfg.items() if k != DISTILL_KEY}
    plain["type"] = model_cfg[DISTILL_KEY]["student_type"]
    return type(model_cfg)(plain)


@dataclass
class TrainedModel:
    """What `sfdeploy finetune` left in WORK, loaded: the full config, the checkpoint, the recognizer in eval
    mode and the class names."""

    work_dir: Path
    config_path: Path
    checkpoint: Path
    cfg: Any
    recognizer: Any  # an mmaction Recognizer3D in eval mode, on CPU
    class_names: tuple[str, ...]
    preset: str | None


def find_checkpoint(work_dir: Path) -> Path:
    """The best checkpoint of a finetune run (from its summary, else the newest best_*.pth)."""
    summary = work_dir / SUMMARY_FILE
    if summary.is_file():
        best = json.loads(summary.read_text()).get("best_checkpoint")
        local = work_dir / Path(best or "").name
        if best and local.is_file():  # this work dir's own file, also where it was moved (or copied) from
            return local
        if best and Path(best).is_file():
            return Path(best)
    candidates = sorted(work_dir.glob("best_*.pth"), key=lambda p: p.stat().st_mtime)
    if candidates:
        return candidates[-1]
    raise InputError("work dir has no checkpoint (no finetune_summary.json best checkpoint, no best_*.pth)",
                     path=work_dir, fix="finish `sfdeploy finetune` first, or pass --checkpoint PATH")


def check_state_dict(model_state: dict, checkpoint_state: dict, config: Path, checkpoint: Path) -> None:
    """Refuse a checkpoint that does not fit the config's model (missing, unexpected or reshaped tensors), naming
    an example of each, instead of exporting a half-loaded model."""
    model_keys = {k for k in model_state if not k.startswith(_IGNORED_PREFIXES)}
    ckpt_keys = {k for k in checkpoint_state if not k.startswith(_IGNORED_PREFIXES)}
    missing = sorted(model_keys - ckpt_keys)
    unexpected = sorted(ckpt_keys - model_keys)
    shapes = sorted(f"{k} {tuple(checkpoint_state[k].shape)} vs {tuple(model_state[k].shape)}"
                    for k in model_keys & ckpt_keys if checkpoint_state[k].shape != model_state[k].shape)
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]}")
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
        raise ExportError(f"checkpoint does not match the model of {config}: {'; '.join(parts)}",
                          path=checkpoint, fix="pass the checkpoint trained with this config (--checkpoint), "
                          "or export the work dir it came from")


def load_trained(work_dir: Path, checkpoint: Path | None = None) -> TrainedModel:
    """The model trained in ``work_dir`` (its best checkpoint unless ``checkpoint`` is given), checked to match
    its config and class index."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        raise InputError("work dir not found", path=work_dir, fix="pass the --work-dir of `sfdeploy finetune`")
    config_path = work_dir / CONFIG_FILE
    if not config_path.is_file():
        raise InputError(f"no {CONFIG_FILE} in the work dir", path=work_dir,
                         fix="pass the --work-dir of `sfdeploy finetune`")
    checkpoint = Path(checkpoint) if checkpoint else find_checkpoint(work_dir)
    ensure_mmaction()
    from mmaction.registry import MODELS

    cfg = load_config(config_path)
    class_names = tuple(read_class_index(work_dir / CLASS_INDEX))
    if len(class_names) != cfg.model.cls_head.num_classes:
        raise InputError(f"{CLASS_INDEX} lists {len(class_names)} classes but the config's head has "
                         f"{cfg.model.cls_head.num_classes}", path=work_dir / CLASS_INDEX,
                         fix="restore the class_index.txt written by finetune")
    recognizer = MODELS.build(plain_model_cfg(cfg.model))
    state = extract_state_dict(load_checkpoint_file(checkpoint), str(checkpoint))
    check_state_dict(recognizer.state_dict(), state, config_path, checkpoint)
    recognizer.load_state_dict({k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)},
                               strict=False)  # strictness checked above, data_preprocessor aside
    recognizer.cfg = cfg  # what mmaction.apis expects of a recognizer
    recognizer.eval()
    preset = None
    run_info = work_dir / RUN_INFO
    if run_info.is_file():
        preset = json.loads(run_info.read_text()).get("preset")
    return TrainedModel(work_dir=work_dir, config_path=config_path, checkpoint=checkpoint, cfg=cfg,
                        recognizer=recognizer, class_names=class_names, preset=preset)
