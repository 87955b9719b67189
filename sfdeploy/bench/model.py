"""The model a benchmark runs: a trained work dir, or a preset with random (non-degenerate)
weights, since speed does not depend on what the weights learnt.

Profiles: ``small`` is ``slowfast_tiny`` at its 64 px (minutes on 2 CPU cores); ``full`` is
SlowFast R50 4x16 at 224 px with a 400-class head, the Kinetics model users deploy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sfdeploy.clipspec import ClipSpec

log = logging.getLogger("sfdeploy")

PROFILES = {"small": ("slowfast_tiny", 4), "full": ("slowfast_r50_4x16", 400)}


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights that give a peaked softmax. A freshly initialised SlowFast zero-inits the last BN
    of every residual block and has a tiny fc: its near-flat output would hide export errors."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 0.5 + 0.75)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.2)


@dataclass
class BenchModel:
    """The model a benchmark measures: its name, the MMAction2 recognizer (the baseline, and what the bench
    export is made from), its clip spec and config."""

    name: str
    recognizer: Any  # mmaction Recognizer3D, eval mode, on CPU, fp32
    spec: ClipSpec
    cfg: Any


def build_bench_model(profile: str = "small", work_dir: Path | None = None) -> BenchModel:
    """The recognizer to benchmark and its one-view clip spec."""
    if work_dir is not None:
        from sfdeploy.train.trained import load_trained

        trained = load_trained(Path(work_dir))
        spec = ClipSpec.from_config(trained.cfg, trained.class_names, views=1)
        return BenchModel(f"{trained.preset or 'model'} ({work_dir})", trained.recognizer, spec, trained.cfg)
    return preset_model(*PROFILES[profile])


def preset_model(preset: str, classes: int, seed: int = 0) -> BenchModel:
    """``preset`` with a ``classes``-way head and :func:`randomise`'d weights (the same for the same
    ``seed``), in eval mode on the CPU: a profile's model, or a distillation student beside it."""
    from sfdeploy.compat import ensure_mmaction, load_config
    from sfdeploy.train.presets import preset_path

    ensure_mmaction()
    from mmaction.registry import MODELS

    cfg = load_config(preset_path(preset))
    cfg.model.cls_head.num_classes = classes
    with torch.random.fork_rng():  # the caller's RNG untouched
        torch.manual_seed(seed)
        recognizer = MODELS.build(cfg.model)
    randomise(recognizer, seed)
    recognizer.cfg = cfg
    names = tuple(f"class_{i}" for i in range(classes))
    return BenchModel(f"{preset} (random weights)", recognizer.eval(), ClipSpec.from_config(cfg, names, views=1), cfg)


def write_random_work(preset: str, data_dir: Path, work_dir: Path, seed: int = 0) -> Path:
    """A work dir as `sfdeploy finetune` leaves it (config, class index, best checkpoint) for
    ``preset`` on the prepared ``data_dir``, with :func:`randomise`'d weights (the same for the same
    ``seed``) and a :func:`temper_logits`'d head instead of trained ones: the real export path,
    gate included, for a model too slow to train here (R50 on a CPU)."""
    from sfdeploy.compat import ensure_mmaction, load_config
    from sfdeploy.data.layout import PreparedData
    from sfdeploy.train.config import FinetuneOptions, build_config
    from sfdeploy.train.presets import preset_path

    ensure_mmaction()
    from mmaction.registry import MODELS

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    data = PreparedData.from_dir(data_dir)
    cfg = build_config(load_config(preset_path(preset)), data, FinetuneOptions(work_dir=work_dir, preset=preset))
    cfg.load_from = None
    cfg.dump(str(work_dir / "config.py"))
    (work_dir / "class_index.txt").write_text("\n".join(data.classes) + "\n")
    with torch.random.fork_rng():  # the same weights for the same seed, the caller's RNG untouched
        torch.manual_seed(seed)
        model = MODELS.build(cfg.model).eval()
    randomise(model, seed)
    spec = ClipSpec.from_config(cfg, tuple(data.classes), views=1)
    temper_logits(model, spec, seed=seed)
    torch.save({"state_dict": model.state_dict()}, work_dir / "best_acc_top1_epoch_1.pth")
    return work_dir


#: the spread of logits :func:`temper_logits` aims at: a peaked softmax (top-1 near 0.9 on 4 classes)
#: that is not saturated
LOGIT_STD = 3.0


def temper_logits(model: torch.nn.Module, spec: ClipSpec, seed: int = 0, target_std: float = LOGIT_STD) -> None:
    """Scale the head so that the logits of random clips spread by ``target_std``. A deep network
    with :func:`randomise`'d weights gives logits hundreds apart, a softmax of exact 0s and 1s, on
    which every precision agrees to the last bit: a parity gate that could not fail."""
    from sfdeploy.export.deploy import SlowFastDeploy

    fc = model.cls_head.fc_cls
    logits: list[torch.Tensor] = []
    hook = fc.register_forward_hook(lambda module, inputs, output: logits.append(output.detach()))
    generator = torch.Generator().manual_seed(seed)
    clips = torch.randint(0, 256, (2, *spec.input_shape), generator=generator, dtype=torch.uint8)
    try:
        with torch.inference_mode():
            SlowFastDeploy(model, spec.mean, spec.std).eval()(clips)
    finally:
        hook.remove()
    spread = float(torch.cat(logits).std())
    with torch.no_grad():
        scale = target_std / spread if spread > 0 else 1.0
        fc.weight.mul_(scale)
        fc.bias.mul_(scale)
