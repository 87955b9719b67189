"""TorchScript predictor (``torch.jit.load``; CUDA or CPU).

On the CPU the module is frozen and optimised for inference when it loads (:func:`optimize_for_cpu`);
everything else (devices, batches, CUDA graphs) is :class:`sfdeploy.runtime.torch_base.TorchPredictor`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sfdeploy.artifacts import ARTIFACT_INFO_KEY
from sfdeploy.clipspec import SPEC_KEY, ClipSpec
from sfdeploy.errors import InputError
from sfdeploy.runtime.torch_base import Loaded, TorchPredictor, parse_info

SPEC_FILE = f"{SPEC_KEY}.json"  # name of the extra file inside model.pt
INFO_FILE = f"{ARTIFACT_INFO_KEY}.json"  # the artifact's facts (the torch version that wrote it, ...)


def load_torchscript(path: Path, device: str = "cpu") -> Loaded:
    """The TorchScript module on ``device`` with the clip spec and facts it carries, or an :class:`InputError`
    for a file that is not an sfdeploy export."""
    import torch

    extra = {SPEC_FILE: "", INFO_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except RuntimeError as exc:  # not a TorchScript archive (a pickle, a checkpoint): nothing of it was run
        raise InputError(f"not a TorchScript model ({str(exc).splitlines()[0][:200]})", path=path,
                         fix="use a model written by `sfdeploy export` (re-run it)") from exc
    if not extra[SPEC_FILE]:
        raise InputError("TorchScript model has no sfdeploy clip spec", path=path,
                         fix="use a model written by `sfdeploy export`")
    return Loaded(module.eval(), ClipSpec.from_json(extra[SPEC_FILE]), parse_info(extra[INFO_FILE], path))


def optimize_for_cpu(module: Any) -> tuple[Any, str]:
    """``torch.jit.optimize_for_inference(torch.jit.freeze(module))``: oneDNN's prepacked weight
    layouts, conv+BN folding and conv+ReLU fusion for the CPU, done at load (the artifact on disk
    stays the portable graph). R50 batch 1 on one core: 1,090 -> 684 ms of CPU time. Returns the
    module to run and what was done; a graph torch cannot optimise runs as loaded (the reason is
    returned and logged)."""
    import logging

    import torch

    try:
        return torch.jit.optimize_for_inference(torch.jit.freeze(module.eval())), "freeze + optimize_for_inference"
    except (RuntimeError, ValueError) as exc:  # e.g. a half-precision graph on the CPU
        reason = f"not optimised ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        logging.getLogger("sfdeploy").info("TorchScript on the CPU: %s", reason)
        return module, reason


class TorchScriptPredictor(TorchPredictor):
    """A TorchScript artifact. The convolutions run as the export baked them
    (:mod:`sfdeploy.export.torchscript`: an fp32 artifact never uses TF32 for them, a reduced
    precision one uses cuDNN's benchmark mode); ``tf32`` reaches the matmuls."""

    format = "torchscript"

    def load(self, path: Path, device: str) -> Loaded:
        """The TorchScript artifact on ``device`` (:func:`load_torchscript`)."""
        return load_torchscript(path, device)

    def optimize_cpu(self, module: Any) -> tuple[Any, str]:
        """freeze + optimize_for_inference on the CPU (oneDNN's prepacked weights, fusions), and its name for the
        record."""
        return optimize_for_cpu(module)
