"""AOTInductor package predictor (``torch._inductor.aoti_load_package``): the ExportedProgram
compiled ahead of time into a shared library of fused kernels for one device, run without Python
model code and without torch's graph interpreter.

A package only runs where it was compiled for: the same device kind (CPU or CUDA), the same
instruction set (a CPU package built for AVX512 stops with SIGILL on a CPU without it; a CUDA one
carries kernels for one compute capability), and the same torch build (it links against
libtorch's C shim). :func:`read_package_facts` reads those facts from the package's metadata
table inside the archive, *before* its library is loaded, and :func:`check_runs_here` refuses a
package made for another machine with a message that says which fact differs and how to make
one for this machine (``sfdeploy export --formats aoti --device ...`` on it).

Loading a package loads its shared library: that is running its code, as for any ``.so``. Load
only packages you made (sfdeploy's readers check the sha256 the manifest or the Triton config
records before opening one).
"""

from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path
from typing import Any

from sfdeploy.artifacts import ARTIFACT_INFO_KEY
from sfdeploy.clipspec import SPEC_KEY, ClipSpec
from sfdeploy.device import Device
from sfdeploy.errors import EnvironmentProblem, InputError
from sfdeploy.runtime.torch_base import Loaded, TorchPredictor, parse_info

_FIX = "use a package written by `sfdeploy export --formats aoti` (re-run it)"


def read_package_facts(path: Path) -> dict[str, str]:
    """The package's metadata table (AOTInductor's ``AOTI_*`` keys, the clip spec and the
    artifact's facts), read from the archive without loading its library."""
    try:
        with zipfile.ZipFile(path) as archive:
            tables = [n for n in archive.namelist() if n.endswith(".wrapper_metadata.json")]
            if not tables:
                raise InputError("not an AOTInductor package (no compiled model in it)", path=path, fix=_FIX)
            facts = json.loads(archive.read(tables[0]))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"not an AOTInductor package ({exc})", path=path, fix=_FIX) from exc
    if not isinstance(facts, dict):
        raise InputError("not an AOTInductor package (its metadata is not a table)", path=path, fix=_FIX)
    return {str(k): str(v) for k, v in facts.items()}


#: CPU instruction sets by reach: a package built for one runs on any CPU that has it or a later one
_ISA_ORDER = ("DEFAULT", "AVX2", "AVX512")


def _isa_rank(isa: str) -> int:
    words = isa.upper().replace(",", " ").split()
    return max((i for i, name in enumerate(_ISA_ORDER) if name in words), default=0)


def check_runs_here(facts: dict[str, str], info: dict[str, Any], device: str | Device, path: Path) -> None:
    """Refuse a package this machine cannot run on ``device`` (see the module docstring)."""
    import torch

    kind = Device(device).compiled_kind
    fix = (f"compile one for this machine: `sfdeploy export WORK --out EXPORT --formats aoti --device "
           f"{kind}` here (or serve the export's torch_export / torchscript artifact, which load anywhere)")
    built_for = facts.get("AOTI_DEVICE_KEY", "?")
    if built_for != kind:
        raise InputError(f"this AOTInductor package was compiled for {built_for}, not {kind}", path=path, fix=fix)
    wrote = info.get("producer", {}).get("torch")
    if wrote and wrote != torch.__version__:
        raise EnvironmentProblem(f"this AOTInductor package was compiled by torch {wrote}; this is torch "
                                 f"{torch.__version__} (a package runs only in the torch build that made it)",
                                 path=path, fix=fix)
    if kind == "cpu":
        needs, has = facts.get("AOTI_CPU_ISA", ""), torch.backends.cpu.get_cpu_capability()
        if _isa_rank(needs) > _isa_rank(has):
            raise EnvironmentProblem(f"this AOTInductor package needs a CPU with {needs}; this one has {has}",
                                     path=path, fix=fix)
    else:
        needs = facts.get("AOTI_COMPUTE_CAPABILITY", "")
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        if needs and needs != f"{major}{minor}":
            raise EnvironmentProblem(f"this AOTInductor package was compiled for compute capability {needs}; "
                                     f"{device} is {major}{minor}", path=path, fix=fix)


class _Serialised:
    """Calls a package loaded ``run_single_threaded`` (what CUDA graph capture needs) one at a time."""

    def __init__(self, model: Any) -> None:
        self.model, self._lock = model, threading.Lock()

    def __call__(self, frames: Any) -> Any:
        with self._lock:
            return self.model(frames)


def load_aoti(path: Path, device: str = "cpu", *, single_threaded: bool = False) -> Loaded:
    """The package's model on ``device``, its clip spec and facts, once :func:`check_runs_here`
    has said this machine runs it."""
    import torch

    facts = read_package_facts(path)
    if SPEC_KEY not in facts:
        raise InputError("the AOTInductor package has no sfdeploy clip spec", path=path, fix=_FIX)
    info = parse_info(facts.get(ARTIFACT_INFO_KEY, ""), path)
    check_runs_here(facts, info, device, path)
    index = torch.device(device).index if Device(device).is_cuda else -1
    try:
        model = torch._inductor.aoti_load_package(str(path), run_single_threaded=single_threaded,
                                                  device_index=-1 if index is None else index)
    except RuntimeError as exc:
        raise InputError(f"the AOTInductor package does not load ({str(exc).splitlines()[0][:200]})", path=path,
                         fix=_FIX) from exc
    return Loaded(_Serialised(model) if single_threaded else model, ClipSpec.from_json(facts[SPEC_KEY]), info)


class AotiPredictor(TorchPredictor):
    """An AOTInductor package (``model.aoti.pt2``): its kernels are already fused and tuned for
    this device, so there is nothing to optimise at load; on CUDA its calls are replayed as CUDA
    graphs like the other torch artifacts (the package is then loaded for one caller at a time,
    which capture needs)."""

    format = "aoti"

    def load(self, path: Path, device: str) -> Loaded:
        """The package on ``device``; on CUDA loaded for one caller at a time (CUDA graph capture)."""
        return load_aoti(path, device, single_threaded=Device(device).is_cuda)
