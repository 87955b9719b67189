"""The predictor interface and the batch helpers every backend shares (:mod:`sfdeploy.runtime`
opens the backends; the backends import only this module, never the package that opens them).

A predictor takes the uint8 batch ``[N, V, T, H, W, 3]`` that :mod:`sfdeploy.decode` makes
and returns float32 probabilities ``[N, num_classes]``. What a batch may be (:data:`Frames`): a
numpy array, or a torch tensor on the CPU or on a CUDA device (and, for ONNX Runtime, an
``onnxruntime.OrtValue``).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from sfdeploy.clipspec import ClipSpec
from sfdeploy.errors import InputError

#: numpy array | torch.Tensor (CPU or CUDA) | onnxruntime.OrtValue (ONNX Runtime only)
Frames = Any


class Predictor(Protocol):
    """What every runtime offers its callers (client, evaluation, bench, the Triton backends): clips
    in, probabilities out, whatever runs the model, in this process or on a server. ``spec`` says
    what clips it takes, so callers preprocess for the model actually loaded."""

    name: str
    spec: ClipSpec
    device: str  # where the model runs: "cpu", "cuda:N", or sfdeploy.device.REMOTE for a served model

    def predict(self, frames: Frames) -> np.ndarray:
        """uint8 ``[N, V, T, H, W, 3]`` (numpy or torch, see the module docstring) -> float32
        numpy ``[N, num_classes]``."""
        ...

    def close(self) -> None:
        """Release what the predictor holds (sessions, GPU memory, connections, shared memory); it
        is not used afterwards."""
        ...


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
                      fix="make batches with sfdeploy.decode.clips.load_video (numpy uint8)")


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
    """Refuse a batch that is not uint8 ``[N, *spec.input_shape]`` with an :class:`InputError` naming both shapes,
    before a runtime fails on it with a less useful message."""
    dtype, shape = batch_layout(frames)
    if dtype != "uint8" or len(shape) != 6 or shape[1:] != spec.input_shape:
        raise InputError(f"input batch {dtype} {shape} does not match the model's "
                         f"uint8 [N, {', '.join(map(str, spec.input_shape))}]",
                         fix="make batches with sfdeploy.decode.clips.load_video for this model's clip spec")


def host_array(frames: Frames) -> np.ndarray:
    """The batch as a numpy array on the host (no copy for numpy or a CPU tensor)."""
    if isinstance(frames, np.ndarray):
        return frames
    if is_torch_tensor(frames):
        return frames.detach().cpu().numpy()
    if is_ort_value(frames):
        return frames.numpy()
    raise _not_a_batch(frames)
