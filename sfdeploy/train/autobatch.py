"""``finetune --batch-size auto``: the largest per-GPU batch that trains without running out of
memory *and* still gives every epoch enough optimizer steps.

Two limits, each named in the summary (``batch_size_auto.reason``):

* ``steps-limit``: at most ``videos per process / (MIN_STEPS_PER_EPOCH x --accumulate)``, so that
  an epoch keeps at least :data:`MIN_STEPS_PER_EPOCH` optimizer steps (and never above the train
  set). On a small dataset a large GPU would otherwise take the whole set in one batch: one
  update per epoch (seen on an H200: the 52-video synthetic set at batch 52 reached val top-1
  0.75 in 15 epochs, where the preset's batch of 8, 7 steps per epoch, reaches 1.0).
* ``fits-limit``: the largest batch whose trial steps fit in GPU memory, when that is smaller.

Without CUDA it is the preset's batch size (``reason: preset``): CPU training is bounded by time,
not memory. On CUDA a child process (so that its CUDA context and cached memory are gone before
training starts) builds the model and the optimizer from ``WORK/config.py`` as the Runner does
(activation checkpointing, AMP and frozen backbones included), and runs :data:`TRIAL_STEPS` real
MMAction2 train steps (preprocessing, forward, loss, backward, optimizer step) on a batch made of
the first training clip, repeated. A trial fits when it neither runs out of memory nor peaks
above :data:`HEADROOM` of the GPU's memory (DDP's gradient buckets and allocator fragmentation
need the rest). :func:`choose_batch` is the decision, pure given its trial function: the step
limit first; below it, halving until a trial fits, then bisecting up to the largest that fits.

``python -m sfdeploy.train.autobatch CONFIG TRAIN_VIDEOS WORLD_SIZE ACCUMULATE`` is that child;
it prints one JSON line.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sfdeploy.errors import TrainingError

MAX_BATCH = 256
HEADROOM = 0.9
TRIAL_STEPS = 2
#: Optimizer steps an epoch keeps at least under --batch-size auto. 8 is about what the presets'
#: own batch gives the smallest datasets they learn (the 52-video synthetic set: 7 steps at batch
#: 8): below that, the per-epoch validation, the checkpoint choice and the warm-up (10% of all
#: steps) have too few updates to work with, whatever the learning-rate scaling does.
MIN_STEPS_PER_EPOCH = 8
#: The bisection above a fitting batch stops within this fraction of it (each trial costs steps).
BISECT_PRECISION = 8

Trial = Callable[[int], dict[str, Any]]  # batch -> {"batch", "fits", "peak_gib", "why", ...}


@dataclass
class BatchChoice:
    """The batch size ``--batch-size auto`` settled on and how: kept from the preset (no CUDA to
    probe), or probed on the GPU with the trials run, so that the log and ``finetune_summary.json``
    can say why this batch."""

    batch_size: int
    how: str  # "preset" (no CUDA) or "probe"
    device: str
    reason: str = "preset"  # "preset", "steps-limit", "fits-limit" or "max-batch"
    why: str = ""  # the reason in words, for the log and the summary
    memory_gib: float | None = None  # the GPU's memory (a trial fits under HEADROOM of it)
    trials: list[dict[str, Any]] = field(default_factory=list)  # {"batch", "fits", "peak_gib", "why"}

    def to_dict(self) -> dict[str, Any]:
        """As plain data, for ``finetune_summary.json``."""
        return asdict(self)


def steps_limit(train_videos: int, world_size: int, accumulate: int = 1) -> int:
    """The largest batch that keeps :data:`MIN_STEPS_PER_EPOCH` optimizer steps per epoch
    (1 when even that cannot), never above one process's share of the train set."""
    per_process = math.ceil(train_videos / max(1, world_size))
    return max(1, min(per_process, per_process // (MIN_STEPS_PER_EPOCH * max(1, accumulate))))


def _largest_fitting(trial: Trial, start: int) -> tuple[int | None, list[dict[str, Any]]]:
    """The largest batch <= ``start`` whose trial fits (None if not even 1 does), and the trials
    run: ``start``, then halving until one fits, then bisecting between it and the failed batch
    above it to within 1/:data:`BISECT_PRECISION`."""
    trials: list[dict[str, Any]] = []

    def fits(batch: int) -> bool:
        trials.append(trial(batch))
        return bool(trials[-1]["fits"])

    if fits(start):
        return start, trials
    high, low = start, start // 2
    while low >= 1 and not fits(low):
        high, low = low, low // 2
    if low < 1:
        return None, trials
    while high - low > max(1, low // BISECT_PRECISION):
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low, trials


def choose_batch(trial: Trial, train_videos: int, world_size: int, accumulate: int = 1
                 ) -> tuple[int | None, str, str, list[dict[str, Any]]]:
    """``--batch-size auto``'s decision: (batch, reason, why, trials). ``trial(batch)`` runs (or,
    in tests, pretends to run) train steps at ``batch`` and says whether they fit."""
    limit = steps_limit(train_videos, world_size, accumulate)
    start, reason = (limit, "steps-limit") if limit <= MAX_BATCH else (MAX_BATCH, "max-batch")
    batch, trials = _largest_fitting(trial, start)
    if batch is None:
        return None, "fits-limit", "not even a batch of 1 fits in GPU memory", trials
    per_process = math.ceil(train_videos / max(1, world_size))
    steps = math.ceil(per_process / batch) // max(1, accumulate)
    if batch < start:
        reason = "fits-limit"
        limited_by = "the step limit" if reason == "steps-limit" else "MAX_BATCH"
        why = (f"{batch}: the largest batch that fits in GPU memory ({start}, the most {limited_by} allows, "
               f"does not); {steps} optimizer steps per epoch")
    elif reason == "max-batch":
        why = f"{batch}: the largest batch auto tries (MAX_BATCH), and it fits; {steps} optimizer steps per epoch"
    else:
        why = (f"{batch}: the largest batch that keeps {MIN_STEPS_PER_EPOCH} optimizer steps per epoch "
               f"({per_process} train videos per process, --accumulate {accumulate}), and it fits in GPU memory")
        if steps < MIN_STEPS_PER_EPOCH:
            why += f" (the train set is too small for {MIN_STEPS_PER_EPOCH} steps even at batch 1: {steps})"
    return batch, reason, why, trials


def auto_batch_size(config_path: Path, preset_batch: int, train_videos: int, world_size: int,
                    accumulate: int = 1) -> BatchChoice:
    """Resolve ``--batch-size auto`` for the run configured in ``config_path``."""
    import torch

    if not torch.cuda.is_available():
        return BatchChoice(preset_batch, "preset", "cpu", "preset",
                           f"{preset_batch}: the preset's batch (no CUDA GPU: CPU training is bounded by time, "
                           "not memory)")
    command = [sys.executable, "-m", "sfdeploy.train.autobatch", str(config_path), str(train_videos),
               str(world_size), str(accumulate)]
    result = subprocess.run(command, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise TrainingError(f"--batch-size auto: the probe failed (exit code {result.returncode}):\n"
                            f"{result.stderr[-2000:]}", path=config_path,
                            fix="pass a number with --batch-size")
    answer = json.loads(lines[-1])
    if answer["batch_size"] is None:
        raise TrainingError("--batch-size auto: not even a batch of 1 fits on the GPU", path=config_path,
                            fix="use --checkpointing, --amp, a smaller preset or clip, or a GPU with more memory")
    return BatchChoice(answer["batch_size"], "probe", answer["device"], answer["reason"], answer["why"],
                       answer["memory_gib"], answer["trials"])


def _trial(model: Any, cfg: Any, sample: dict, batch: int, total: int) -> dict[str, Any]:
    import torch
    from mmengine.optim import build_optim_wrapper

    optim_cfg = copy.deepcopy(cfg.optim_wrapper)
    optim_cfg.pop("accumulative_counts", None)  # step every trial iteration: optimizer state counts
    optim_wrapper = build_optim_wrapper(model, optim_cfg)
    data = {"inputs": [sample["inputs"]] * batch, "data_samples": [sample["data_samples"]] * batch}
    torch.cuda.reset_peak_memory_stats()
    trial: dict[str, Any] = {"batch": batch, "fits": False, "peak_gib": None, "why": ""}
    try:
        for _ in range(TRIAL_STEPS):
            model.train_step(data, optim_wrapper)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        trial["peak_gib"] = round(peak / 2**30, 3)
        trial["fits"] = peak <= HEADROOM * total
        trial["why"] = "fits" if trial["fits"] else f"peak above {HEADROOM:.0%} of the GPU's memory"
    except torch.cuda.OutOfMemoryError:
        trial["why"] = "out of memory"
    finally:
        del optim_wrapper, data
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
    return trial


def probe(config_path: Path, train_videos: int, world_size: int, accumulate: int) -> dict[str, Any]:
    """:func:`choose_batch` with real trial steps on the GPU (runs in the child process)."""
    import torch

    from sfdeploy.compat import ensure_mmaction, load_config
    from sfdeploy.train.strategies import FREEZE_HOOK

    ensure_mmaction()
    from mmaction.registry import DATASETS, MODELS

    cfg = load_config(config_path)  # imports the config's custom_imports (decode transforms, ...)
    model = MODELS.build(cfg.model).cuda().train()
    freeze = [h for h in cfg.get("custom_hooks", []) if h.get("type") == FREEZE_HOOK]
    if freeze and freeze[0].get("unfreeze_after") is None:
        # Head-only for the whole run: no backbone gradients, so larger batches fit. (With
        # --unfreeze-after the unfrozen phase is the one that must fit: probe it.)
        from sfdeploy.train.freeze import set_backbone_frozen

        set_backbone_frozen(model.backbone, True)
    sample = DATASETS.build(cfg.train_dataloader.dataset)[0]
    total = torch.cuda.get_device_properties(0).total_memory
    batch, reason, why, trials = choose_batch(lambda b: _trial(model, cfg, sample, b, total),
                                              train_videos, world_size, accumulate)
    return {"batch_size": batch, "reason": reason, "why": why, "device": torch.cuda.get_device_name(0),
            "memory_gib": round(total / 2**30, 1), "trials": trials}


if __name__ == "__main__":
    print(json.dumps(probe(Path(sys.argv[1]), *(int(arg) for arg in sys.argv[2:5]))))
