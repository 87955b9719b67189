"""Which runtime, and which of NVIDIA's Triton containers, loads which artifact: the facts, and
the rules that turn an artifact's own facts into ``manifest.json``'s ``loads_in`` and README's
table (:func:`readme_table`; a test keeps README equal to it).

Why it matters: users serve sfdeploy's artifacts in Triton containers they already run, often a
year or two old. ONNX Runtime refuses a model whose IR version is newer than it knows ("max
supported IR version: 9" in ORT <= 1.17, every container up to 24.04), however old its operators
are; torch 2.13's exporter stamps IR 10. The ONNX artifact is therefore stamped with the lowest IR
version its opset allows (:data:`ONNX_IR_VERSION` for :data:`ONNX_OPSET`), and a test exports one
and fails if a future exporter raises either past what is promised here.

Sources: ONNX Runtime's compatibility table (docs/reference/compatibility.md), the
``TRITON_VERSION_MAP`` of triton-inference-server/server's build.py at each release tag (the
container's ONNX Runtime), and NVIDIA's PyTorch container of the same month (the pytorch
backend's libtorch). Measured here: the exported ONNX model loads with identical output in ONNX
Runtime 1.15 to 1.27, the TorchScript file in torch 2.1 to 2.13.
"""

from __future__ import annotations

import importlib.metadata as md
import re
from typing import Any

#: the opset the ONNX exporter writes (torch's dynamo exporter: 18 and up) and the IR version the
#: artifact is stamped with (onnx.helper.find_min_ir_version_for(opset 18)); README promises these
ONNX_OPSET = 18
ONNX_IR_VERSION = 8

#: ONNX Runtime release -> (the highest ONNX opset, the highest IR version it runs)
ORT_LIMITS: dict[str, tuple[int, int]] = {
    "1.13": (17, 8), "1.14": (18, 8), "1.15": (19, 8), "1.16": (19, 9), "1.17": (20, 9), "1.18": (21, 10),
    "1.19": (21, 10), "1.20": (21, 10),
}
#: ONNX Runtime releases the ONNX artifact was loaded in, with identical output (the oldest one
#: by the test suite, tests/test_onnx_compat.py)
ORT_VERIFIED = ("1.15.1", "1.17.3", "1.27.0", "1.32.0")

#: NVIDIA Triton container (nvcr.io/nvidia/tritonserver:<release>-py3) -> (its ONNX Runtime, the
#: torch of its pytorch backend; "" where no source confirmed it)
TRITON_CONTAINERS: dict[str, tuple[str, str]] = {
    "23.01": ("1.13.1", "1.14.0a0"), "23.02": ("1.13.1", "1.14.0a0"), "23.03": ("1.14.1", "2.0.0a0"),
    "23.04": ("1.14.1", "2.1.0a0"), "23.05": ("1.15.0", "2.0.0"), "23.06": ("1.15.0", ""),
    "23.07": ("1.15.1", "2.1.0a0"), "23.08": ("1.15.1", "2.1.0a0"), "23.09": ("1.16.0", "2.1.0a0"),
    "23.10": ("1.16.0", "2.1.0a0"), "23.11": ("1.16.3", "2.2.0a0"), "23.12": ("1.16.3", "2.2.0a0"),
    "24.01": ("1.16.3", "2.2.0a0"), "24.02": ("1.16.3", "2.3.0a0"), "24.03": ("1.17.2", "2.3.0a0"),
    "24.04": ("1.17.3", "2.3.0a0"), "24.05": ("1.18.0", "2.4.0a0"), "24.09": ("1.19.2", "2.5.0a0"),
    "24.12": ("1.20.1", "2.6.0a0"), "25.03": ("1.21.0", "2.7.0a0"), "25.06": ("1.22.0", "2.8.0a0"),
    "25.09": ("1.23.0", "2.9.0a0"), "25.12": ("1.23.2", "2.10.0a0"), "26.07": ("1.27.0", ""),
}
#: the oldest torch the TorchScript artifact loads in (its zip version record 4, plain aten operators;
#: measured with torch 2.1 to 2.13)
TORCHSCRIPT_MIN_TORCH = "2.1"

#: the packages whose versions each format's artifact records as its producer
_PRODUCERS: dict[str, tuple[str, ...]] = {
    "torchscript": ("torch",), "torch_export": ("torch",), "aoti": ("torch",),
    "onnx": ("torch", "onnx", "onnxscript"),
}


def _version(dist: str) -> str:
    if dist == "torch":
        import torch

        return torch.__version__
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return ""


def producer(fmt: str) -> dict[str, str]:
    """The versions of sfdeploy and of the packages that write a ``fmt`` artifact."""
    return {"sfdeploy": _version("sfdeploy"), **{dist: _version(dist) for dist in _PRODUCERS[fmt]}}


def release(version: str) -> tuple[int, ...]:
    """``2.1.0a0+b5021ba`` -> (2, 1, 0), for comparing versions: a pre-release counts as its
    release (NVIDIA's containers ship pre-release builds of torch)."""
    numbers = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(n) for n in numbers.group().split(".")) if numbers else ()


def oldest_ort(opset: int, ir_version: int) -> str | None:
    """The oldest ONNX Runtime release that runs a model of ``opset`` and ``ir_version``."""
    fits = [v for v, (max_opset, max_ir) in ORT_LIMITS.items() if opset <= max_opset and ir_version <= max_ir]
    return min(fits, key=release) if fits else None


def oldest_container(fits: Any) -> str | None:
    """The oldest Triton container from which every later one satisfies ``fits(ort, torch)``
    (a container whose versions no source confirmed is passed over, never counted as fitting)."""
    oldest = None
    for container in sorted(TRITON_CONTAINERS, key=release, reverse=True):
        ort, torch = TRITON_CONTAINERS[container]
        if not (ort and torch) and not fits(ort or "0", torch or "0"):
            continue  # unconfirmed, and not known to fit
        if not fits(ort, torch):
            break
        oldest = container
    return oldest


def onnx_container(opset: int, ir_version: int) -> str | None:
    """The oldest Triton container whose onnxruntime backend runs such an ONNX model."""
    ort = oldest_ort(opset, ir_version)
    return oldest_container(lambda o, _: bool(ort) and release(o) >= release(ort)) if ort else None


def torchscript_container() -> str | None:
    """The oldest Triton container whose pytorch backend loads the TorchScript artifact."""
    return oldest_container(lambda _, t: release(t) >= release(TORCHSCRIPT_MIN_TORCH))


def loads_in(fmt: str, info: dict[str, Any]) -> dict[str, Any]:
    """Where an artifact of ``fmt`` with facts ``info`` (what it carries, plus an ONNX model's
    ``ir_version`` / ``opset``) loads: the oldest runtime and Triton container, and what was verified."""
    wrote = info.get("producer", {}).get("torch", "")
    python_backend = "any, through sfdeploy's python-backend model <name> with this torch"
    if fmt == "onnx" and "opset" in info:
        ort = oldest_ort(int(info["opset"]), int(info["ir_version"]))
        container = onnx_container(int(info["opset"]), int(info["ir_version"]))
        return {"onnxruntime": f">= {ort}" if ort else "unknown (opset or IR version past the table)",
                "triton_container": f">= {container}, onnxruntime backend (<name>_onnx)" if container else "unknown",
                "verified_onnxruntime": list(ORT_VERIFIED)}
    if fmt == "torchscript":
        return {"torch": f">= {TORCHSCRIPT_MIN_TORCH}",
                "triton_container": f">= {torchscript_container()}, pytorch backend (<name>_torchscript)",
                "written_by_torch": wrote}
    if fmt == "torch_export":
        schema = info.get("schema_version", "?")
        return {"torch": f">= {wrote.split('+')[0] or 'the writer'} (ExportedProgram schema {schema}; older torch "
                         "is not promised)", "triton_container": python_backend}
    if fmt == "aoti":
        return {"torch": f"== {wrote} exactly (the build that compiled it)",
                "device": f"{info.get('compiled_for', '?')} ({info.get('target', '?')})",
                "triton_container": python_backend.replace("any,", "any on such a machine,")}
    return {}


def readme_table() -> str:
    """README's table: which NVIDIA Triton container loads which artifact, from the facts above."""
    rows = [
        ("artifact", "what loads it", "NVIDIA Triton container"),
        ("---", "---", "---"),
        (f"`model.onnx` (opset {ONNX_OPSET}, IR {ONNX_IR_VERSION})",
         f"ONNX Runtime >= {oldest_ort(ONNX_OPSET, ONNX_IR_VERSION)} (verified: {', '.join(ORT_VERIFIED)})",
         f"{onnx_container(ONNX_OPSET, ONNX_IR_VERSION)} and later: `<name>_onnx` (onnxruntime backend)"),
        ("`model.pt` (TorchScript)", f"torch >= {TORCHSCRIPT_MIN_TORCH}",
         f"{torchscript_container()} and later: `<name>_torchscript` (pytorch backend)"),
        ("`model.pt2` (torch.export)", "torch >= the torch that wrote it (recorded in manifest.json)",
         "any, in `<name>` (python backend) with sfdeploy and that torch"),
        ("`model.aoti.pt2` (AOTInductor)", "exactly the torch build, device kind and CPU ISA / GPU that compiled it",
         "any on such a machine, in `<name>` (python backend) with sfdeploy and that torch"),
    ]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"
