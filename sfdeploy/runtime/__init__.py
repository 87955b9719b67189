"""Run an exported model: one predictor per backend, one interface.

A predictor takes the uint8 batch ``[N, V, T, H, W, 3]`` that :mod:`sfdeploy.preprocess` makes
and returns float32 probabilities ``[N, num_classes]``. Each reads the clip spec from the
artifact it serves (or from the served model's config), never from a copy of its own, so the
client always preprocesses the way the model was exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from sfdeploy.artifacts import LOCAL_BACKENDS, Manifest, artifact_key, backend_format
from sfdeploy.clipspec import ClipSpec
from sfdeploy.errors import InputError


class Predictor(Protocol):
    name: str
    spec: ClipSpec

    def predict(self, frames: np.ndarray) -> np.ndarray:
        """uint8 ``[N, V, T, H, W, 3]`` -> float32 ``[N, num_classes]``."""
        ...

    def close(self) -> None: ...


def check_batch(frames: np.ndarray, spec: ClipSpec) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 6 or tuple(frames.shape[1:]) != spec.input_shape:
        raise InputError(f"input batch {frames.dtype} {tuple(frames.shape)} does not match the model's "
                         f"uint8 [N, {', '.join(map(str, spec.input_shape))}]",
                         fix="make batches with sfdeploy.preprocess.load_video for this model's clip spec")


def open_artifact(path: Path, fmt: str, *, device: str = "cpu", threads: int | None = None) -> Predictor:
    """A predictor for one artifact file of format ``fmt`` (``onnx`` or ``torchscript``)."""
    if fmt == "onnx":
        from sfdeploy.runtime.ort import OrtPredictor

        return OrtPredictor(path, device=device, threads=threads)
    from sfdeploy.runtime.torchscript import TorchScriptPredictor

    return TorchScriptPredictor(path, device=device, threads=threads)


def open_local(backend: str, export_dir: Path, *, precision: str = "fp32", device: str = "cpu",
               threads: int | None = None) -> Predictor:
    """A predictor for an artifact of ``export_dir``, read through its manifest (and verified
    against the sha256 recorded there)."""
    fmt = backend_format(backend)
    path = Manifest.read(export_dir).artifact_path(export_dir, artifact_key(fmt, precision))
    return open_artifact(path, fmt, device=device, threads=threads)


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
