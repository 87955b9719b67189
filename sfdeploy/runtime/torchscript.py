"""TorchScript predictor (``torch.jit.load``; CUDA or CPU).

On the CPU the module is frozen and optimised for inference when it loads (:func:`optimize_for_cpu`)
and a numpy batch is wrapped, not copied (``torch.from_numpy``). On CUDA batches go through
:class:`sfdeploy.runtime.cuda.DeviceFeeder`: host batches via a reused pinned buffer and a
non-blocking copy, tensors already on the device in place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sfdeploy.artifacts import resolve_device
from sfdeploy.clipspec import SPEC_KEY, ClipSpec
from sfdeploy.errors import InputError
from sfdeploy.runtime.base import Frames, check_batch

SPEC_FILE = f"{SPEC_KEY}.json"  # name of the extra file inside model.pt


def load_torchscript(path: Path, device: str = "cpu") -> tuple[object, ClipSpec]:
    import torch

    extra = {SPEC_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except RuntimeError as exc:  # not a TorchScript archive (a pickle, a checkpoint): nothing of it was run
        raise InputError(f"not a TorchScript model ({str(exc).splitlines()[0][:200]})", path=path,
                         fix="use a model written by `sfdeploy export` (re-run it)") from exc
    if not extra[SPEC_FILE]:
        raise InputError("TorchScript model has no sfdeploy clip spec", path=path,
                         fix="use a model written by `sfdeploy export`")
    return module.eval(), ClipSpec.from_json(extra[SPEC_FILE])


def optimize_for_cpu(module: Any) -> tuple[Any, str]:
    """``torch.jit.optimize_for_inference(torch.jit.freeze(module))``: oneDNN's prepacked weight
    layouts, conv+BN folding and conv+ReLU fusion for the CPU, done at load (the artifact on disk
    stays the portable graph). R50 batch 1 on one core: 1,090 -> 684 ms of CPU time. Returns the
    module to run and what was done; a graph torch cannot optimise runs as loaded (the reason is
    returned and logged)."""
    import logging

    import torch

    try:
        return torch.jit.optimize_for_inference(torch.jit.freeze(module.eval())), "freeze + optimize_for_inference"
    except (RuntimeError, ValueError) as exc:  # e.g. a half-precision graph on the CPU
        reason = f"not optimised ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        logging.getLogger("sfdeploy").info("TorchScript on the CPU: %s", reason)
        return module, reason


class TorchScriptPredictor:
    def __init__(self, path: Path, *, device: str = "cpu", threads: int | None = None, tf32: bool = True,
                 cuda_graphs: bool = True, optimize: bool = True) -> None:
        """``tf32=False``: each call runs inside :func:`sfdeploy.runtime.cuda.exact_fp32` (torch's
        TF32 flags are process-wide: they are set for the call and restored after it). They reach
        the matmuls; the convolutions run as the export baked them (:mod:`sfdeploy.export.torchscript`:
        an fp32 artifact never uses TF32 for them, an fp16 one uses cuDNN's benchmark mode).
        ``cuda_graphs``: on CUDA, calls replay graphs captured per batch bucket
        (:class:`sfdeploy.runtime.cuda.CudaGraphs`); the served runtime's launch cost disappears.
        ``optimize``: on the CPU, the module is frozen and optimised for inference at load
        (:func:`optimize_for_cpu`)."""
        import torch

        self._feeder = None
        self._graphs = None
        self.device = resolve_device(device)  # raises when torch cannot see a CUDA device asked for
        if self.device != "cpu":
            from sfdeploy.runtime.cuda import DeviceFeeder

            self._feeder = DeviceFeeder(self.device)
            self.device = str(self._feeder.device)
        if threads:
            torch.set_num_threads(threads)
        self.tf32 = tf32 and self._feeder is not None
        self.runtime = f"torch {torch.__version__}"
        self.module, self.spec = load_torchscript(Path(path), self.device)
        self.name = f"torchscript:{Path(path).name}"
        self.optimized = ""
        if self._feeder is None and optimize:
            self.module, self.optimized = optimize_for_cpu(self.module)
        self._run = self.module
        if self._feeder is not None and cuda_graphs:
            from sfdeploy.runtime.cuda import CudaGraphs

            self._run = self._graphs = CudaGraphs(self.module, self.device)

    def predict(self, frames: Frames) -> np.ndarray:
        import torch

        check_batch(frames, self.spec)
        if self._feeder is None:
            # a tensor is made contiguous: other strides would take other kernels, other roundings
            batch = torch.from_numpy(frames) if isinstance(frames, np.ndarray) else frames.to("cpu").contiguous()
            with torch.inference_mode():
                probs = self.module(batch)
            return probs.float().cpu().numpy()
        if self.tf32:
            return self._feeder.run(self._run, frames)
        from sfdeploy.runtime.cuda import exact_fp32

        with exact_fp32():
            return self._feeder.run(self._run, frames)

    @property
    def graphs(self) -> str:
        """How calls run on CUDA (for records and the server log): graph buckets captured so far,
        or why not."""
        if self._graphs is None:
            return "no CUDA graphs"
        if self._graphs.disabled:
            return self._graphs.disabled
        return f"CUDA graphs for batch buckets {', '.join(map(str, self._graphs.buckets))}"

    def host_buffer(self) -> object:
        """The calling thread's pinned staging buffer on CUDA (None on the CPU or before the first
        host batch); for tests and diagnostics."""
        return self._feeder.host_buffer() if self._feeder else None

    def close(self) -> None:
        self.module = self._run = self._graphs = None
