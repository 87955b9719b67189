"""What every artifact torch runs shares: TorchScript, torch.export's ExportedProgram, and an
AOTInductor package differ only in how the file is loaded (and, on the CPU, optimised).

:class:`TorchPredictor` does the rest once: it resolves the device, refuses a precision the
device would only emulate (bf16 on a CPU without AVX512-BF16 / AMX, :mod:`sfdeploy.precision`),
runs numpy batches on the CPU without a copy, feeds a GPU through
:class:`sfdeploy.runtime.cuda.DeviceFeeder` (pinned staging buffer, non-blocking copy, tensors
already on the device used in place), and replays CUDA graphs per batch bucket where that pays
(:class:`sfdeploy.runtime.cuda.CudaGraphs`: at small batches the launches, not the GPU, set the
pace). A format's module subclasses it with :meth:`TorchPredictor.load` (and
:meth:`TorchPredictor.optimize_cpu`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfdeploy.clipspec import ClipSpec
from sfdeploy.device import Device
from sfdeploy.errors import InputError
from sfdeploy.precision import REDUCED, check_runs
from sfdeploy.runtime.base import Frames, check_batch


@dataclass
class Loaded:
    """An artifact as its loader returns it: the callable to run, the clip spec it carries, and
    the facts it carries about itself (:data:`sfdeploy.artifacts.ARTIFACT_INFO_KEY`; empty for an
    artifact written before artifacts carried them)."""

    module: Any
    spec: ClipSpec
    info: dict[str, Any] = field(default_factory=dict)


def parse_info(text: str, path: Path) -> dict[str, Any]:
    """The artifact's facts from their JSON text ("" when it carries none)."""
    if not text:
        return {}
    try:
        info = json.loads(text)
    except ValueError as exc:
        raise InputError(f"the artifact's sfdeploy facts are not JSON ({exc})", path=path,
                         fix="use a model written by `sfdeploy export` (re-run it)") from exc
    if not isinstance(info, dict):
        raise InputError("the artifact's sfdeploy facts are not a JSON object", path=path,
                         fix="use a model written by `sfdeploy export` (re-run it)")
    return info


class TorchPredictor:
    """Runs one torch artifact on the CPU or one GPU (see the module docstring)."""

    #: the format a subclass loads (``torchscript``, ``torch_export``, ``aoti``)
    format = ""

    def __init__(self, path: Path, *, device: str = "cpu", threads: int | None = None, tf32: bool = True,
                 cuda_graphs: bool = True, optimize: bool = True) -> None:
        """``tf32=False``: each call runs inside :func:`sfdeploy.runtime.cuda.exact_fp32` (torch's
        TF32 flags are process-wide: set for the call, restored after it). ``cuda_graphs``: on
        CUDA, calls replay graphs captured per batch bucket. ``optimize``: on the CPU, the format's
        load-time optimisation (:meth:`optimize_cpu`)."""
        import torch

        self._feeder = None
        self._graphs = None
        path = Path(path)
        self.device = Device(device).resolve()  # raises when torch cannot see a CUDA device asked for
        if self.device != "cpu":
            from sfdeploy.runtime.cuda import DeviceFeeder

            self._feeder = DeviceFeeder(self.device)
            self.device = Device(str(self._feeder.device))
        if threads:
            torch.set_num_threads(threads)
        self.tf32 = tf32 and self._feeder is not None
        self.runtime = f"torch {torch.__version__}"
        self.name = f"{self.format}:{path.name}"
        loaded = self.load(path, self.device)
        self.spec, self.info = loaded.spec, loaded.info
        precision = self.info.get("precision")
        if precision:
            check_runs(precision, self.device, path=path)
        if self._feeder is not None and precision in REDUCED and self.format != "torchscript":
            # What a TorchScript trace bakes into its convolutions, the other formats read from the
            # process: cuDNN's benchmark mode (the fastest algorithm per input shape; the served
            # shapes are fixed per batch bucket) for a reduced precision on CUDA. Process-wide.
            torch.backends.cudnn.benchmark = True
        self.module, self.optimized = loaded.module, ""
        if self._feeder is None and optimize:
            self.module, self.optimized = self.optimize_cpu(self.module)
        self._run = self.module
        if self._feeder is not None and cuda_graphs:
            from sfdeploy.runtime.cuda import CudaGraphs

            self._run = self._graphs = CudaGraphs(self.module, self.device)

    def load(self, path: Path, device: str) -> Loaded:
        """Load the artifact at ``path`` onto ``device`` (``cpu`` or ``cuda:N``)."""
        raise NotImplementedError

    def optimize_cpu(self, module: Any) -> tuple[Any, str]:
        """The module to run on the CPU, and what was done to it (default: nothing)."""
        return module, ""

    def predict(self, frames: Frames) -> np.ndarray:
        """Probabilities of a uint8 batch: on the CPU a plain call; on CUDA through the device feeder (and the
        CUDA graphs), in exact fp32 when TF32 is off."""
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
        """Drop the module and its graphs (their GPU memory goes with them)."""
        self.module = self._run = self._graphs = None
