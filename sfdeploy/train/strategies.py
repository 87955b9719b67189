"""Finetuning strategies, each written into ``WORK/config.py`` in mmengine / MMAction2's own terms.

=========================  ===================================================================
``--freeze-backbone``      ``custom_hooks += BackboneFreezeHook()`` (:mod:`sfdeploy.train.freeze`)
``--unfreeze-after N``     ``custom_hooks += BackboneFreezeHook(unfreeze_after=N)``
``--backbone-lr-mult F``   ``optim_wrapper.paramwise_cfg.custom_keys = {'backbone': {'lr_mult': F}}``
``--accumulate N``         ``optim_wrapper.accumulative_counts = N`` (the LR scaling counts it)
``--class-weights``        ``model.cls_head.loss_cls.class_weight = [...]``
``--overfit N``            train and val datasets = the same N training videos (``indices``), and
                           mmengine's ``EarlyStoppingHook`` stops once val top-1 is 100%
``--checkpointing``        ``with_cp=True`` in each ResNet3d of the backbone (for SlowFast: in
                           ``slow_pathway`` and ``fast_pathway``): MMAction2's activation
                           checkpointing, which recomputes each residual block's activations in
                           the backward pass instead of keeping them; ``custom_hooks +=
                           CheckpointBatchNormHook()`` (:mod:`sfdeploy.train.checkpointing`)
=========================  ===================================================================

Combinations that cannot mean anything are refused here, before any work starts, by
:func:`check_options` (option-only checks) and :func:`apply_strategies` (checks that need the
config or the data).
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

from sfdeploy.data.layout import PreparedData, spread_by_class
from sfdeploy.errors import InputError, OptionError
from sfdeploy.train.options import FinetuneOptions, add_custom_imports

FREEZE_MODULE = "sfdeploy.train.freeze"
FREEZE_HOOK = "BackboneFreezeHook"
BACKBONE_KEY = "backbone"  # paramwise_cfg key: every parameter of model.backbone
PATHWAYS = ("slow_pathway", "fast_pathway")  # ResNet3dSlowFast's two ResNet3d: where with_cp goes
CHECKPOINTING_MODULE = "sfdeploy.train.checkpointing"
CHECKPOINTING_HOOK = "CheckpointBatchNormHook"  # keeps BatchNorm statistics exact under with_cp
WEIGHTED_LOSSES = ("CrossEntropyLoss", "BCELossWithLogits")  # MMAction2 losses with class_weight


def check_options(opts: FinetuneOptions) -> None:
    """Refuse option values and combinations that make no sense, with the fix."""
    if isinstance(opts.batch_size, str) and opts.batch_size != "auto":
        raise InputError(f"--batch-size must be a number or 'auto', got {opts.batch_size!r}",
                         fix="use e.g. --batch-size 8, or --batch-size auto")
    if opts.freeze_backbone and opts.unfreeze_after is not None:
        raise InputError("--freeze-backbone trains the head only for the whole run, --unfreeze-after N "
                         "unfreezes the backbone after N epochs: they contradict each other",
                         fix="use --freeze-backbone (head only) or --unfreeze-after N (head first, then all)")
    if opts.freeze_backbone and opts.backbone_lr_mult is not None:
        raise InputError("--backbone-lr-mult sets the learning rate of a backbone that --freeze-backbone "
                         "does not train", fix="drop one of them (--unfreeze-after N goes with --backbone-lr-mult)")
    if opts.unfreeze_after is not None and opts.unfreeze_after < 1:
        raise InputError(f"--unfreeze-after must be >= 1, got {opts.unfreeze_after}",
                         fix="use --unfreeze-after 2 (or train everything from the start without it)")
    if opts.backbone_lr_mult is not None and not 0 < opts.backbone_lr_mult:
        raise InputError(f"--backbone-lr-mult must be positive, got {opts.backbone_lr_mult}",
                         fix="use e.g. --backbone-lr-mult 0.1; to not train the backbone, use --freeze-backbone")
    if opts.accumulate < 1:
        raise InputError(f"--accumulate must be >= 1, got {opts.accumulate}", fix="use e.g. --accumulate 4")
    if opts.class_weights is not None and opts.balanced:
        raise InputError("--class-weights and --balanced both correct class imbalance; together they "
                         "over-correct (rare classes weighted up *and* drawn more often)",
                         fix="use one of them: --balanced (sampling) or --class-weights auto (loss)")
    if opts.overfit is not None and opts.overfit < 1:
        raise InputError(f"--overfit must be >= 1, got {opts.overfit}", fix="use e.g. --overfit 8")
    if opts.checkpointing and opts.freeze_backbone:
        raise InputError("--checkpointing saves the memory of the backbone's backward pass, which "
                         "--freeze-backbone does not run (MMAction2 checkpoints nothing then)",
                         fix="drop --checkpointing (a frozen backbone keeps no activations for backward)")
    if opts.checkpointing and opts.unfreeze_after is not None and opts.world_size > 1:
        raise InputError("--checkpointing with --unfreeze-after on several processes: DDP must then look for "
                         "the frozen backbone's unused parameters, and MMAction2's (reentrant) checkpointing "
                         "hides the backbone's parameters from that search (DDP fails: 'mark a variable ready "
                         "only once')", fix="drop one of them, or train on one process")
    _check_nodes(opts)
    _check_distill(opts)


def _check_distill(opts: FinetuneOptions) -> None:
    """Distillation options that cannot apply: a temperature or weight without a teacher, or out of
    range (the teacher itself is checked with MMAction2, :func:`sfdeploy.train.distill.check_teacher`)."""
    if opts.distill_from is None:
        defaults = FinetuneOptions(work_dir=Path("."))
        given = [f"--{n.replace('_', '-')}" for n in ("distill_temperature", "distill_weight")
                 if getattr(opts, n) != getattr(defaults, n)]
        if given:
            raise OptionError(f"{', '.join(given)} without --distill-from", option=given[0],
                              fix="add --distill-from TEACHER_WORK, or drop them")
        return
    if not opts.distill_temperature > 0:
        raise OptionError(f"--distill-temperature must be > 0, got {opts.distill_temperature}",
                          option="--distill-temperature", fix="use e.g. --distill-temperature 4")
    if not 0 < opts.distill_weight <= 1:
        raise OptionError(f"--distill-weight must be in (0, 1], got {opts.distill_weight}",
                          option="--distill-weight", fix="use e.g. --distill-weight 0.5")


def _check_nodes(opts: FinetuneOptions) -> None:
    if opts.nnodes < 1:
        raise InputError(f"--nnodes must be >= 1, got {opts.nnodes}", fix="use --nnodes 1 (one machine)")
    if opts.nnodes == 1:
        if opts.node_rank != 0 or opts.master_addr is not None:
            raise InputError("--node-rank and --master-addr are for multi-node training",
                             fix="add --nnodes K (the number of machines), or drop them")
        return
    if not 0 <= opts.node_rank < opts.nnodes:
        raise InputError(f"--node-rank must be in 0..{opts.nnodes - 1}, got {opts.node_rank}",
                         fix="give each machine its own rank; rank 0 writes WORK")
    if not opts.master_addr:
        raise InputError("--nnodes > 1 needs --master-addr: the address of the rank-0 machine, "
                         "which every node connects to", fix="add --master-addr HOST (the same on every node)")
    if not 1 <= opts.master_port <= 65535:
        raise InputError(f"--master-port must be a TCP port, got {opts.master_port}", fix="use e.g. 29500")
    if opts.batch_size == "auto":
        raise InputError("--batch-size auto probes this machine's GPU; each node would pick its own batch, "
                         "but all nodes must train with the same one",
                         fix="find it with --batch-size auto on one node (it is printed and in the summary), "
                             "then pass that number on every node")


def apply_strategies(cfg: Any, data: PreparedData, opts: FinetuneOptions) -> None:
    """Write the strategies asked for into ``cfg`` (in place); see the module docstring."""
    from sfdeploy.train.pretrained import pretrained_source

    epochs = cfg.train_cfg.max_epochs
    if opts.freeze_backbone or opts.unfreeze_after is not None:
        if not pretrained_source(cfg, opts.pretrained):
            option = "--freeze-backbone" if opts.freeze_backbone else "--unfreeze-after"
            raise InputError(f"{option} keeps the backbone's weights, but this run has no pretrained weights: "
                             "a frozen random backbone gives the head nothing to learn from",
                             fix="pass --pretrained PATH|URL (the R50 presets load Kinetics-400 weights by "
                                 "default), or drop " + option)
        if "backbone" not in cfg.model:
            raise InputError("the model of this config has no 'backbone' to freeze",
                             fix="use a recognizer config (model.backbone + model.cls_head)")
        if opts.unfreeze_after is not None and opts.unfreeze_after >= epochs:
            raise InputError(f"--unfreeze-after {opts.unfreeze_after} with {epochs} epochs would never "
                             "train the backbone", fix=f"use --unfreeze-after below {epochs}, or --freeze-backbone")
        add_custom_imports(cfg, FREEZE_MODULE)
        cfg.custom_hooks = [*cfg.custom_hooks, dict(type=FREEZE_HOOK, unfreeze_after=opts.unfreeze_after)]
        if opts.world_size > 1:
            # Frozen parameters get no gradient; DDP must then not wait for them (it leaves their
            # .grad None, so they stay bit-identical), and picks them up again once unfrozen.
            cfg.find_unused_parameters = True
            if cfg.get("model_wrapper_cfg"):
                cfg.model_wrapper_cfg.find_unused_parameters = True
    if opts.backbone_lr_mult is not None:
        paramwise = dict(cfg.optim_wrapper.get("paramwise_cfg") or {})
        paramwise["custom_keys"] = {**(paramwise.get("custom_keys") or {}),
                                    BACKBONE_KEY: dict(lr_mult=opts.backbone_lr_mult)}
        cfg.optim_wrapper.paramwise_cfg = paramwise
    if opts.accumulate > 1:
        cfg.optim_wrapper.accumulative_counts = opts.accumulate
    if opts.class_weights is not None:
        _set_class_weights(cfg, data, opts.class_weights)
    if opts.overfit is not None:
        _overfit(cfg, data, opts.overfit)
    if opts.checkpointing:
        _enable_checkpointing(cfg)


def _enable_checkpointing(cfg: Any) -> None:
    """``with_cp=True`` where MMAction2 reads it: on a ResNet3d backbone itself, or, for
    ``ResNet3dSlowFast`` (which takes no ``with_cp``), on both pathways; a pathway the config
    leaves out gets ResNet3dSlowFast's default, as MMAction2 would build it."""
    from sfdeploy.compat import ensure_mmaction

    ensure_mmaction()
    from mmaction.registry import MODELS

    backbone = cfg.model.get("backbone") or {}
    cls = MODELS.get(backbone.get("type", ""))
    params = inspect.signature(cls.__init__).parameters if cls else {}
    if all(key in params for key in PATHWAYS):
        for key in PATHWAYS:
            backbone[key] = dict(backbone.get(key) or params[key].default, with_cp=True)
    elif "with_cp" in params:
        backbone["with_cp"] = True
    else:
        raise InputError(f"--checkpointing: the backbone {backbone.get('type')!r} has no activation "
                         "checkpointing (with_cp)", fix="drop --checkpointing, or use a ResNet3d-based backbone")
    add_custom_imports(cfg, CHECKPOINTING_MODULE)
    cfg.custom_hooks = [*cfg.custom_hooks, dict(type=CHECKPOINTING_HOOK)]


def checkpointing_enabled(model: Any) -> bool:
    """Whether the model config has MMAction2's activation checkpointing on (in the backbone or
    in its pathways)."""
    backbone = model.get("backbone") or {}
    return bool(backbone.get("with_cp")) or any((backbone.get(key) or {}).get("with_cp") for key in PATHWAYS)


def auto_class_weights(labels: list[int] | tuple[int, ...], num_classes: int, classes: list[str],
                       source: Path | None = None) -> list[float]:
    """Inverse class frequency, normalised so that the average weight over the training videos is 1
    (``n / (num_classes * n_c)``, sklearn's "balanced"): a class with half the average number of
    videos weighs 2."""
    counts = [0] * num_classes
    for label in labels:
        counts[label] += 1
    empty = [classes[c] for c, n in enumerate(counts) if n == 0]
    if empty:
        raise InputError(f"--class-weights auto: class(es) {', '.join(empty)} have no training videos",
                         path=source, fix="add training videos of every class, or pass --class-weights FILE")
    return [round(len(labels) / (num_classes * n), 6) for n in counts]


def read_class_weights(path: Path, classes: list[str]) -> list[float]:
    """A weights file: one line per class, ``WEIGHT`` (line i = class i, as in class_index.txt) or
    ``CLASS_NAME WEIGHT`` (any order, every class once)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("class weights file not found", path=path,
                         fix="pass --class-weights auto, or a file with one 'CLASS_NAME WEIGHT' line per class")
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if any(len(row) not in (1, 2) for row in rows) or len({len(row) for row in rows}) > 1:
        raise InputError("each line must be 'WEIGHT' or 'CLASS_NAME WEIGHT' (all lines alike)", path=path,
                         fix="write one line per class, e.g. 'move_left 2.0'")
    try:
        values = [float(row[-1]) for row in rows]
    except ValueError:
        raise InputError("a weight is not a number", path=path, fix="write e.g. 'move_left 2.0'") from None
    if any(not math.isfinite(v) or v <= 0 for v in values):
        raise InputError("class weights must be positive numbers", path=path, fix="use e.g. 0.5, 1, 2")
    if rows and len(rows[0]) == 2:
        by_name = {row[0]: value for row, value in zip(rows, values, strict=True)}
        if sorted(by_name) != sorted(classes) or len(rows) != len(classes):
            raise InputError(f"the file names {sorted(by_name)}, the data has classes {classes}", path=path,
                             fix="list every class of class_index.txt exactly once")
        return [by_name[name] for name in classes]
    if len(values) != len(classes):
        raise InputError(f"{len(values)} weight(s) for {len(classes)} classes", path=path,
                         fix="one line per class, in the order of class_index.txt")
    return values


def _set_class_weights(cfg: Any, data: PreparedData, spec: str) -> None:
    if spec == "auto":
        weights = auto_class_weights(data.train.labels, len(data.classes), data.classes, data.train.path)
    else:
        weights = read_class_weights(Path(spec), data.classes)
    loss = dict(cfg.model.cls_head.get("loss_cls") or dict(type="CrossEntropyLoss"))
    if loss.get("type") not in WEIGHTED_LOSSES:
        raise InputError(f"--class-weights needs a loss with class weights ({', '.join(WEIGHTED_LOSSES)}); "
                         f"this config's cls_head uses {loss.get('type')}",
                         fix="drop --class-weights, or set model.cls_head.loss_cls to CrossEntropyLoss")
    loss["class_weight"] = weights
    cfg.model.cls_head.loss_cls = loss


def _overfit(cfg: Any, data: PreparedData, n: int) -> None:
    """Train and validate on the same ``n`` videos (the stop at 100% is ``build_config``'s)."""
    if n > len(data.train):
        raise InputError(f"--overfit {n} but the train list has {len(data.train)} videos", path=data.train.path,
                         fix=f"use --overfit {min(8, len(data.train))}")
    indices = spread_by_class(data.train.labels, n)
    cfg.train_dataloader.dataset = data.mmaction_dataset("train", indices, pipeline=cfg.train_pipeline)
    cfg.val_dataloader.dataset = data.mmaction_dataset("train", indices, pipeline=cfg.val_pipeline, test_mode=True)


def summary_facts(cfg: Any, data: PreparedData, opts: FinetuneOptions) -> dict[str, Any]:
    """What finetune_summary.json records about the batch, LR and strategies (read from ``cfg``,
    so that the summary says what WORK/config.py does)."""
    batch = cfg.train_dataloader.batch_size
    loss = cfg.model.cls_head.get("loss_cls") or {}
    weights = loss.get("class_weight")
    indices = spread_by_class(data.train.labels, opts.overfit) if opts.overfit else None  # as _overfit
    return {
        "batch_size": batch,
        "accumulate": opts.accumulate,
        "nnodes": opts.nnodes,
        "gpus_per_node": opts.gpus,
        "effective_batch": opts.effective_batch(batch),
        "lr": cfg.optim_wrapper.optimizer.lr,
        "freeze_backbone": opts.freeze_backbone,
        "unfreeze_after": opts.unfreeze_after,
        "backbone_lr_mult": opts.backbone_lr_mult,
        "class_weights": None if weights is None else {
            "source": opts.class_weights, "weights": dict(zip(data.classes, weights, strict=True))},
        "overfit": None if indices is None else {
            "videos": len(indices), "files": [data.train.names[i] for i in indices]},
        "checkpointing": checkpointing_enabled(cfg.model),
    }
