"""Build the full MMAction2 training config from a preset and a dataset.

The preset says *what model and recipe*; this module fills in what depends on the data and the
machine, each in one place: number of classes, annotation files, sfdeploy's decoder (the
client's, registered as MMAction2 transforms), flip for direction-sensitive
classes, a warm-up + cosine schedule sized to the run, learning rate scaled to the effective batch,
checkpointing by val top-1, workers, distributed backend, TensorBoard; the finetuning strategies
(freezing, per-group learning rates, accumulation, class weights, the overfit check) are added by
:mod:`sfdeploy.train.strategies`. The result is written to ``WORK/config.py``, which is the single
source for everything downstream (export reads its test pipeline to derive the clip spec).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from sfdeploy.clipspec import VIDEO_DECODE_STEPS, VIDEO_INIT_STEPS
from sfdeploy.data.layout import PreparedData
from sfdeploy.errors import EnvironmentProblem, InputError
from sfdeploy.train.options import FinetuneOptions, add_custom_imports
from sfdeploy.train.strategies import apply_strategies, check_options

WARMUP_FRACTION = 0.1  # of all iterations, linear from 10% of the LR
ETA_MIN_RATIO = 0.01  # cosine ends at 1% of the peak LR
CHECKPOINT_METRIC = "acc/top1"
OVERFIT_EPOCHS = 60  # the default --epochs of an --overfit check


def use_cuda() -> bool:
    """Whether training runs on CUDA here (torch sees a GPU); the config's device-dependent choices
    follow it."""
    import torch

    return torch.cuda.is_available()


def iters_per_epoch(num_videos: int, batch_size: int, world_size: int) -> int:
    """Iterations per epoch under mmengine's DefaultSampler (each rank pads to ceil(n / world))."""
    return math.ceil(math.ceil(num_videos / world_size) / batch_size)


def schedule(total_iters: int) -> list[dict[str, Any]]:
    """Linear warm-up over the first 10% of iterations, then cosine to 1% of the peak LR."""
    warmup = min(max(1, round(total_iters * WARMUP_FRACTION)), max(1, total_iters - 1))
    return [
        dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=warmup),
        dict(type="CosineAnnealingLR", T_max=max(1, total_iters - warmup), eta_min_ratio=ETA_MIN_RATIO,
             by_epoch=False, begin=warmup, end=max(total_iters, warmup + 1)),
    ]


TRANSFORMS_MODULE = "sfdeploy.train.transforms"  # registers SfdeployVideoInit / SfdeployVideoDecode


def _video_to_rawframes(pipeline: list[dict]) -> list[dict]:
    out = []
    for step in pipeline:
        if step["type"] in VIDEO_INIT_STEPS:
            continue
        if step["type"] in VIDEO_DECODE_STEPS:
            out.append(dict(type="RawFrameDecode", io_backend="disk"))
            continue
        out.append(step)
    return out


def _decode_with_sfdeploy(pipeline: list[dict]) -> list[dict]:
    """``DecordInit`` / ``DecordDecode`` -> ``SfdeployVideoInit`` / ``SfdeployVideoDecode``
    (:mod:`sfdeploy.train.transforms`): training then decodes every stream the client decodes,
    with the same pixels. Other decoders a user's config names are left as they are."""
    out = []
    for step in pipeline:
        if step["type"] == "DecordInit":
            step = {k: v for k, v in step.items() if k != "num_threads"}
            step["type"] = "SfdeployVideoInit"
        elif step["type"] == "DecordDecode":
            if step.get("mode", "accurate") != "accurate":
                raise InputError("DecordDecode(mode='efficient') returns key frames, which the client does not "
                                 "reproduce", fix="use DecordDecode() (accurate mode) in the config")
            step = dict(type="SfdeployVideoDecode")
        out.append(step)
    return out


def _loader_workers(opts: FinetuneOptions, preset_workers: int) -> int:
    if opts.workers is not None:
        return opts.workers
    cpus = os.cpu_count() or 1
    # Leave the compute threads most of a small machine; decoding 16-64 frames is cheap. The
    # processes sharing this machine's cores are the ones on this node (--gpus). Measured (bench --stage
    # train, benchmarks/results/cpu-2c-train-2026-12-07.md, slowfast_tiny on 2 cores): 0 workers 3 videos/s
    # (decoding and 2 torch threads fight for the cores), 1 or 2 persistent workers 26-32 (2 no better than
    # 1 there), and persistent workers beat re-spawned ones by ~30% (_set_loaders keeps them on).
    return max(1, min(preset_workers, cpus // (2 * max(1, opts.gpus))))


def _set_learning_rate(cfg: Any, opts: FinetuneOptions, batch: int) -> None:
    """The preset's LR is for ``auto_scale_lr.base_batch_size`` videos per optimizer step; scale it
    linearly to this run's effective batch (batch x --accumulate x processes). sfdeploy does this
    itself (mmengine's own scaling counts batch x processes only, not accumulation) and turns
    mmengine's off, so WORK/config.py holds the LR that is actually used. ``--lr`` is used as given."""
    optimizer = cfg.optim_wrapper.optimizer
    scaling = cfg.get("auto_scale_lr") or {}
    effective = opts.effective_batch(batch)
    if opts.lr is not None:
        if opts.lr <= 0:
            raise InputError(f"--lr must be positive, got {opts.lr}", fix="use e.g. --lr 1e-3")
        optimizer.lr = opts.lr
    elif scaling.get("enable"):
        optimizer.lr = optimizer.lr * effective / scaling["base_batch_size"]
    cfg.auto_scale_lr = dict(enable=False, base_batch_size=scaling.get("base_batch_size", effective))


def build_config(cfg: Any, data: PreparedData, opts: FinetuneOptions) -> Any:
    """Apply the data- and machine-dependent settings to a loaded preset config (in place)."""
    check_options(opts)
    cuda = use_cuda()
    check_machine(opts, cuda)
    cfg.model.cls_head.num_classes = len(data.classes)
    _set_pipelines(cfg, data, opts)
    batch = _set_loaders(cfg, opts)
    # --overfit stops as soon as val top-1 is 100%: give it room (one iteration per epoch).
    epochs = opts.epochs or (OVERFIT_EPOCHS if opts.overfit else cfg.train_cfg.max_epochs)
    if epochs < 1:
        raise InputError(f"--epochs must be >= 1, got {epochs}", fix="use e.g. --epochs 15")
    cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=epochs, val_begin=1, val_interval=1)
    per_epoch = iters_per_epoch(opts.train_videos(data), batch, opts.world_size)
    cfg.param_scheduler = schedule(epochs * per_epoch)
    _set_learning_rate(cfg, opts, batch)
    if opts.amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    _set_hooks(cfg, opts, epochs, per_epoch)
    _set_runtime(cfg, opts, cuda)
    apply_strategies(cfg, data, opts)
    if opts.cfg_options:
        cfg.merge_from_dict(opts.cfg_options)
    if opts.distill_from is not None:  # the student trains beside its frozen teacher (checked first)
        from sfdeploy.train.distill import apply_distillation

        apply_distillation(cfg, list(data.classes), opts)
    return cfg


def check_machine(opts: FinetuneOptions, cuda: bool) -> None:
    """Refuse what this machine cannot do, before anything is built."""
    if opts.amp and not cuda:
        raise EnvironmentProblem("--amp needs a CUDA GPU; none is visible to torch",
                                 fix="drop --amp on CPU (it trains in fp32)")
    if opts.gpus > 1 and cuda:
        import torch

        if torch.cuda.device_count() < opts.gpus:
            raise EnvironmentProblem(f"--gpus {opts.gpus} but torch sees {torch.cuda.device_count()} GPU(s)",
                                     fix=f"use --gpus {torch.cuda.device_count()}")


def _set_pipelines(cfg: Any, data: PreparedData, opts: FinetuneOptions) -> None:
    """Each split's pipeline for DATA (sfdeploy's decoder, or raw frames; flips off for
    direction-sensitive data) and its dataset."""
    flip = opts.flip if opts.flip is not None else (False if data.direction_sensitive else None)
    for split in ("train", "val", "test"):
        loader = cfg[f"{split}_dataloader"]
        pipeline = list(cfg.get(f"{split}_pipeline") or loader.dataset.pipeline)
        if data.format == "rawframes":
            pipeline = _video_to_rawframes(pipeline)
        else:
            pipeline = _decode_with_sfdeploy(pipeline)
            if any(step["type"] == "SfdeployVideoInit" for step in pipeline):
                add_custom_imports(cfg, TRANSFORMS_MODULE)
        if flip is False:
            pipeline = [step for step in pipeline if step["type"] != "Flip"]
        cfg[f"{split}_pipeline"] = pipeline
        # test reads the val list; several sets are a ConcatDataset, each set with the pipeline
        loader.dataset = data.mmaction_dataset(split, pipeline=pipeline,
                                               **({"test_mode": True} if split != "train" else {}))


def _set_loaders(cfg: Any, opts: FinetuneOptions) -> int:
    """Batch size, workers and sampler of the loaders; returns the batch per process."""
    batch = opts.batch_size if isinstance(opts.batch_size, int) else cfg.train_dataloader.batch_size
    if batch < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch}", fix="use e.g. --batch-size 8")
    cfg.train_dataloader.batch_size = batch
    cfg.val_dataloader.batch_size = batch
    workers = _loader_workers(opts, cfg.train_dataloader.get("num_workers", 2))
    for split in ("train", "val", "test"):
        cfg[f"{split}_dataloader"].num_workers = workers
        cfg[f"{split}_dataloader"].persistent_workers = workers > 0
    if opts.balanced:
        add_custom_imports(cfg, "sfdeploy.train.sampler")
        cfg.train_dataloader.sampler = dict(type="BalancedClassSampler", seed=opts.seed)
    return batch


def _set_hooks(cfg: Any, opts: FinetuneOptions, epochs: int, per_epoch: int) -> None:
    """Checkpoints by val top-1, the log interval, early stopping, TensorBoard."""
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=1, save_best=CHECKPOINT_METRIC,
                                        rule="greater", max_keep_ckpts=2, save_last=True)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=max(1, min(50, per_epoch // 4)),
                                    ignore_last=False)
    hooks = [h for h in cfg.get("custom_hooks", []) if h.get("type") != "EarlyStoppingHook"]
    if opts.patience or opts.overfit:
        stop = dict(type="EarlyStoppingHook", monitor=CHECKPOINT_METRIC, rule="greater", min_delta=1e-4,
                    patience=opts.patience or epochs + 1)
        if opts.overfit:  # stop at 100%: mmengine stops when the metric is strictly above the threshold
            stop["stopping_threshold"] = 1.0 - 1e-6
        hooks.append(stop)
    cfg.custom_hooks = hooks
    cfg.visualizer = dict(type="ActionVisualizer", vis_backends=[dict(type="LocalVisBackend"),
                                                                  dict(type="TensorboardVisBackend")])


def _set_runtime(cfg: Any, opts: FinetuneOptions, cuda: bool) -> None:
    """Distributed backend, cuDNN, seeds, launcher and the work dir."""
    world = opts.world_size
    cfg.env_cfg.dist_cfg = dict(backend="nccl" if cuda else "gloo")
    cfg.env_cfg.cudnn_benchmark = cuda and not opts.deterministic
    cfg.randomness = dict(seed=opts.seed, deterministic=opts.deterministic)
    cfg.launcher = "pytorch" if world > 1 else "none"
    if world > 1 and not cuda:
        # CPU DDP: mmengine's default wrapper pins device_ids=[LOCAL_RANK], a CUDA device.
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None,
                                     broadcast_buffers=False)
    cfg.work_dir = str(Path(opts.work_dir).resolve())
