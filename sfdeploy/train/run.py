"""``sfdeploy finetune``: from a dataset and a preset to a trained work dir.

::

    WORK/config.py               the full merged MMAction2 config (what was trained, exactly)
    WORK/class_index.txt         class names, line i = label i
    WORK/pretrained.pth          the pretrained tensors that fitted the model (if any)
    WORK/best_acc_top1_*.pth     best checkpoint by val top-1 (mmengine's CheckpointHook)
    WORK/epoch_*.pth, last_checkpoint, <timestamp>/ (logs, TensorBoard events)
    WORK/finetune_summary.json   best top-1, best checkpoint, epochs, classes, preset, wall time
    WORK/annotations/            several datasets: each set's lists in the union's class index

Several datasets (``finetune DATA1 DATA2 ...``) train on their union and validate on the union of
their val splits, as MMAction2's multi-dataset training does (a ``ConcatDataset`` in
``WORK/config.py``); classes are merged by name (:func:`sfdeploy.data.layout.merge_datasets`).

``--resume`` continues the run in WORK from ``WORK/config.py`` and its last checkpoint, with the
schedule it started with.

Multi-node (``--nnodes K``): every machine runs the same command with its ``--node-rank``; each
prepares its own WORK (identical files, written atomically, so a shared filesystem is fine too),
torchrun joins them at ``--master-addr``, and the processes of node 0 write the checkpoints, logs
and the summary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sfdeploy.compat import ensure_mmaction, load_config
from sfdeploy.data.layout import CLASS_INDEX, PreparedData, merge_datasets, write_class_index
from sfdeploy.errors import InputError, TrainingError
from sfdeploy.fsutil import ensure_writable_dir, replace_atomically
from sfdeploy.train.config import build_config, check_machine, use_cuda
from sfdeploy.train.files import ANNOTATIONS_DIR, CONFIG_FILE, RUN_INFO, SUMMARY_FILE
from sfdeploy.train.launch import cpu_threads, run_training
from sfdeploy.train.options import FinetuneOptions
from sfdeploy.train.presets import preset_path
from sfdeploy.train.pretrained import prepare_pretrained, pretrained_source
from sfdeploy.train.strategies import check_options, summary_facts

log = logging.getLogger("sfdeploy")


def _has_run(work: Path) -> bool:
    return (work / "last_checkpoint").is_file()


def _config(data: PreparedData, opts: FinetuneOptions) -> Any:
    cfg = load_config(preset_path(opts.preset))
    return build_config(cfg, data, opts)


def _dump(cfg: Any, path: Path) -> None:
    replace_atomically(path, lambda tmp: cfg.dump(str(tmp)))


def _prepare_new_run(data: PreparedData, opts: FinetuneOptions, work: Path) -> None:
    if data.parts:
        log.info("training on the union of %d datasets: %d classes, %d train and %d val videos (lists in %s)",
                 len(data.parts), len(data.classes), len(data.train), len(data.val), work / ANNOTATIONS_DIR)
    without_val = data.classes_without_val()
    if without_val:
        log.warning("class(es) with training videos but none in the val split(s), so their accuracy is not "
                    "measured: %s", ", ".join(without_val))
    cfg = _config(data, opts)
    batch_choice = None
    if opts.batch_size == "auto":
        from sfdeploy.train.autobatch import auto_batch_size

        _dump(cfg, work / CONFIG_FILE)  # what the probe builds the model and pipeline from
        batch_choice = auto_batch_size(work / CONFIG_FILE, cfg.train_dataloader.batch_size,
                                       opts.train_videos(data), opts.world_size, opts.accumulate)
        log.info("--batch-size auto on %s: %d per process (%s: %s)", batch_choice.device, batch_choice.batch_size,
                 batch_choice.reason, batch_choice.why)
        opts = dataclasses.replace(opts, batch_size=batch_choice.batch_size)
        cfg = _config(data, opts)  # the schedule and the LR follow the batch
    if data.clip_frames is not None:
        from sfdeploy.clipspec import ClipSpec

        needed = ClipSpec.from_config(cfg).min_frames
        if data.clip_frames < needed:
            log.warning("the data was prepared for clips of %d frames but preset '%s' spans %d: videos "
                        "shorter than that are looped, and prepare_report.json does not list them as short "
                        "(re-run `data prepare --preset %s` to see them)", data.clip_frames, opts.preset, needed,
                        opts.preset)
    source = pretrained_source(cfg, opts.pretrained)
    pretrained_info = None
    if source:
        path, info = prepare_pretrained(str(source), cfg.model, work)
        cfg.load_from = str(path)
        pretrained_info = info.to_dict()
    else:
        cfg.load_from = None
    cfg.resume = False
    _dump(cfg, work / CONFIG_FILE)
    write_class_index(work / CLASS_INDEX, data.classes)
    run_info = {
        "preset": opts.preset,
        "classes": data.classes,
        "num_classes": len(data.classes),
        "train_videos": len(data.train),
        "val_videos": len(data.val),
        "data": str(data.source) if data.source else None,
        "datasets": data.extra.get("datasets") if data.parts else None,
        "classes_without_val": without_val,
        "config": str(work / CONFIG_FILE),
        "seed": opts.seed,
        "flip": any(s["type"] == "Flip" for s in cfg.train_pipeline),
        "pretrained": pretrained_info,
        **summary_facts(cfg, data, opts),
        "batch_size_auto": batch_choice.to_dict() if batch_choice else None,
        **_distillation_facts(cfg, opts),
    }
    replace_atomically(work / RUN_INFO, lambda tmp: tmp.write_text(json.dumps(run_info, indent=2) + "\n"))


#: Options that WORK/config.py fixes for the whole run: a resumed run keeps its own.
_RUN_SETTINGS = ("freeze_backbone", "unfreeze_after", "backbone_lr_mult", "accumulate", "class_weights",
                 "overfit", "batch_size", "checkpointing", "distill_temperature", "distill_weight")


def _check_resumable(opts: FinetuneOptions, work: Path) -> None:
    """What ``--resume`` needs that can be checked without MMAction2: an earlier run in WORK, and
    no option that would not apply to it."""
    if not _has_run(work) or not (work / CONFIG_FILE).is_file():
        fix = "start the run without --resume"
        if opts.nnodes > 1:  # every process reads the checkpoint from its own node's WORK
            fix = ("every node resumes from WORK/last_checkpoint: put WORK on a shared filesystem, or copy "
                   "node 0's WORK to this node")
        raise InputError("nothing to resume: no checkpoint of an earlier run", path=work, fix=fix)
    defaults = FinetuneOptions(work_dir=work)
    changed = [f"--{name.replace('_', '-')}" for name in _RUN_SETTINGS
               if getattr(opts, name) != getattr(defaults, name)]
    if opts.distill_from is not None:
        _check_resumed_teacher(opts, work)
    if changed:
        raise InputError(f"--resume continues the run with the settings in WORK/config.py; "
                         f"{', '.join(changed)} would not apply", path=work,
                         fix="drop them when resuming, or start a new run in another --work-dir")


def _distillation_facts(cfg: Any, opts: FinetuneOptions) -> dict[str, Any]:
    """A distilled run's ``distillation`` entry of sfdeploy_run.json: the teacher's facts (the summary
    adds the student's, :func:`_summarise_distillation`); nothing for other runs."""
    if opts.distill_from is None:
        return {}
    from sfdeploy.train.distill import run_facts

    return {"distillation": run_facts(cfg)}


def _check_resumed_teacher(opts: FinetuneOptions, work: Path) -> None:
    """``--resume --distill-from T``: the run in WORK must have been distilled from T (its teacher is in
    WORK/config.py; without --distill-from a distilled run resumes distilled all the same)."""
    info = work / RUN_INFO
    facts = (json.loads(info.read_text()) if info.is_file() else {}).get("distillation")
    if not facts:
        raise InputError("--distill-from with --resume, but the run in WORK was not distilled", path=work,
                         fix="drop --distill-from to resume it as it was, or start a distilled run in another "
                             "--work-dir")
    if Path(facts["teacher_work"]).resolve() != Path(opts.distill_from).resolve():
        raise InputError(f"the run in WORK was distilled from {facts['teacher_work']}, not {opts.distill_from}",
                         path=work, fix="drop --distill-from when resuming (the run keeps its teacher)")


def _summarise_distillation(work: Path, summary_path: Path) -> dict[str, Any]:
    """The summary, with a distilled run's ``distillation`` section completed (student vs teacher top-1,
    their measured speed ratio) and written back."""
    summary = json.loads(summary_path.read_text())
    if summary.get("distillation"):
        from sfdeploy.train.distill import summarise

        summary = summarise(work, summary)
        replace_atomically(summary_path, lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    return summary


def _prepare_resume(opts: FinetuneOptions, work: Path) -> None:
    cfg = load_config(work / CONFIG_FILE)
    planned = cfg.train_cfg.max_epochs
    if opts.epochs is not None and opts.epochs != planned:
        raise InputError(
            f"--resume continues the run with its own schedule ({planned} epochs); "
            f"--epochs {opts.epochs} would leave the learning rate at the end of its cosine",
            path=work, fix="drop --epochs when resuming, or start a new run in another --work-dir")
    cfg.resume = True
    cfg.load_from = None  # mmengine finds WORK/last_checkpoint
    _dump(cfg, work / CONFIG_FILE)


def _launch(work: Path, opts: FinetuneOptions, console_log: bool) -> None:
    if opts.world_size == 1:
        run_training(work, console_log=console_log)
        return
    if opts.nnodes == 1:
        nodes = ["--standalone"]
    else:
        nodes = [f"--nnodes={opts.nnodes}", f"--node_rank={opts.node_rank}",
                 f"--master_addr={opts.master_addr}", f"--master_port={opts.master_port}"]
    command = [sys.executable, "-m", "torch.distributed.run", *nodes, f"--nproc_per_node={opts.gpus}",
               "-m", "sfdeploy.train.launch", str(work)]
    log.info("starting %d training process(es) on node %d of %d: %s", opts.gpus, opts.node_rank, opts.nnodes,
             " ".join(command))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if "OMP_NUM_THREADS" not in os.environ and not use_cuda():
        # torchrun would set 1 thread per process; size them to this machine's cores instead.
        workers = int(load_config(work / CONFIG_FILE).train_dataloader.get("num_workers", 0))
        env["OMP_NUM_THREADS"] = str(cpu_threads(opts.gpus, workers))
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise TrainingError(f"distributed training failed (exit code {result.returncode})", path=work,
                            fix="read the log above / in WORK/<timestamp>/ (on node 0); resume with --resume")


def finetune(data: PreparedData | Sequence[PreparedData] | None, opts: FinetuneOptions, *,
             console_log: bool = True) -> dict[str, Any]:
    """Train (or resume) and return the contents of ``finetune_summary.json`` (on a node of rank
    > 0 of a multi-node run, which writes no summary: where node 0 writes it). ``data``: one
    dataset, or several, read with ``part=True``, to train on their union. ``console_log=False``
    (one process): mmengine's log goes to its file in WORK only, a progress bar to the console."""
    if opts.gpus < 1:
        raise InputError(f"--gpus must be >= 1, got {opts.gpus}", fix="use --gpus 1 (or the number of GPUs)")
    # What can be refused without MMAction2 (seconds to import) is refused first.
    check_options(opts)
    if not opts.resume:
        preset_path(opts.preset)
    check_machine(opts, use_cuda())
    work = Path(opts.work_dir).resolve()
    ensure_writable_dir(work, "work dir", "--work-dir")
    if opts.resume:
        _check_resumable(opts, work)
    ensure_mmaction()
    if opts.resume:
        _prepare_resume(opts, work)
    else:
        if not data:
            raise InputError("no data given", fix="pass DATA (a folder from `sfdeploy data prepare`)")
        if _has_run(work):  # checked before anything (the union's lists) is written into WORK
            raise InputError("the work dir already holds a training run", path=work,
                             fix="pass --resume to continue it, or choose a new --work-dir")
        if not isinstance(data, PreparedData):
            data = data[0] if len(data) == 1 else merge_datasets(data, work / ANNOTATIONS_DIR)
        _prepare_new_run(data, opts, work)
    summary_path = work / SUMMARY_FILE
    if opts.node_rank == 0:
        summary_path.unlink(missing_ok=True)
    _launch(work, opts, console_log)
    if opts.node_rank != 0:
        # Node 0's processes write checkpoints, logs and the summary (in node 0's WORK).
        return {"node_rank": opts.node_rank, "nnodes": opts.nnodes, "work_dir": str(work),
                "summary": f"written by node 0 to its WORK/{SUMMARY_FILE}"}
    if not summary_path.is_file():
        raise TrainingError("training ended without writing its summary", path=work,
                            fix="read the training log in WORK/<timestamp>/")
    return _summarise_distillation(work, summary_path)
