"""Run an exported model: one predictor per backend, one interface.

A predictor takes the uint8 batch ``[N, V, T, H, W, 3]`` that :mod:`sfdeploy.decode` makes
and returns float32 probabilities ``[N, num_classes]``. Each reads the clip spec from the
artifact it serves (or from the served model's config), never from a copy of its own, so the
client always preprocesses the way the model was exported.

What a batch may be (:data:`Frames`): a numpy array, or a torch tensor on the CPU or on a CUDA
device. On a CUDA predictor a tensor already on its device is used where it is (no round trip
through the host); a host batch crosses PCIe once, as uint8: torch's artifacts (TorchScript, the
ExportedProgram, an AOTInductor package: :mod:`sfdeploy.runtime.torch_base`) through a pinned
staging buffer and a non-blocking copy, ONNX Runtime through I/O binding (an
``onnxruntime.OrtValue`` is accepted there too). The result is always a float32 numpy array on
the host.
"""

from __future__ import annotations

from pathlib import Path

from sfdeploy.artifacts import Manifest, artifact_key, backend_format
from sfdeploy.device import DEFAULT_DEVICE, Device
from sfdeploy.runtime.base import (  # noqa: F401 - the interface, read from here by the layers above
    Frames,
    LocalPredictor,
    Predictor,
    batch_layout,
    check_batch,
    host_array,
    is_ort_value,
    is_torch_tensor,
)
from sfdeploy.runtime.placement import format_device

#: the predictor class of each artifact format, by module (imported when used)
PREDICTORS: dict[str, tuple[str, str]] = {
    "onnx": ("sfdeploy.runtime.ort", "OrtPredictor"),
    "torchscript": ("sfdeploy.runtime.torchscript", "TorchScriptPredictor"),
    "torch_export": ("sfdeploy.runtime.torch_export", "ExportedProgramPredictor"),
    "aoti": ("sfdeploy.runtime.aoti", "AotiPredictor"),
}


def open_artifact(path: Path, fmt: str, *, device: str | Device = "cpu", threads: int | None = None,
                  tf32: bool = True) -> LocalPredictor:
    """A predictor for one artifact file of format ``fmt`` (:data:`sfdeploy.artifacts.FORMATS`) on
    ``device`` (``cpu``, ``cuda``, ``cuda:N``: a demand, never silently another device).
    ``tf32=False`` keeps fp32 convolutions in IEEE fp32 on Ampere+ GPUs (the parity gate's setting;
    the default lets the GPU use TF32, as torch and ONNX Runtime do by default)."""
    return predictor_class(fmt)(path, device=device, threads=threads, tf32=tf32)


def predictor_class(fmt: str) -> type:
    """The predictor class of artifact format ``fmt`` (imported on first use)."""
    import importlib

    module, name = PREDICTORS[fmt]
    return getattr(importlib.import_module(module), name)


def open_local(backend: str, export_dir: Path, *, precision: str = "fp32", device: str | Device = DEFAULT_DEVICE,
               threads: int | None = None) -> LocalPredictor:
    """A predictor for an artifact of ``export_dir``, read through its manifest (and verified
    against the sha256 recorded there). ``device`` may be ``auto``: see
    :func:`sfdeploy.runtime.placement.format_device` (for an AOTInductor package, ``auto`` is the
    device kind it was compiled for)."""
    fmt = backend_format(backend)
    manifest = Manifest.read(export_dir)
    key = artifact_key(fmt, precision)
    path = manifest.artifact_path(export_dir, key)
    run_on = format_device(fmt, device, compiled_for=manifest.artifacts[key].device_kind)
    return open_artifact(path, fmt, device=run_on, threads=threads)
