"""One signature for every exporter, and where each artifact is traced.

Each format has a module with one function (``torchscript``, ``onnx_export``, ``torch_export``,
``aoti``): ``(module, example, path, spec_json, precision, check_device=...) -> Written``. It
writes ``path`` with the clip spec and the artifact's own facts inside (:func:`artifact_info`:
format, precision, the versions that wrote it), reloads it the way a runtime will, compares it
with the module on another batch size than the traced one, and returns what that check ran on
and found, with the facts. ``sfdeploy export`` (with the parity gate) and ``sfdeploy bench``
(its own export of random weights) both write through :func:`write_artifact`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: the module of each format's exporter (imported when used: each pulls its own heavy packages)
_MODULES = {"torchscript": "sfdeploy.export.torchscript", "onnx": "sfdeploy.export.onnx_export",
            "torch_export": "sfdeploy.export.torch_export", "aoti": "sfdeploy.export.aoti"}


@dataclass
class Written:
    """What an exporter's self-check ran on and found (the manifest's ``parity.self_checks``),
    and the facts the artifact carries (the manifest's ``artifacts.<key>.info``)."""

    check: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


def trace_device(fmt: str, precision: str, device: str) -> str:
    """Where an artifact of ``fmt`` and ``precision`` is traced for an export on ``device``: an
    AOTInductor package is compiled for the device it will run on; fp32 graphs of the portable
    formats on the CPU (they load anywhere, and no TF32 can creep into a trace there); reduced
    precisions where they run (the GPU's fp16, or the CPU's bf16)."""
    if fmt == "aoti" or precision != "fp32":
        return device
    return "cpu"


def artifact_info(fmt: str, precision: str, **facts: Any) -> dict[str, Any]:
    """The facts an artifact carries about itself: its format and precision, the versions of what
    wrote it (:func:`sfdeploy.compatibility.producer`), and ``facts`` of the format."""
    from sfdeploy.compatibility import producer

    return {"format": fmt, "precision": precision, "producer": producer(fmt), **facts}


#: the formats whose exporter shows a progress line of its own (a long compilation)
_REPORTS_PROGRESS = {"aoti"}


def write_artifact(fmt: str, module: Any, example: Any, path: Path, spec_json: str, precision: str, *,
                   check_device: str, show_progress: bool = True) -> Written:
    """Write ``module`` as a ``fmt`` artifact at ``path`` and self-check it (see the module
    docstring). ``example`` is on the device the artifact is traced on (:func:`trace_device`);
    ``check_device``: where a runtime that may run elsewhere (ONNX Runtime) is checked."""
    exporter = getattr(importlib.import_module(_MODULES[fmt]), f"export_{fmt}")
    extra = {"show_progress": show_progress} if fmt in _REPORTS_PROGRESS else {}
    return exporter(module, example, Path(path), spec_json, precision, check_device=check_device, **extra)


def check_reloaded(module: Any, reloaded: Any, example: Any, path: Path, precision: str, *, what: str,
                   runtime: str, fix: str) -> dict[str, Any]:
    """The self-check of a torch artifact: ``reloaded`` (as its runtime loads it) against the
    ``module`` it came from, on ``example``'s device, at a batch size other than the traced one
    (which proves the batch axis stayed dynamic); over tolerance, an ``ExportError`` saying that
    the reloaded ``what`` differs."""
    import torch

    from sfdeploy.artifacts import self_check

    probe = torch.cat([example, example[:1]])
    with torch.inference_mode():
        expected, got = module(probe), reloaded(probe)
    diff = float((expected - got).abs().max()) if got.shape == expected.shape else float("inf")
    return self_check(diff, precision, path=path, device=str(example.device), runtime=runtime,
                      reference_device=str(example.device), fix=fix,
                      failure=f"the reloaded {what} differs from the module it came from (shape {tuple(got.shape)})")
