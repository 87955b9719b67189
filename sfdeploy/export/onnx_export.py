"""ONNX export: one file, dynamic batch axis, clip spec in ``metadata_props``, checker-clean, and
loadable by ONNX Runtime back to 1.14 (Triton containers since 23.03).

Uses the dynamo exporter (``torch.export`` + onnxscript; opset 18) with ``external_data=False``
so the model is a single file (R50 is ~140 MB, well under protobuf's 2 GB). An fp16 export is the
same wrapper with half weights and compute: input stays uint8, output float32. The result is
loaded in onnxruntime and compared with the module it came from before export returns, on
``check_device``: the CPU provider computes fp16 models in fp32, so an fp16 model is best checked
on the CUDA provider it will be served with; where there is none it is checked on the CPU and the
returned record (which export writes into the manifest) says so.

The exporter stamps the newest IR version its onnx package knows (10 with torch 2.13), which ONNX
Runtime <= 1.17 refuses to load whatever the operators. The file is re-stamped with the lowest IR
version its opsets allow (:func:`lowest_ir_version`; 8 for opset 18): nothing in the graph
changes, and every runtime that knows the opset loads it (:mod:`sfdeploy.compatibility`).
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

from sfdeploy.artifacts import ARTIFACT_INFO_KEY, INPUT_NAME, OUTPUT_NAME, self_check
from sfdeploy.clipspec import SPEC_KEY
from sfdeploy.compatibility import ONNX_OPSET
from sfdeploy.errors import ExportError
from sfdeploy.export.formats import Written, artifact_info


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


def lowest_ir_version(model: Any) -> int:
    """The lowest ONNX IR version that can hold ``model``'s opset imports."""
    import onnx

    return onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)


def opset_of(model: Any) -> int:
    """The model's opset of the default (``ai.onnx``) domain."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, spec_json: str,
                precision: str = "fp32", *, check_device: str = "cpu") -> Written:
    """Write ``path`` and check it against ``module`` in onnxruntime on ``check_device``
    (``cpu`` or ``cuda[:N]``); returns what the check ran on and found, and the model's facts
    (its opset and IR version among them)."""
    import json

    import onnx

    from sfdeploy.runtime.ort import OrtPredictor

    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with _quiet_exporter():
            torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=ONNX_OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes={INPUT_NAME: {0: batch}}, external_data=False)
    except Exception as exc:  # the exporter raises many types; all mean "could not export"
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {str(exc)[:500]}", path=path,
                          fix="export --formats torchscript meanwhile, and report the error") from exc
    with _quiet_exporter():  # onnx_ir's optimizer logs on load too
        model = onnx.load(str(path))
    model.ir_version = lowest_ir_version(model)
    info = artifact_info("onnx", precision, opset=opset_of(model), ir_version=model.ir_version,
                         exporter=f"{model.producer_name} {model.producer_version}")
    for key, value in ((SPEC_KEY, spec_json), (ARTIFACT_INFO_KEY, json.dumps(info))):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    predictor = OrtPredictor(path, device=check_device)
    probe = torch.cat([example, example[:1]])  # another batch size than the exported one
    with torch.no_grad():
        expected = module(probe).float().cpu().numpy()
    got = predictor.predict(probe.cpu().numpy())
    predictor.close()
    diff = float(np.abs(expected - got).max()) if got.shape == expected.shape else float("inf")
    if precision == "fp16" and predictor.device == "cpu":
        logging.getLogger("sfdeploy").log(
            logging.WARNING if example.device.type != "cpu" else logging.INFO,
            "the fp16 ONNX model was self-checked on onnxruntime's CPU provider (it computes fp16 in fp32); on a GPU "
            "check it with `sfdeploy eval --device cuda --precision fp16`")
    return Written(self_check(diff, precision, path=path, device=predictor.device, runtime=predictor.runtime,
                              reference_device=str(probe.device),
                              failure=f"the ONNX model differs from the module it was exported from in onnxruntime "
                                      f"on {predictor.device} (shape {got.shape})",
                              fix="report this with the model config; export --formats torchscript meanwhile"), info)
