"""TorchScript predictor (``torch.jit.load``; CUDA or CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sfdeploy.clipspec import SPEC_KEY, ClipSpec
from sfdeploy.errors import EnvironmentProblem, InputError
from sfdeploy.runtime import check_batch

SPEC_FILE = f"{SPEC_KEY}.json"  # name of the extra file inside model.pt


def load_torchscript(path: Path, device: str = "cpu") -> tuple[object, ClipSpec]:
    import torch

    extra = {SPEC_FILE: ""}
    module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    if not extra[SPEC_FILE]:
        raise InputError("TorchScript model has no sfdeploy clip spec", path=path,
                         fix="use a model written by `sfdeploy export`")
    return module.eval(), ClipSpec.from_json(extra[SPEC_FILE])


class TorchScriptPredictor:
    def __init__(self, path: Path, *, device: str = "cpu", threads: int | None = None) -> None:
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EnvironmentProblem("--device cuda but torch sees no GPU", fix="use --device cpu")
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        self.module, self.spec = load_torchscript(Path(path), device)
        self.name = f"torchscript:{Path(path).name}"

    def predict(self, frames: np.ndarray) -> np.ndarray:
        import torch

        check_batch(frames, self.spec)
        with torch.inference_mode():
            probs = self.module(torch.from_numpy(frames).to(self.device))
        return probs.float().cpu().numpy()

    def close(self) -> None:
        self.module = None
