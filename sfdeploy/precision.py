"""The precision vocabulary: which precisions exist, which artifact formats hold each, and which a
device runs natively. The one place "fp16 on a GPU, bf16 on a CPU that has it" is written.

Why bf16 on the CPU: CPUs with AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake) or AMX
(Intel Sapphire Rapids and later) run bf16 convolutions in oneDNN at up to twice the fp32 rate
(R50 4x16 batch 1 on one Zen 4 core, frozen TorchScript: fp32 337 ms, bf16 212 ms). On a CPU
without either, torch *emulates* bf16 (converts to fp32 around every kernel): slower than fp32,
so sfdeploy refuses it there with the reason, at export and at load, instead of shipping a slow
artifact. fp16 on the CPU stays possible (it is what some users' GPUs will run), never automatic.

Light on purpose: the CLI's ``--help`` reads these names; torch is imported by the functions
that probe the machine.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sfdeploy.errors import EnvironmentProblem, InputError

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
#: the reduced precisions: judged by the parity gate's top-1 rule, not by the fp32 bound
REDUCED: tuple[str, ...] = ("fp16", "bf16")
AUTO = "auto"

#: (format, precision) pairs no artifact is written for, and why
UNSUPPORTED: dict[tuple[str, str], str] = {
    ("onnx", "bf16"): "ONNX Runtime has no bf16 3-D convolution kernels",
}


def supported(fmt: str, precision: str) -> bool:
    """Whether an artifact of format ``fmt`` can hold ``precision``."""
    return (fmt, precision) not in UNSUPPORTED


@dataclass(frozen=True)
class CpuBf16:
    """Whether this machine's CPU runs bf16 natively, and how (``AMX``, ``AVX512-BF16``), or why not."""

    supported: bool
    how: str

    def to_dict(self) -> dict[str, object]:
        return {"supported": self.supported, "how": self.how}


@functools.lru_cache(maxsize=1)
def cpu_bf16() -> CpuBf16:
    """This CPU's bf16 support, as torch's own dispatch sees it (the instructions oneDNN uses)."""
    import torch

    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return CpuBf16(True, "AMX")
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return CpuBf16(True, "AVX512-BF16")
    return CpuBf16(False, "this CPU has neither AVX512-BF16 nor AMX (torch would emulate bf16, slower than fp32)")


#: the reduced precision each instance kind runs natively: tensor cores' fp16 on a GPU, bf16 on a CPU
#: (one that has AVX512-BF16 or AMX, :func:`cpu_bf16`)
NATIVE_REDUCED = {"gpu": "fp16", "cpu": "bf16"}


def torch_dtype(precision: str) -> object:
    """The torch dtype a precision computes in."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def is_cuda(device: str) -> bool:
    """Whether a resolved device name (``cpu``, ``cuda``, ``cuda:N``) is a GPU."""
    return device.split(":")[0] == "cuda"


def native_reduced(device: str) -> str | None:
    """The reduced precision ``device`` (resolved: ``cpu`` / ``cuda[:N]``) runs natively and
    fast: fp16 on a GPU (tensor cores), bf16 on a CPU that has AVX512-BF16 or AMX, else none."""
    if is_cuda(device):
        return NATIVE_REDUCED["gpu"]
    return NATIVE_REDUCED["cpu"] if cpu_bf16().supported else None


def auto_precisions(device: str) -> tuple[str, ...]:
    """What ``export --precisions auto`` writes for ``device``: fp32 (the portable artifact every
    runtime loads) and the device's native reduced precision, if it has one."""
    reduced = native_reduced(device)
    return ("fp32", reduced) if reduced else ("fp32",)


def servable_by_auto(where: str) -> tuple[str, ...]:
    """The precisions ``auto`` may serve on ``where`` (an instance kind, ``cpu`` / ``gpu``, or a
    device): fp32 and its native reduced precision (bf16 on a CPU is only chosen where it was
    measured, i.e. on a CPU that has it). fp16 on a CPU, or bf16 on a GPU, only when asked for by name."""
    return ("fp32", NATIVE_REDUCED["gpu" if where == "gpu" or is_cuda(where) else "cpu"])


def precision_words(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"auto"`` or ``"fp32,bf16"`` (or a sequence) as words, refused when unknown: the check of
    ``export --precisions`` that needs no device."""
    words = tuple(w.strip().lower() for w in (value.split(",") if isinstance(value, str) else value) if w.strip())
    unknown = [w for w in words if w not in PRECISIONS] if words != (AUTO,) else []
    if unknown or not words:
        raise InputError(f"unknown precision(s): {', '.join(unknown) or '(none)'}",
                         fix=f"use --precisions auto, or a comma-separated list of: {', '.join(PRECISIONS)}")
    return words


def parse_precisions(value: str | tuple[str, ...] | list[str], device: str) -> tuple[str, ...]:
    """``"auto"``, ``"fp32,bf16"`` (or a sequence) -> the precisions to export on ``device``, fp32
    first; refused when unknown, or when ``device`` cannot run one of them natively (bf16 on a CPU
    without it). fp32 is always included: the portable artifact, and the gate's own yardstick."""
    words = precision_words(value)
    if words == (AUTO,):
        return auto_precisions(device)
    chosen = tuple(dict.fromkeys(["fp32", *words]))
    for precision in chosen:
        check_runs(precision, device)
    return chosen


def check_runs(precision: str, device: str, *, path: object = None) -> None:
    """Refuse ``precision`` on ``device`` where it would be emulated (bf16 on a CPU without
    AVX512-BF16 / AMX), naming ``path`` (the artifact) when there is one."""
    if precision == "bf16" and not is_cuda(device):
        support = cpu_bf16()
        if not support.supported:
            raise EnvironmentProblem(f"bf16 on the CPU needs AVX512-BF16 or AMX: {support.how}", path=path,
                                     fix="use fp32 here (export --precisions fp32; repo/infer --precision fp32), or "
                                         "make and serve the bf16 artifact on a CPU that has it (sfdeploy doctor "
                                         "says whether one does)")
