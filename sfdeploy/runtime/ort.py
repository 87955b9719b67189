"""ONNX Runtime predictor: the CPU provider, or the CUDA provider with I/O binding; never a silent mix.

onnxruntime can end up on the CPU without raising in three ways: CUDA asked of the CPU build (a
warning), a CUDA provider that is installed but cannot load the CUDA / cuDNN libraries it was
built for (a log line), and ``InferenceSession``'s own retry on the CPU when creating or running a
session on CUDA fails. :func:`open_session` turns the retry off and compares the providers of the
session it got with the ones it asked for, so a session asked for CUDA runs on CUDA or raises
:class:`EnvironmentProblem` naming what is missing (``sfdeploy doctor`` runs the same check).

On CUDA each call binds its input (a host array, a torch tensor on the device, or an
``OrtValue``) and its output on the device, runs, and copies the probabilities back once.
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path
from typing import Any

import numpy as np

from sfdeploy.clipspec import SPEC_KEY, ClipSpec
from sfdeploy.device import Device
from sfdeploy.errors import EnvironmentProblem, InputError
from sfdeploy.runtime.base import Frames, check_batch, host_array, is_ort_value, is_torch_tensor
from sfdeploy.runtime.placement import ORT_CUDA_PROVIDER, backend_device, ort_cuda_installed, ort_no_cuda_error

CPU_PROVIDER = "CPUExecutionProvider"
_CUDA_LIBRARY = "libonnxruntime_providers_cuda.so"


def read_onnx_spec(session: object, path: Path) -> ClipSpec:
    """The clip spec the exporter wrote into the model's metadata: the predictor preprocesses by it."""
    meta = session.get_modelmeta().custom_metadata_map  # type: ignore[attr-defined]
    if SPEC_KEY not in meta:
        raise InputError("ONNX model has no sfdeploy clip spec in its metadata", path=path,
                         fix="use a model written by `sfdeploy export`")
    return ClipSpec.from_json(meta[SPEC_KEY])


def _ort_version() -> str:
    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return f"{dist} {md.version(dist)}"
        except md.PackageNotFoundError:
            continue
    return "onnxruntime"


def _why_cuda_did_not_load() -> str:
    """What keeps the installed CUDA provider from loading, as far as can be told from here: the
    dynamic loader's own message for its library names the first missing CUDA / cuDNN library."""
    import ctypes

    import onnxruntime

    library = Path(onnxruntime.__file__).parent / "capi" / _CUDA_LIBRARY
    if not library.is_file():
        return f"{_CUDA_LIBRARY} is not in the onnxruntime package"
    try:
        ctypes.CDLL(str(library))
    except OSError as exc:
        return f"its library does not load: {exc}"
    return ("its library loads, so onnxruntime failed to create the provider itself (GPU driver too old for "
            "its CUDA, no visible device, or an unsupported GPU); onnxruntime's log line above says which")


def _cuda_did_not_load(got: list[str], device: str) -> EnvironmentProblem:
    import onnxruntime
    import torch

    built_for = getattr(onnxruntime, "cuda_version", "") or "?"
    torch_cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
    return EnvironmentProblem(
        f"ONNX Runtime on {device} was asked for, but the session runs on {', '.join(got) or 'nothing'}: "
        f"{_ort_version()} has the {ORT_CUDA_PROVIDER} but it did not load; {_why_cuda_did_not_load()}",
        fix=f"make the CUDA {built_for} and cuDNN 9 libraries this onnxruntime-gpu was built for loadable: "
            "pip install 'onnxruntime-gpu[cuda,cudnn]' (NVIDIA's wheels), or use a torch built for the same CUDA "
            f"major (sfdeploy imports torch first, which loads its own; torch here is {torch_cuda}). "
            "`python -c 'import onnxruntime; onnxruntime.print_debug_info()'` shows what loads. Or use --device cpu")


def open_session(model: str | Path | bytes, device: str | Device = "cpu", *, threads: int | None = None,
                 tf32: bool = True) -> Any:
    """An ``onnxruntime.InferenceSession`` on ``device`` (``cpu`` or ``cuda:N``), checked to run
    where it was asked to. ``tf32`` sets the CUDA provider's ``use_tf32`` (checked too)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # ONNX Runtime's idle threads spin by default, burning the cores sfdeploy's decode workers
    # (and Ray's decode tasks, and other model instances) need at that moment. Off, measured on 2
    # cores: model alone as fast (tiny model, batch 8: 138 vs 135 clips/s); `infer` on 1,920
    # videos 19.8 s vs 21.5 s (local engine), 35 s vs 43 s (a 2-thread Ray model actor).
    for spinning in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        options.add_session_config_entry(spinning, "0")
    source = str(model) if isinstance(model, Path) else model
    device = Device(device)
    if not device.is_cuda:
        return ort.InferenceSession(source, sess_options=options, providers=[CPU_PROVIDER])
    if not ort_cuda_installed():
        raise ort_no_cuda_error()
    import torch  # noqa: F401 - loads the CUDA libraries of torch's build, where onnxruntime-gpu looks too

    index = str(device.index)
    wanted = {"device_id": index, "use_tf32": "1" if tf32 else "0"}
    # enable_fallback=0: no silent retry on the CPU when CUDA fails at creation or at run time
    session = ort.InferenceSession(source, sess_options=options, providers=[(ORT_CUDA_PROVIDER, wanted), CPU_PROVIDER],
                                   enable_fallback=0)
    got = session.get_providers()
    if not got or got[0] != ORT_CUDA_PROVIDER:
        raise _cuda_did_not_load(got, device)
    applied = session.get_provider_options().get(ORT_CUDA_PROVIDER, {})
    differs = {k: applied.get(k) for k, v in wanted.items() if applied.get(k) != v}
    if differs:
        raise EnvironmentProblem(f"{_ort_version()} created its CUDA provider with {differs}, not {wanted}",
                                 fix="install the onnxruntime-gpu version sfdeploy[gpu] pins")
    return session


def run_bound(session: Any, input_name: str, output_name: str, frames: Frames, device_type: str = "cuda",
              device_id: int = 0) -> np.ndarray:
    """One run with I/O binding: the input bound where it already is (a torch tensor on the
    session's device by its pointer, an ``OrtValue`` as is, host memory as a host array that
    onnxruntime uploads itself), the output bound on the device, copied to the host once."""
    binding = session.io_binding()
    if is_torch_tensor(frames) and frames.device.type == device_type:
        if device_type == "cuda":
            frames = frames.to(f"cuda:{device_id}")  # no copy when already there
        frames = frames.contiguous()
        if device_type == "cuda":
            import torch

            # onnxruntime reads the memory on its own stream: the work that wrote it must be done.
            torch.cuda.current_stream(frames.device).synchronize()
        binding.bind_input(input_name, device_type, device_id, np.uint8, tuple(frames.shape), frames.data_ptr())
    elif is_ort_value(frames):
        binding.bind_ortvalue_input(input_name, frames)
    else:
        binding.bind_cpu_input(input_name, np.ascontiguousarray(host_array(frames)))
    binding.bind_output(output_name, device_type, device_id)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0]  # `frames` is referenced until here: its memory outlives the run


class OrtPredictor:
    """An ONNX artifact run by ONNX Runtime: on the CPU provider, or on the CUDA provider with I/O
    binding (see the module docstring); never on another device than the one asked for."""

    def __init__(self, path: Path, *, device: str | Device = "cpu", threads: int | None = None,
                 tf32: bool = True) -> None:
        device = backend_device("onnxruntime", device)  # CUDA asked of the CPU build: a clear error
        if device.is_cuda:
            from sfdeploy.runtime.cuda import cuda_device

            device = cuda_device(device)  # cuda -> cuda:N
        self.device = device
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph, InvalidProtobuf

        try:
            self.session = open_session(Path(path), device, threads=threads, tf32=tf32)
        except (InvalidProtobuf, InvalidGraph) as exc:  # not an ONNX model: nothing of it was run
            raise InputError(f"not an ONNX model ({str(exc).splitlines()[0][:200]})", path=path,
                             fix="use a model written by `sfdeploy export` (re-run it)") from exc
        self.providers = tuple(self.session.get_providers())
        self.tf32 = device != "cpu" and tf32
        self.runtime = f"{_ort_version()} {self.providers[0]}"
        self.spec = read_onnx_spec(self.session, Path(path))
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.name = f"onnxruntime:{Path(path).name}"

    def predict(self, frames: Frames) -> np.ndarray:
        """Probabilities of a uint8 batch: a plain run on the CPU, a bound one on CUDA (no host round trip)."""
        check_batch(frames, self.spec)
        if not self.device.is_cuda:
            return self.session.run(None, {self.input_name: host_array(frames)})[0]
        return run_bound(self.session, self.input_name, self.output_name, frames, "cuda", self.device.index)

    def close(self) -> None:
        """Drop the session (its memory on the device goes with it)."""
        self.session = None
