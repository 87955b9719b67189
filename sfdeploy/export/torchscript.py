"""TorchScript export: ``torch.jit.trace`` of the deploy module, clip spec as an extra file.

``torch.jit.script`` cannot compile mmcv's ``Conv3d.forward``; tracing records the graph with the
batch size read from the input (``aten::size``), so any batch size works. The trace is reloaded
with plain ``torch.jit.load`` and compared with the module it came from before export returns.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from sfdeploy.artifacts import self_check
from sfdeploy.runtime.torchscript import SPEC_FILE, load_torchscript


def export_torchscript(module: torch.nn.Module, example: torch.Tensor, path: Path, spec_json: str,
                       precision: str = "fp32") -> dict[str, Any]:
    """Trace ``module`` on ``example``'s device, write ``path``, reload it there and compare;
    returns what the check ran on and found."""
    with warnings.catch_warnings():
        # "torch.jit.trace is deprecated": it is still the exporter that handles mmcv's layers.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.trace.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        with torch.no_grad():
            traced = torch.jit.trace(module, (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={SPEC_FILE: spec_json})
        reloaded, _ = load_torchscript(path, str(example.device))
        # A batch size other than the traced one proves the batch axis stayed dynamic.
        probe = torch.cat([example, example[:1]])
        with torch.no_grad():
            expected, got = module(probe), reloaded(probe)
    diff = float((expected - got).abs().max()) if got.shape == expected.shape else float("inf")
    return self_check(diff, precision, path=path, device=str(example.device), runtime=f"torch {torch.__version__}",
                      reference_device=str(example.device),
                      failure=f"the reloaded TorchScript model differs from the module it was traced from "
                              f"(shape {tuple(got.shape)})",
                      fix="report this with the model config; export --formats onnx meanwhile")
