"""``sfdeploy bench``: plan the rows of the asked stages, measure those the record lacks, one at a
time, each persisted the moment it is measured (see :mod:`sfdeploy.bench.record`).

The export, the served repository and the synthetic videos live in a work folder beside the
record (``<record>.work/``, or ``--export DIR`` for the export) and are kept: a resumed or later
stage reuses them. Every speed-up is a ratio against the MMAction2 baseline of the same record.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

from sfdeploy.bench import BACKENDS, DEFAULT_BACKENDS, DEFAULT_STAGES, STAGES
from sfdeploy.device import DEFAULT_DEVICE, Device
from sfdeploy.errors import InputError
from sfdeploy.precision import bench_precisions

log = logging.getLogger("sfdeploy")


@dataclass
class BenchOptions:
    """What ``sfdeploy bench`` measures, with its defaults (the command's options, for a library call)."""

    profile: str = "small"  # small: slowfast_tiny at 64 px; full: R50 4x16 at 224 px
    work_dir: Path | None = None  # benchmark a trained model instead
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    # default: fp32 and the device's native reduced precision (sfdeploy.precision.auto_precisions)
    precisions: tuple[str, ...] | None = None
    device: Device = Device(DEFAULT_DEVICE)
    concurrency: tuple[int, ...] = (1, 8)
    triton_batch: int = 8
    # the served model's instances (`repo --instances`; per GPU on a GPU): the GPU run measures 1, 2
    # and 4 at 8 in flight, one record each, to set `repo`'s default (benchmarks/gpu_check.sh)
    instances: int = 1
    warmup: int = 3
    iters: int = 10
    min_time_s: float = 1.0  # each row times calls for this long at least (fast calls: a stable figure)
    e2e_videos: int = 64
    videos: Path | None = None
    workers: int | None = None
    mmaction2_videos: int = 16
    trace: bool = False
    out: Path | None = None
    stages: tuple[str, ...] = DEFAULT_STAGES
    resume: bool = False
    export: Path | None = None  # the bench export to make or reuse [default: <out>.work/export]
    note: str = ""  # recorded with the run (e.g. "the 2 cores were shared with other jobs")
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.device = Device(self.device)  # a str given in Python is parsed here, once


def check_options(opts: BenchOptions, device: Device) -> tuple[str, ...]:
    """Refuse, before any work, what cannot run; returns the precisions to measure
    (:func:`sfdeploy.precision.bench_precisions`: bf16 on a CPU without AVX512-BF16 / AMX is refused
    with the reason)."""
    for name, given, known in (("backend", opts.backends, BACKENDS), ("stage", opts.stages, STAGES)):
        unknown = set(given) - set(known)
        if unknown:
            raise InputError(f"unknown {name}(s): {', '.join(sorted(unknown))}", fix=f"use: {', '.join(known)}")
    return bench_precisions(opts.precisions, device)


def default_out(device: Device) -> Path:
    """``benchmarks/results/<device>-<date>.json``."""
    from sfdeploy.bench.measure import device_info, device_slug

    return Path("benchmarks/results") / f"{device_slug(device_info(device))}.json"


def _settings(opts: BenchOptions, device: Device, precisions: tuple[str, ...]) -> dict[str, Any]:
    """The record's ``settings``: what a resumed run must match (normalised: sorted, deduplicated)."""
    return {
        "device": device, "warmup": opts.warmup, "iters": opts.iters, "min_time": opts.min_time_s,
        "batch_sizes": sorted(set(opts.batch_sizes)),
        "precisions": list(precisions), "backends": list(opts.backends), "concurrency": sorted(set(opts.concurrency)),
        "triton_batch": opts.triton_batch, "instances": opts.instances, "e2e_videos": opts.e2e_videos,
        "videos": str(opts.videos) if opts.videos else None, "workers": opts.workers,
        "mmaction2_videos": opts.mmaction2_videos, "trace": opts.trace,
    }


def _measure_stages(ctx: Any, record: Any, opts: BenchOptions, out: Path) -> list[Path]:
    """Measure, stage by stage, the rows the record lacks, each added (and the report remade) the
    moment it is measured; returns the report's files."""
    from sfdeploy.bench.load import LoadMeter
    from sfdeploy.bench.plan import PLANNERS
    from sfdeploy.bench.report import write_report
    from sfdeploy.progress import bar

    files = write_report(out)
    for stage in (s for s in STAGES if s in opts.stages):
        tasks = PLANNERS[stage](ctx)
        todo = [t for t in tasks if not record.done(t.key)]
        log.info("bench: stage %s: %d of %d rows recorded, %d to measure", stage, len(tasks) - len(todo),
                 len(tasks), len(todo))
        with bar(len(todo), desc=f"bench {stage}", unit="row", enabled=opts.show_progress and bool(todo)) as shown:
            for task in todo:
                shown.set_postfix_str(f"{task.backend} {task.precision} b{task.batch} c{task.concurrency}")
                with LoadMeter() as load:
                    row = task.measure(ctx)
                record.add({**row, **load.result()})
                if record.rows[-1]["busy"]:  # the report and the demo's summary say it too
                    log.info("bench: %s %s batch %d concurrency %d was measured while other work took %.2f "
                             "of %d cores: the figure is low", task.backend, task.precision, task.batch,
                             task.concurrency, record.rows[-1]["others_cores"], os.cpu_count() or 1)
                files = write_report(out)
                shown.update(1)
        ctx.release()
    return files


def run_bench(opts: BenchOptions) -> tuple[dict[str, Any], list[Path]]:
    """Measure the rows of ``opts.stages`` missing from the record; returns (record, [json, md, png])."""
    from sfdeploy.bench.load import measure_idle
    from sfdeploy.bench.measure import device_info
    from sfdeploy.bench.model import build_bench_model
    from sfdeploy.bench.record import Record
    from sfdeploy.bench.stages import Context
    from sfdeploy.compat import ensure_mmaction

    device = Device(opts.device).resolve()
    precisions = check_options(opts, device)
    if device.is_cuda:
        import torch

        # every row with the cuDNN algorithm choice the served runtime makes (benchmark mode: shapes
        # are fixed per row), whatever ran before in this process
        torch.backends.cudnn.benchmark = True
    out = Path(opts.out) if opts.out else default_out(device)
    work = out.with_suffix(".work")
    settings = _settings(opts, device, precisions)
    ensure_mmaction()
    model = build_bench_model(opts.profile, opts.work_dir)
    header = {"date": date.today().isoformat(), "profile": "trained" if opts.work_dir else opts.profile,
              "model": model.name, "clip_spec": model.spec.to_dict(), "device_info": device_info(device),
              # what is served: `sfdeploy repo`'s default, auto, chosen from the model rows (record["served_choice"])
              "settings": settings, "served": {"backend": "python", "runtime": "auto", "precision": "auto"},
              "note": opts.note, "load_at_start": measure_idle()}
    out.parent.mkdir(parents=True, exist_ok=True)
    record = Record.open(out, header, resume=opts.resume)
    # The planners read the normalised settings: what the record says is what is measured.
    plan_opts = replace(opts, batch_sizes=tuple(settings["batch_sizes"]), precisions=precisions,
                        concurrency=tuple(settings["concurrency"]))
    ctx = Context(plan_opts, model, device, work, Path(opts.export) if opts.export else work / "export", record)
    try:
        files = _measure_stages(ctx, record, opts, out)
    finally:
        ctx.close()
    return record.data, files
