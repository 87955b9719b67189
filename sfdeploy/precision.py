"""The precision vocabulary: which precisions exist, which artifact formats hold each, which a
device runs natively, and the words each command's precision option takes (all derived from
:data:`PRECISIONS` and :data:`AUTO`). The one place "fp16 on a GPU, bf16 on a CPU that has it",
and "fp16 on a GPU, fp32 on the CPU" where nothing was measured, are written.

Each command's option, and the set it takes:

* ``export --precisions``: ``auto`` or a comma-separated list of :data:`EXPORT_PRECISIONS`
  (:func:`precision_words`, then :func:`parse_precisions` for the device); ``export --fp16`` is
  the older spelling of adding :data:`FP16_FLAG` to that list.
* ``repo --precision``: one of :data:`SERVE_PRECISIONS` (``auto``: the measured choice,
  :mod:`sfdeploy.serving.choice`).
* ``infer`` / ``eval --precision``: one of :data:`RUN_PRECISIONS` (which artifact a local
  backend opens).
* ``bench --precision``: a comma-separated list of :data:`BENCH_PRECISIONS`
  (:func:`bench_precisions`; default :func:`auto_precisions` of the device).

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

from sfdeploy.device import Device
from sfdeploy.errors import EnvironmentProblem, InputError

#: every precision an artifact may compute in (what artifacts are named by)
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
#: the reduced precisions: judged by the parity gate's top-1 rule, not by the fp32 bound
REDUCED: tuple[str, ...] = ("fp16", "bf16")
#: the word that leaves the precision to sfdeploy (for the device, or by measurement)
AUTO = "auto"

#: ``export --precisions``: ``auto``, or a comma-separated list of these (fp32 is always written)
EXPORT_PRECISIONS: tuple[str, ...] = PRECISIONS
#: ``export --fp16``: the older spelling of adding this precision to ``--precisions``
FP16_FLAG = "fp16"
#: ``repo --precision``: ``auto`` (the measured choice, or the rule without one), or the artifact's
SERVE_PRECISIONS: tuple[str, ...] = (AUTO, *PRECISIONS)
#: ``infer`` / ``eval --precision``: which artifact of the export a local backend opens, by default
#: the portable fp32 one every export has
RUN_PRECISIONS: tuple[str, ...] = PRECISIONS
DEFAULT_RUN_PRECISION = "fp32"
#: ``bench --precision``: a comma-separated list of these (default: :func:`auto_precisions`)
BENCH_PRECISIONS: tuple[str, ...] = PRECISIONS

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
        """The facts as JSON (``doctor``, the manifest's ``host``)."""
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


def native_reduced(device: str | Device) -> str | None:
    """The reduced precision ``device`` (resolved: ``cpu`` / ``cuda[:N]``) runs natively and
    fast: fp16 on a GPU (tensor cores), bf16 on a CPU that has AVX512-BF16 or AMX, else none."""
    if Device(device).is_cuda:
        return NATIVE_REDUCED["gpu"]
    return NATIVE_REDUCED["cpu"] if cpu_bf16().supported else None


def auto_precisions(device: str | Device) -> tuple[str, ...]:
    """What ``export --precisions auto`` writes for ``device``: fp32 (the portable artifact every
    runtime loads) and the device's native reduced precision, if it has one."""
    reduced = native_reduced(device)
    return ("fp32", reduced) if reduced else ("fp32",)


def servable_by_auto(where: str | Device) -> tuple[str, ...]:
    """The precisions ``auto`` may serve on ``where`` (an instance kind, ``cpu`` / ``gpu``, or a
    device): fp32 and its native reduced precision (bf16 on a CPU is only chosen where it was
    measured, i.e. on a CPU that has it). fp16 on a CPU, or bf16 on a GPU, only when asked for by name."""
    return ("fp32", NATIVE_REDUCED[Device(where).instance_kind])


def unmeasured_preference(where: str | Device) -> tuple[str, ...]:
    """The precisions to serve on ``where`` (an instance kind or a device) when nothing was
    measured there, best first: fp16 then fp32 on a GPU (fp16 ran ~2x fp32 on an H200's tensor
    cores), fp32 alone on the CPU (bf16 only wins on a CPU that has it, which a measurement shows)."""
    return (NATIVE_REDUCED["gpu"], "fp32") if Device(where).is_cuda else ("fp32",)


def _words(value: str | tuple[str, ...] | list[str], *, lower: bool = True) -> tuple[str, ...]:
    words = (w.strip() for w in (value.split(",") if isinstance(value, str) else value))
    return tuple(w.lower() if lower else w for w in words if w)


def precision_words(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"auto"`` or ``"fp32,bf16"`` (or a sequence) as words, refused when unknown: the check of
    ``export --precisions`` (:data:`EXPORT_PRECISIONS`) that needs no device."""
    words = _words(value)
    unknown = [w for w in words if w not in EXPORT_PRECISIONS] if words != (AUTO,) else []
    if unknown or not words:
        raise InputError(f"unknown precision(s): {', '.join(unknown) or '(none)'}",
                         fix=f"use --precisions auto, or a comma-separated list of: {', '.join(EXPORT_PRECISIONS)}")
    return words


def bench_precisions(value: str | tuple[str, ...] | list[str] | None, device: str | Device) -> tuple[str, ...]:
    """``bench --precision``: a comma-separated list (or a sequence) of :data:`BENCH_PRECISIONS`,
    or nothing for :func:`auto_precisions` of ``device``; refused when unknown, or when ``device``
    would emulate one of them (bf16 on a CPU without AVX512-BF16 / AMX)."""
    precisions = _words(value, lower=False) if value else auto_precisions(device)
    unknown = set(precisions) - set(BENCH_PRECISIONS)
    if unknown:
        raise InputError(f"unknown precision(s): {', '.join(sorted(unknown))}",
                         fix=f"use: {', '.join(BENCH_PRECISIONS)}")
    for precision in precisions:
        check_runs(precision, device)
    return precisions


def parse_precisions(value: str | tuple[str, ...] | list[str], device: str | Device, *, fp16: bool = False
                     ) -> tuple[str, ...]:
    """``"auto"``, ``"fp32,bf16"`` (or a sequence) -> the precisions to export on ``device``, fp32
    first; refused when unknown, or when ``device`` cannot run one of them natively (bf16 on a CPU
    without it). fp32 is always included: the portable artifact, and the gate's own yardstick.
    ``fp16`` (``export --fp16``) adds :data:`FP16_FLAG`, whatever ``value`` says."""
    words = precision_words(value)
    extra = (FP16_FLAG,) if fp16 else ()
    if words == (AUTO,):
        return tuple(dict.fromkeys(auto_precisions(device) + extra))
    chosen = tuple(dict.fromkeys(["fp32", *words, *extra]))
    for precision in chosen:
        check_runs(precision, device)
    return chosen


def check_runs(precision: str, device: str | Device, *, path: object = None) -> None:
    """Refuse ``precision`` on ``device`` where it would be emulated (bf16 on a CPU without
    AVX512-BF16 / AMX), naming ``path`` (the artifact) when there is one."""
    if precision == "bf16" and not Device(device).is_cuda:
        support = cpu_bf16()
        if not support.supported:
            raise EnvironmentProblem(f"bf16 on the CPU needs AVX512-BF16 or AMX: {support.how}", path=path,
                                     fix="use fp32 here (export --precisions fp32; repo/infer --precision fp32), or "
                                         "make and serve the bf16 artifact on a CPU that has it (sfdeploy doctor "
                                         "says whether one does)")
