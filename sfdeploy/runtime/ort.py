"""ONNX Runtime predictor (CUDA when asked for and available, else CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sfdeploy.clipspec import SPEC_KEY, ClipSpec
from sfdeploy.errors import EnvironmentProblem, InputError
from sfdeploy.runtime import check_batch


def read_onnx_spec(session: object, path: Path) -> ClipSpec:
    meta = session.get_modelmeta().custom_metadata_map  # type: ignore[attr-defined]
    if SPEC_KEY not in meta:
        raise InputError("ONNX model has no sfdeploy clip spec in its metadata", path=path,
                         fix="use a model written by `sfdeploy export`")
    return ClipSpec.from_json(meta[SPEC_KEY])


def ort_device(device: str) -> str:
    """Where ONNX Runtime can run a model asked for on ``device``: the installed onnxruntime is the
    CPU build unless sfdeploy[gpu] (onnxruntime-gpu) is, so CUDA falls back to the CPU."""
    import onnxruntime

    return device if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"


class OrtPredictor:
    def __init__(self, path: Path, *, device: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers: list = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EnvironmentProblem(
                    "onnxruntime has no CUDA provider here",
                    fix="install sfdeploy[gpu] (onnxruntime-gpu) on a CUDA machine, or use --device cpu")
            device_id = int(device.partition(":")[2] or 0)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.spec = read_onnx_spec(self.session, Path(path))
        self.input_name = self.session.get_inputs()[0].name
        self.name = f"onnxruntime:{Path(path).name}"

    def predict(self, frames: np.ndarray) -> np.ndarray:
        check_batch(frames, self.spec)
        return self.session.run(None, {self.input_name: frames})[0]

    def close(self) -> None:
        self.session = None
