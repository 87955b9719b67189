"""AOTInductor export: the ExportedProgram compiled ahead of time into one ``.aoti.pt2`` package
for the device it will run on (``torch._inductor.aoti_compile_and_package``).

Why: Inductor fuses the element-wise work around the convolutions (normalisation, residual adds,
ReLUs: 18% of an H200's fp16 profile as separate kernels) and the package runs without Python
model code or torch's graph interpreter. Why not always: a package runs only on the device kind,
CPU instruction set or GPU compute capability, and torch build it was compiled on, and compiling
takes a while (slowfast_tiny 30-40 s, R50 35-90 s on 2 CPU cores; the progress line counts it). So
it is opt-in (``--formats ...,aoti``) and made where it will serve: ``sfdeploy export --device
cuda`` on the GPU host compiles the CUDA package (see README, "Formats"). On the CPU it measured
slower than frozen TorchScript for SlowFast (R50 batch 1, one thread: 750 vs 420 ms): `repo
--runtime auto` serves whichever the export measured fastest.

The package carries the clip spec and the artifact's facts in its metadata table (with
AOTInductor's own: device, CPU ISA, compute capability), which :mod:`sfdeploy.runtime.aoti` reads
before loading it. fp32 is compiled with exact fp32 flags (no TF32 in any generated matmul), the
reduced precisions with cuDNN's benchmark mode, as for TorchScript.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sfdeploy.artifacts import ARTIFACT_INFO_KEY
from sfdeploy.clipspec import SPEC_KEY
from sfdeploy.device import Device
from sfdeploy.errors import ExportError
from sfdeploy.export.formats import Written, artifact_info, check_reloaded


def _target(device: str) -> str:
    """What the package's kernels are built for: the CPU's vector ISA, or the GPU's compute capability."""
    if not Device(device).is_cuda:
        return torch.backends.cpu.get_cpu_capability()
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return f"compute capability {major}{minor} ({torch.cuda.get_device_name(torch.device(device))})"


def export_aoti(module: torch.nn.Module, example: torch.Tensor, path: Path, spec_json: str,
                precision: str = "fp32", *, check_device: str | None = None, show_progress: bool = True) -> Written:
    """Export ``module`` on ``example``'s device, compile it there, write ``path``, load the
    package there and compare (``check_device`` is ignored: a package runs where it was compiled)."""
    from sfdeploy.export.torch_export import export_program
    from sfdeploy.export.torchscript import baked_conv_flags
    from sfdeploy.progress import elapsed
    from sfdeploy.runtime.aoti import load_aoti

    device = str(example.device)
    info = artifact_info("aoti", precision, compiled_for=Device(device).compiled_kind, target=_target(device))
    program = export_program(module, example, path)
    # AOTInductor requires the package's name to end in .pt2: compile under a temporary folder
    # beside ``path`` (same filesystem), then move the package onto ``path``.
    scratch = Path(tempfile.mkdtemp(prefix=".aoti-", dir=Path(path).parent))
    started = time.monotonic()
    try:
        with baked_conv_flags(precision), elapsed(f"compiling the AOTInductor package ({device}, {precision})",
                                                   enabled=show_progress):
            built = torch._inductor.aoti_compile_and_package(program, package_path=str(scratch / "model.pt2"),
                                                              inductor_configs={"aot_inductor.metadata": {
                                                                  SPEC_KEY: spec_json,
                                                                  ARTIFACT_INFO_KEY: json.dumps(info)}})
        shutil.move(built, path)
    except Exception as exc:  # inductor raises many types (a missing C++ compiler among them)
        raise ExportError(f"AOTInductor compilation failed: {type(exc).__name__}: {str(exc)[:500]}", path=path,
                          fix="AOTInductor needs a C++ compiler (g++) on the CPU, or CUDA and Triton on a GPU "
                              "(`sfdeploy doctor`); leave aoti out of --formats meanwhile") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    compile_s = round(time.monotonic() - started, 1)
    reloaded = load_aoti(path, device).module
    check = check_reloaded(module, reloaded, example, path, precision, what="AOTInductor package",
                           runtime=f"torch {torch.__version__} AOTInductor",
                           fix="report this with the model config; leave aoti out of --formats meanwhile")
    return Written(check, {**info, "compile_s": compile_s})
