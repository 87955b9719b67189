"""``finetune --batch-size auto``: the largest per-GPU batch that trains without running out of memory.

Without CUDA it is the preset's batch size: CPU training is bounded by time, not memory. On CUDA a
child process (so that its CUDA context and cached memory are gone before training starts) builds
the model and the optimizer from ``WORK/config.py`` as the Runner does, and runs
:data:`TRIAL_STEPS` real MMAction2 train steps (preprocessing, forward, loss, backward, optimizer
step, AMP when the config says so) on a batch made of the first training clip, repeated. It starts
at the largest useful batch (the training videos per process, at most :data:`MAX_BATCH`) and
halves on out-of-memory, or when the peak exceeds :data:`HEADROOM` of the GPU's memory (DDP's
gradient buckets and allocator fragmentation need the rest).

``python -m sfdeploy.train.autobatch CONFIG START`` is that child; it prints one JSON line.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sfdeploy.errors import TrainingError

MAX_BATCH = 256
HEADROOM = 0.9
TRIAL_STEPS = 2


@dataclass
class BatchChoice:
    batch_size: int
    how: str  # "preset" (no CUDA) or "probe"
    device: str
    trials: list[dict[str, Any]] = field(default_factory=list)  # {"batch", "fits", "peak_gib", "why"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def start_batch(train_videos: int, world_size: int) -> int:
    """No batch larger than what one process sees in an epoch is useful."""
    return max(1, min(MAX_BATCH, math.ceil(train_videos / max(1, world_size))))


def auto_batch_size(config_path: Path, preset_batch: int, train_videos: int, world_size: int) -> BatchChoice:
    """Resolve ``--batch-size auto`` for the run configured in ``config_path``."""
    import torch

    if not torch.cuda.is_available():
        return BatchChoice(preset_batch, "preset", "cpu")
    command = [sys.executable, "-m", "sfdeploy.train.autobatch", str(config_path),
               str(start_batch(train_videos, world_size))]
    result = subprocess.run(command, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise TrainingError(f"--batch-size auto: the probe failed (exit code {result.returncode}):\n"
                            f"{result.stderr[-2000:]}", path=config_path,
                            fix="pass a number with --batch-size")
    answer = json.loads(lines[-1])
    if answer["batch_size"] is None:
        raise TrainingError("--batch-size auto: not even a batch of 1 fits on the GPU", path=config_path,
                            fix="use a smaller preset or clip, --amp, or a GPU with more memory")
    return BatchChoice(answer["batch_size"], "probe", answer["device"], answer["trials"])


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
        trial["peak_gib"] = round(peak / 2**30, 2)
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


def probe(config_path: Path, start: int) -> dict[str, Any]:
    """Halve from ``start`` until TRIAL_STEPS train steps fit (runs in the child process)."""
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
    trials = []
    batch = start
    while batch >= 1:
        trials.append(_trial(model, cfg, sample, batch, total))
        if trials[-1]["fits"]:
            break
        batch //= 2
    return {"batch_size": batch if batch >= 1 else None, "device": torch.cuda.get_device_name(0),
            "trials": trials}


if __name__ == "__main__":
    print(json.dumps(probe(Path(sys.argv[1]), int(sys.argv[2]))))
