"""Run an exported model: one predictor per backend, one interface.

A predictor takes the uint8 batch ``[N, V, T, H, W, 3]`` that :mod:`sfdeploy.preprocess` makes
and returns float32 probabilities ``[N, num_classes]``. Each reads the clip spec from the
artifact it serves (or from the served model's config), never from a copy of its own, so the
client always preprocesses the way the model was exported.

What a batch may be (:data:`Frames`): a numpy array, or a torch tensor on the CPU or on a CUDA
device. On a CUDA predictor a tensor already on its device is used where it is (no round trip
through the host); a host batch crosses PCIe once, as uint8: TorchScript through a pinned staging
buffer and a non-blocking copy, ONNX Runtime through I/O binding (an ``onnxruntime.OrtValue``
is accepted there too). The result is always a float32 numpy array on the host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sfdeploy.artifacts import LOCAL_BACKENDS, Manifest, artifact_key, backend_device, backend_format
from sfdeploy.clipspec import ClipSpec
from sfdeploy.errors import InputError

#: numpy array | torch.Tensor (CPU or CUDA) | onnxruntime.OrtValue (ONNX Runtime only)
Frames = Any


class Predictor(Protocol):
    name: str
    spec: ClipSpec
    device: str  # where the model runs: "cpu", "cuda:N", or "remote" for a served model

    def predict(self, frames: Frames) -> np.ndarray:
        """uint8 ``[N, V, T, H, W, 3]`` (numpy or torch, see the module docstring) -> float32
        numpy ``[N, num_classes]``."""
        ...

    def close(self) -> None: ...


class LocalPredictor(Predictor, Protocol):
    """A predictor running an artifact in this process (what the parity gate records)."""

    tf32: bool  # whether fp32 convolutions may run in TF32 (False on the CPU)
    runtime: str  # e.g. "torch 2.11.0" or "onnxruntime 1.31.1 CUDAExecutionProvider"


def is_torch_tensor(value: object) -> bool:
    """True for a torch tensor, without importing torch for a numpy array."""
    return type(value).__module__.startswith("torch") and hasattr(value, "data_ptr")


def is_ort_value(value: object) -> bool:
    """True for an ``onnxruntime.OrtValue``, without importing onnxruntime."""
    return type(value).__module__.startswith("onnxruntime") and hasattr(value, "data_type")


def _not_a_batch(frames: object) -> InputError:
    return InputError(f"a batch must be a numpy array or a torch tensor, not {type(frames).__name__}",
                      fix="make batches with sfdeploy.preprocess.load_video (numpy uint8)")


def batch_layout(frames: Frames) -> tuple[str, tuple[int, ...]]:
    """``(dtype name, shape)`` of a numpy array, a torch tensor or an ``OrtValue``."""
    if isinstance(frames, np.ndarray):
        return str(frames.dtype), tuple(frames.shape)
    if is_torch_tensor(frames):
        return str(frames.dtype).removeprefix("torch."), tuple(frames.shape)
    if is_ort_value(frames):
        return frames.data_type().removeprefix("tensor(").removesuffix(")"), tuple(frames.shape())
    raise _not_a_batch(frames)


def check_batch(frames: Frames, spec: ClipSpec) -> None:
    dtype, shape = batch_layout(frames)
    if dtype != "uint8" or len(shape) != 6 or shape[1:] != spec.input_shape:
        raise InputError(f"input batch {dtype} {shape} does not match the model's "
                         f"uint8 [N, {', '.join(map(str, spec.input_shape))}]",
                         fix="make batches with sfdeploy.preprocess.load_video for this model's clip spec")


def host_array(frames: Frames) -> np.ndarray:
    """The batch as a numpy array on the host (no copy for numpy or a CPU tensor)."""
    if isinstance(frames, np.ndarray):
        return frames
    if is_torch_tensor(frames):
        return frames.detach().cpu().numpy()
    if is_ort_value(frames):
        return frames.numpy()
    raise _not_a_batch(frames)


def open_artifact(path: Path, fmt: str, *, device: str = "cpu", threads: int | None = None,
                  tf32: bool = True) -> LocalPredictor:
    """A predictor for one artifact file of format ``fmt`` (``onnx`` or ``torchscript``) on
    ``device`` (``cpu``, ``cuda``, ``cuda:N``: a demand, never silently another device).
    ``tf32=False`` keeps fp32 convolutions in IEEE fp32 on Ampere+ GPUs (the parity gate's setting;
    the default lets the GPU use TF32, as torch and ONNX Runtime do by default)."""
    if fmt == "onnx":
        from sfdeploy.runtime.ort import OrtPredictor

        return OrtPredictor(path, device=device, threads=threads, tf32=tf32)
    from sfdeploy.runtime.torchscript import TorchScriptPredictor

    return TorchScriptPredictor(path, device=device, threads=threads, tf32=tf32)


def open_local(backend: str, export_dir: Path, *, precision: str = "fp32", device: str = "cpu",
               threads: int | None = None) -> LocalPredictor:
    """A predictor for an artifact of ``export_dir``, read through its manifest (and verified
    against the sha256 recorded there). ``device`` may be ``auto``: see
    :func:`sfdeploy.artifacts.backend_device`."""
    fmt = backend_format(backend)
    run_on = backend_device(backend, device)
    path = Manifest.read(export_dir).artifact_path(export_dir, artifact_key(fmt, precision))
    return open_artifact(path, fmt, device=run_on, threads=threads)


def open_predictor(backend: str, *, export_dir: Path | None = None, precision: str = "fp32",
                   device: str = "cpu", threads: int | None = None, url: str = "127.0.0.1:8000",
                   protocol: str = "http", model: str = "slowfast") -> Predictor:
    """A predictor for any backend: a local artifact of ``export_dir``, or a Triton-served model."""
    if backend in LOCAL_BACKENDS:
        if export_dir is None:
            raise InputError(f"--backend {backend} runs an exported model in this process", fix="pass --export EXPORT")
        return open_local(backend, export_dir, precision=precision, device=device, threads=threads)
    if backend == "triton":
        from sfdeploy.runtime.triton import TritonPredictor

        return TritonPredictor(url=url, model=model, protocol=protocol)
    raise InputError(f"unknown backend '{backend}'", fix=f"use one of: {', '.join((*LOCAL_BACKENDS, 'triton'))}")
