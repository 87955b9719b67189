"""``bench --stage distill``: the profile's preset (the teacher) beside its distillation student.

Both with :func:`sfdeploy.bench.model.randomise`'d weights (speed does not depend on what the
weights learnt), as the deployed module (uint8 clips in, one view), fp32, at each of
``--batch-sizes``: eager, and TorchScript (traced as ``sfdeploy export`` writes it, run as its
runtime runs it). Each row carries the model's GFLOP per clip (``mmengine.analysis``: fvcore's
counting, one multiply-add = one FLOP) and parameters, and a student row its speed over the
teacher's row of the same backend and batch (``x_teacher``); each teacher row is measured right
before its student row. Small profile: ``slowfast_tiny`` vs ``slowfast_tiny_student``; full:
``slowfast_r50_4x16`` vs ``slowfast_r18_4x16``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from sfdeploy.bench import suites
from sfdeploy.bench.context import Context
from sfdeploy.bench.model import PROFILES, preset_model
from sfdeploy.bench.rows import OK, SKIPPED
from sfdeploy.bench.stages import Task
from sfdeploy.train.options import STUDENT_PRESETS

STAGE = "distill"
PRECISION = "fp32"
VARIANTS = ("eager", "torchscript")
ROLES = ("teacher", "student")


def presets(profile: str) -> dict[str, str]:
    """The profile's teacher preset and its student preset."""
    teacher = PROFILES[profile][0]
    return {"teacher": teacher, "student": STUDENT_PRESETS[teacher]}


@functools.lru_cache(maxsize=4)
def model_facts(preset: str, classes: int) -> dict[str, float]:
    """GFLOP per clip (one view, the deployed module) and parameters in millions, counted once per preset."""
    from mmengine.analysis import FlopAnalyzer

    model = preset_model(preset, classes)
    module = suites.deploy_module(model, PRECISION, "cpu", suites.PLAIN)
    clip = torch.from_numpy(suites.random_clips(model.spec, 1))
    flops = FlopAnalyzer(module, (clip,))
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    return {"gflop_per_clip": round(flops.total() / 1e9, 4),
            "params_m": round(sum(p.numel() for p in model.recognizer.parameters()) / 1e6, 3)}


def _module(c: Context, preset: str, variant: str, batch: int) -> Any:
    """The deployed module of ``preset`` on the bench device: eager, or TorchScript as ``export`` traces
    it (its convolution flags baked) and the TorchScript runtime runs it (frozen and optimised on the CPU)."""
    from sfdeploy.export.torchscript import baked_conv_flags
    from sfdeploy.runtime.torchscript import optimize_for_cpu

    model = preset_model(preset, PROFILES[c.opts.profile][1])
    module = suites.deploy_module(model, PRECISION, c.device, suites.PLAIN)
    if variant == "torchscript":
        example = torch.from_numpy(suites.random_clips(model.spec, batch)).to(c.device)
        with torch.no_grad(), baked_conv_flags(PRECISION):
            module = torch.jit.trace(module, example, check_trace=False).eval()
        if not c.device.is_cuda:
            module = optimize_for_cpu(module)[0]
    return model.spec, module


def _teacher_clips_per_s(c: Context, variant: str, batch: int) -> float | None:
    rows = c.record.rows if c.record is not None else []
    return next((r["clips_per_s"] for r in rows if r["stage"] == STAGE and r["backend"] == f"teacher:{variant}"
                 and r["batch"] == batch and r.get("status", OK) == OK), None)


def _task(role: str, variant: str, batch: int) -> Task:
    backend = f"{role}:{variant}"

    def measure(c: Context) -> dict[str, Any]:
        if c.opts.work_dir is not None:
            return suites.unmeasured_row(STAGE, backend, PRECISION, batch, 1, SKIPPED,
                                         "the distill stage compares the profile's presets: run it without --work-dir")
        preset = presets(c.opts.profile)[role]
        # batch in the key: a traced module is specialised to its input shape
        spec, module = c.hold((STAGE, preset, variant, batch if variant == "torchscript" else 0),
                              lambda: _module(c, preset, variant, batch))
        frames = torch.from_numpy(suites.random_clips(spec, batch)).to(c.device)
        row = suites.sequential_row(STAGE, backend, PRECISION, batch, suites.module_call(module, frames), c.device,
                                    c.opts.warmup, c.opts.iters, min_time_s=c.opts.min_time_s,
                                    note=f"{preset}, random weights, deployed module (uint8 in, 1 view)")
        row.update(preset=preset, role=role, **model_facts(preset, PROFILES[c.opts.profile][1]))
        teacher = _teacher_clips_per_s(c, variant, batch) if role == "student" else None
        if teacher and row.get("status") == OK:
            row["x_teacher"] = round(row["clips_per_s"] / teacher, 2)
        return row
    return Task(STAGE, backend, PRECISION, batch, 1, measure)


def plan(c: Context) -> list[Task]:
    """Eager and TorchScript, fp32, every batch size: the teacher's row, then the student's beside it
    (back to back, so that both see the same background load on a shared machine)."""
    return [_task(role, variant, batch) for variant in VARIANTS for batch in c.opts.batch_sizes for role in ROLES]
