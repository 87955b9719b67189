"""``sfdeploy finetune``: from a dataset and a preset to a trained work dir.

::

    WORK/config.py               the full merged MMAction2 config (what was trained, exactly)
    WORK/class_index.txt         class names, line i = label i
    WORK/pretrained.pth          the pretrained tensors that fitted the model (if any)
    WORK/best_acc_top1_*.pth     best checkpoint by val top-1 (mmengine's CheckpointHook)
    WORK/epoch_*.pth, last_checkpoint, <timestamp>/ (logs, TensorBoard events)
    WORK/finetune_summary.json   best top-1, best checkpoint, epochs, classes, preset, wall time

``--resume`` continues the run in WORK from ``WORK/config.py`` and its last checkpoint, with the
schedule it started with.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from sfdeploy.compat import ensure_mmaction, load_config
from sfdeploy.data.layout import CLASS_INDEX, PreparedData, write_class_index
from sfdeploy.errors import InputError, TrainingError
from sfdeploy.fsutil import ensure_writable_dir
from sfdeploy.train.config import FinetuneOptions, build_config
from sfdeploy.train.hooks import SUMMARY_FILE
from sfdeploy.train.launch import RUN_INFO, run_training
from sfdeploy.train.presets import preset_path
from sfdeploy.train.pretrained import prepare_pretrained

log = logging.getLogger("sfdeploy")

CONFIG_FILE = "config.py"


def _has_run(work: Path) -> bool:
    return (work / "last_checkpoint").is_file()


def _prepare_new_run(data: PreparedData, opts: FinetuneOptions, work: Path) -> None:
    if _has_run(work):
        raise InputError("the work dir already holds a training run", path=work,
                         fix="pass --resume to continue it, or choose a new --work-dir")
    cfg = load_config(preset_path(opts.preset))
    build_config(cfg, data, opts)
    if data.clip_frames is not None:
        from sfdeploy.clipspec import ClipSpec

        needed = ClipSpec.from_config(cfg).min_frames
        if data.clip_frames < needed:
            log.warning("the data was prepared for clips of %d frames but preset '%s' spans %d: videos "
                        "shorter than that are looped, and prepare_report.json does not list them as short "
                        "(re-run `data prepare --preset %s` to see them)", data.clip_frames, opts.preset, needed,
                        opts.preset)
    source = {"default": cfg.get("load_from"), "none": None}.get(opts.pretrained or "none", opts.pretrained)
    pretrained_info = None
    if source:
        path, info = prepare_pretrained(str(source), cfg.model, work)
        cfg.load_from = str(path)
        pretrained_info = info.to_dict()
    else:
        cfg.load_from = None
    cfg.resume = False
    cfg.dump(str(work / CONFIG_FILE))
    write_class_index(work / CLASS_INDEX, data.classes)
    run_info = {
        "preset": opts.preset,
        "classes": data.classes,
        "num_classes": len(data.classes),
        "train_videos": len(data.train),
        "val_videos": len(data.val),
        "data": str(data.source) if data.source else None,
        "config": str(work / CONFIG_FILE),
        "seed": opts.seed,
        "flip": any(s["type"] == "Flip" for s in cfg.train_pipeline),
        "pretrained": pretrained_info,
    }
    (work / RUN_INFO).write_text(json.dumps(run_info, indent=2) + "\n")


def _prepare_resume(opts: FinetuneOptions, work: Path) -> None:
    if not _has_run(work) or not (work / CONFIG_FILE).is_file():
        raise InputError("nothing to resume: no checkpoint of an earlier run", path=work,
                         fix="start the run without --resume")
    cfg = load_config(work / CONFIG_FILE)
    planned = cfg.train_cfg.max_epochs
    if opts.epochs is not None and opts.epochs != planned:
        raise InputError(
            f"--resume continues the run with its own schedule ({planned} epochs); "
            f"--epochs {opts.epochs} would leave the learning rate at the end of its cosine",
            path=work, fix="drop --epochs when resuming, or start a new run in another --work-dir")
    cfg.resume = True
    cfg.load_from = None  # mmengine finds WORK/last_checkpoint
    cfg.dump(str(work / CONFIG_FILE))


def _launch(work: Path, gpus: int) -> None:
    if gpus <= 1:
        run_training(work)
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               "-m", "sfdeploy.train.launch", str(work)]
    log.info("starting %d training processes: %s", gpus, " ".join(command))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise TrainingError(f"distributed training failed (exit code {result.returncode})", path=work,
                            fix="read the log above / in WORK/<timestamp>/; resume with --resume")


def finetune(data: PreparedData | None, opts: FinetuneOptions) -> dict[str, Any]:
    """Train (or resume) and return the contents of ``finetune_summary.json``."""
    if opts.gpus < 1:
        raise InputError(f"--gpus must be >= 1, got {opts.gpus}", fix="use --gpus 1 (or the number of GPUs)")
    work = Path(opts.work_dir).resolve()
    ensure_writable_dir(work, "work dir", "--work-dir")
    ensure_mmaction()
    if opts.resume:
        _prepare_resume(opts, work)
    else:
        if data is None:
            raise InputError("no data given", fix="pass DATA (a folder from `sfdeploy data prepare`)")
        _prepare_new_run(data, opts, work)
    summary_path = work / SUMMARY_FILE
    summary_path.unlink(missing_ok=True)
    _launch(work, opts.gpus)
    if not summary_path.is_file():
        raise TrainingError("training ended without writing its summary", path=work,
                            fix="read the training log in WORK/<timestamp>/")
    return json.loads(summary_path.read_text())
