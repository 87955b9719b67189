"""ExportedProgram export: ``torch.export`` of the deploy module, dynamic batch axis, one ``.pt2``
file with the clip spec and the artifact's facts as extra files.

torch.export is the serialisation PyTorch keeps (TorchScript is deprecated): it records the
graph of aten operators with symbolic shapes, here a batch dimension of 1..4096 (``V, T, H, W``
are fixed by the clip spec, as in every format). The ONNX exporter and AOTInductor start from
the same program. The file is reloaded with the runtime's own loader (the safe-archive check
included) and compared with the module on another batch size than the traced one.

Unlike a TorchScript trace, an ExportedProgram records no cuDNN flags in its convolutions: they
run with the flags of the process that runs them (see :mod:`sfdeploy.runtime.torch_base`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sfdeploy.artifacts import INPUT_NAME
from sfdeploy.errors import ExportError
from sfdeploy.export.formats import Written, artifact_info, check_reloaded

#: the batch axis every torch.export-based artifact accepts
MAX_BATCH = 4096


def export_program(module: torch.nn.Module, example: torch.Tensor, path: Path | None = None) -> object:
    """``torch.export.export`` of ``module`` with a dynamic batch axis (the ONNX-free start of the
    ExportedProgram and AOTInductor artifacts)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        with torch.no_grad():
            return torch.export.export(module, (example,), dynamic_shapes={INPUT_NAME: {0: batch}})
    except Exception as exc:  # torch.export raises many types; all mean "could not export"
        raise ExportError(f"torch.export failed: {type(exc).__name__}: {str(exc)[:500]}", path=path,
                          fix="export --formats torchscript,onnx meanwhile, and report the error") from exc


def export_torch_export(module: torch.nn.Module, example: torch.Tensor, path: Path, spec_json: str,
                        precision: str = "fp32", *, check_device: str | None = None) -> Written:
    """Export ``module`` on ``example``'s device, write ``path``, reload and compare there."""
    from torch._export.serde.schema import SCHEMA_VERSION

    from sfdeploy.runtime.torch_export import INFO_FILE, SPEC_FILE, load_exported_program

    info = artifact_info("torch_export", precision, schema_version=".".join(map(str, SCHEMA_VERSION)))
    program = export_program(module, example, path)
    torch.export.save(program, str(path), extra_files={SPEC_FILE: spec_json, INFO_FILE: json.dumps(info)})
    reloaded = load_exported_program(path, str(example.device)).module
    return Written(check_reloaded(module, reloaded, example, path, precision, what="ExportedProgram",
                                  runtime=f"torch {torch.__version__}",
                                  fix="report this with the model config; export --formats torchscript,onnx meanwhile"),
                   info)
