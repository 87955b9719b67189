"""ONNX export: one file, dynamic batch axis, clip spec in ``metadata_props``, checker-clean.

Uses the dynamo exporter (``torch.export`` + onnxscript; opset 18) with ``external_data=False``
so the model is a single file (R50 is ~140 MB, well under protobuf's 2 GB). An fp16 export is the
same wrapper with half weights and compute: input stays uint8, output float32. The result is
loaded in onnxruntime and compared with the module it came from before export returns, on
``check_device``: the CPU provider computes fp16 models in fp32, so an fp16 model is best checked
on the CUDA provider it will be served with; where there is none it is checked on the CPU and the
returned record (which export writes into the manifest) says so.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfdeploy.artifacts import INPUT_NAME, OUTPUT_NAME, self_check
from sfdeploy.clipspec import SPEC_KEY
from sfdeploy.errors import ExportError

OPSET = 18


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints its stages and optimizer passes, and warns about torchvision ops we do
    not use; errors still surface as exceptions."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, spec_json: str,
                precision: str = "fp32", *, check_device: str = "cpu") -> dict[str, Any]:
    """Write ``path`` and check it against ``module`` in onnxruntime on ``check_device``
    (``cpu`` or ``cuda[:N]``); returns what the check ran on and found."""
    import onnx

    from sfdeploy.runtime.ort import OrtPredictor

    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with _quiet_exporter():
            torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes={INPUT_NAME: {0: batch}}, external_data=False)
    except Exception as exc:  # the exporter raises many types; all mean "could not export"
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {str(exc)[:500]}", path=path,
                          fix="export --formats torchscript meanwhile, and report the error") from exc
    with _quiet_exporter():  # onnx_ir's optimizer logs on load too
        model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = SPEC_KEY, spec_json
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    predictor = OrtPredictor(path, device=check_device)
    probe = torch.cat([example, example[:1]])  # another batch size than the exported one
    with torch.no_grad():
        expected = module(probe).float().cpu().numpy()
    got = predictor.predict(probe.cpu().numpy())
    predictor.close()
    diff = float(np.abs(expected - got).max()) if got.shape == expected.shape else float("inf")
    return self_check(diff, precision, path=path, device=predictor.device, runtime=predictor.runtime,
                      reference_device=str(probe.device),
                      failure=f"the ONNX model differs from the module it was exported from in onnxruntime on "
                              f"{predictor.device} (shape {got.shape})",
                      fix="report this with the model config; export --formats torchscript meanwhile")
