"""How ``sfdeploy bench`` measures one row; :mod:`sfdeploy.bench.stages` decides which rows.

Model-only rows (inputs already preprocessed: uint8 clips of the clip spec's shape) are timed
with :func:`sfdeploy.bench.measure.time_calls` (one caller) or
:func:`sfdeploy.bench.measure.time_concurrent` (N callers, N requests in flight): the served model
and its in-process reference are timed by the same function at the same batch and concurrency,
so their ratio compares like with like. End-to-end rows time videos -> predictions.

Each function returns the row as a dict (the record's format): the key fields of
:data:`sfdeploy.bench.record.ROW_KEY`, ``kind`` (``clips``, ``videos`` or ``ops``: how the report
shows it), ``status`` and the measurements.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfdeploy.bench.measure import Timing, peak_memory_mb, reset_peak_memory, time_calls, time_concurrent
from sfdeploy.bench.model import BenchModel
from sfdeploy.bench.rows import FAILED, OK
from sfdeploy.clipspec import ClipSpec
from sfdeploy.device import Device
from sfdeploy.export.deploy import SlowFastDeploy
from sfdeploy.precision import torch_dtype

log = logging.getLogger("sfdeploy")

def clips_row(stage: str, backend: str, precision: str, batch: int, concurrency: int, timing: Timing,
              memory: float, note: str = "") -> dict[str, Any]:
    """A measured clips row: throughput, latency percentiles and peak memory (the record's columns)."""
    return {"stage": stage, "backend": backend, "precision": precision, "batch": batch,
            "concurrency": concurrency, "kind": "clips", "status": OK, "calls": timing.calls,
            "clips_per_s": round(timing.clips_per_s, 2), "p50_ms": round(timing.p50_ms, 3),
            "p95_ms": round(timing.p95_ms, 3), "p99_ms": round(timing.p99_ms, 3),
            "peak_mem_mb": round(memory, 1), "note": note}


def unmeasured_row(stage: str, backend: str, precision: str, batch: int, concurrency: int, status: str,
                   why: str, kind: str = "clips") -> dict[str, Any]:
    """A row that could not be measured (status failed / skipped): recorded, and tried again on resume."""
    return {"stage": stage, "backend": backend, "precision": precision, "batch": batch,
            "concurrency": concurrency, "kind": kind, "status": status, "note": why}


def random_clips(spec: ClipSpec, n: int, seed: int = 0) -> np.ndarray:
    """``n`` uint8 clips of ``spec``'s input shape, the same for a seed: timing needs no real video."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, *spec.input_shape), dtype=np.uint8)


#: the graph rewrites a bench variant is made with: "auto" = what `sfdeploy export` does by
#: default on the device (sfdeploy.export.rewrites.Rewrites.for_device), "none" = the plain graph
PLAIN, REWRITTEN = "none", "auto"


def deploy_module(model: BenchModel, precision: str, device: Device, rewrites: str = PLAIN) -> SlowFastDeploy:
    """The deployed module in eager mode on ``device``: what the eager rows time (plain, or rewritten
    as the export would be for the device)."""
    from sfdeploy.export.deploy import deploy_module as make
    from sfdeploy.export.run import resolve_rewrites

    module, _ = make(model.recognizer, model.spec.mean, model.spec.std, torch_dtype(precision), device,
                     resolve_rewrites(rewrites, device))
    return module


def concurrent_calls(iters: int, concurrency: int) -> int:
    """Timed calls per client thread: ``iters`` calls in all, split among the threads, and at least
    3 each so that the ramp-up and drain at the ends weigh little. (``iters`` per thread would make
    concurrency 32 at batch 32 move ~120 GB through the server for one row of the full profile.)"""
    return max(3, math.ceil(iters / concurrency))


def sequential_row(stage: str, backend: str, precision: str, batch: int, call: Callable[[], object], device: str,
                   warmup: int, iters: int, note: str = "", min_time_s: float = 0.0) -> dict[str, Any]:
    """One caller, at least ``iters`` timed calls and ``min_time_s`` seconds."""
    return _timed(stage, backend, precision, batch, 1, device, note, lambda: time_calls(
        call, clips_per_call=batch, warmup=warmup, iters=iters, device=device, min_time_s=min_time_s))


def concurrent_row(stage: str, backend: str, precision: str, batch: int, concurrency: int,
                   call: Callable[[], object], device: str, warmup: int, iters: int, note: str = "",
                   min_time_s: float = 0.0) -> dict[str, Any]:
    """``concurrency`` threads calling at once (see :func:`concurrent_calls`), for ``min_time_s`` at least."""
    return _timed(stage, backend, precision, batch, concurrency, device, note, lambda: time_concurrent(
        call, clips_per_call=batch, concurrency=concurrency, warmup=warmup,
        iters=concurrent_calls(iters, concurrency), min_time_s=min_time_s))


def _timed(stage: str, backend: str, precision: str, batch: int, concurrency: int, device: str, note: str,
           measure: Callable[[], Timing]) -> dict[str, Any]:
    """A runtime failure of the model (CUDA out of memory at a large batch, an operator the backend
    lacks) is recorded as a failed row, not raised: the other rows still run, and a resumed run
    tries this one again. Anything else (a server that is down, bad input) is raised."""
    reset_peak_memory(device)
    try:
        timing = measure()
    except (RuntimeError, MemoryError) as exc:
        log.warning("%s %s batch %d concurrency %d failed: %s", backend, precision, batch, concurrency, exc)
        if Device(device).is_cuda:
            torch.cuda.empty_cache()
        return unmeasured_row(stage, backend, precision, batch, concurrency, FAILED, f"failed: {str(exc)[:160]}")
    memory = 0.0 if backend.startswith("triton") else peak_memory_mb(device)
    return clips_row(stage, backend, precision, batch, concurrency, timing, memory, note)


def mmaction2_call(model: BenchModel, device: str) -> Callable[[], None]:
    """One clip per call through the recognizer's own data preprocessor and predict path: what
    ``inference_recognizer`` runs after its pipeline, i.e. what users run today (the baseline)."""
    from mmaction.structures import ActionDataSample

    recognizer = copy.deepcopy(model.recognizer).to(device)
    clip = torch.from_numpy(random_clips(model.spec, 1)[0]).permute(0, 4, 1, 2, 3).contiguous()  # [V,3,T,H,W]
    data = {"inputs": [clip], "data_samples": [ActionDataSample()]}

    def call() -> None:
        with torch.no_grad():
            recognizer.test_step(data)

    return call


def module_call(module: Callable, frames: torch.Tensor) -> Callable[[], None]:
    """One timed call of ``module`` on ``frames`` (inference mode: no autograd bookkeeping timed)."""
    def call() -> None:
        with torch.inference_mode():
            module(frames)

    return call


def variant_module(module: SlowFastDeploy, variant: str) -> Callable:
    """Variants of the eager module that sfdeploy does not serve (listed apart from the served
    configuration). The compiled ones take minutes per shape on R50: only in the ``compile`` stage."""
    if variant in ("eager", "eager-rewrites"):  # the rewrites are made by deploy_module
        return module
    if variant == "eager-compile":
        return torch.compile(module, dynamic=False)
    if variant == "eager-cudagraphs":  # inductor + CUDA graphs: launch overhead gone, for small batches
        return torch.compile(module, mode="reduce-overhead", dynamic=False)
    raise ValueError(f"unknown variant {variant}")


def decode_only_row(spec: ClipSpec, paths: list[Path], workers: int) -> dict[str, Any]:
    """The ceiling of end to end: the same decode workers with no model at all."""
    from sfdeploy.decode.clips import DecodeFailure
    from sfdeploy.decode.pool import decode_many

    start = time.perf_counter()
    decoded = sum(not isinstance(clip, DecodeFailure) for _, clip, _ in decode_many(paths, spec, workers=workers))
    return videos_row("decode-only", "-", 1, 1, decoded, time.perf_counter() - start, len(paths), workers,
                      f"{workers} decode workers, no model")


def gpu_decode_only_row(name: str, spec: ClipSpec, paths: list[Path], plan: Any, workers: int) -> dict[str, Any]:
    """The ceiling of end to end with GPU decoding: the routed decoding of ``sfdeploy infer`` (CPU
    workers probe, NVDEC decodes, the clips stay on the GPU) with no model. CUDA and the decoder are
    started by an untimed first video; the workers start in the timed window, as in decode-only."""
    from collections import Counter

    from sfdeploy.decode.clips import DecodeFailure
    from sfdeploy.decode.gpu.route import GPU_THREADS
    from sfdeploy.decode.pool import decode_many

    list(decode_many(paths[:1], spec, plan=plan, workers=1))  # CUDA context, NVDEC session, torch kernels
    by: Counter[str] = Counter()
    start = time.perf_counter()
    for _, clip, how in decode_many(paths, spec, plan=plan, workers=workers):
        if not isinstance(clip, DecodeFailure):
            by[how.decoder] += 1
    torch.cuda.synchronize()
    row = videos_row(name, "-", 1, 1, sum(by.values()), time.perf_counter() - start, len(paths), workers,
                     f"{plan.why}: {GPU_THREADS} NVDEC threads, {workers} workers probing; no model; decoded by "
                     + ", ".join(f"{k} {v}" for k, v in sorted(by.items())))
    return {**row, "decoded_by": dict(by)}


def sfdeploy_row(backend: str, classifier: Any, precision: str, paths: list[Path], *, workers: int, batch: int,
                 concurrency: int, decode: str = "cpu") -> dict[str, Any]:
    """:meth:`sfdeploy.client.Classifier.classify`: decode workers feeding batched requests
    (``decode``: where, as ``infer --decode``; each row says how many videos each decoder read)."""
    from collections import Counter

    start = time.perf_counter()
    by: Counter[str] = Counter()
    for p in classifier.classify(paths, batch_size=batch, concurrency=concurrency, workers=workers, decode=decode):
        by[p.decoder or ""] += p.ok
    row = videos_row(backend, precision, batch, concurrency,
                     sum(by.values()), time.perf_counter() - start, len(paths), workers,
                     f"{workers} decode workers, batch {batch}, {concurrency} requests in flight")
    return {**row, "decoded_by": {k: v for k, v in sorted(by.items()) if k}} if decode != "cpu" else row


def mmaction2_videos_row(model: BenchModel, paths: list[Path], device: str) -> dict[str, Any]:
    """MMAction2's ``inference_recognizer``, one video at a time (its pipeline decodes too)."""
    from mmaction.apis import inference_recognizer

    recognizer = copy.deepcopy(model.recognizer).to(device)
    recognizer.cfg = copy.deepcopy(model.cfg)
    recognizer.cfg.test_pipeline = model.spec.mmaction_pipeline()
    inference_recognizer(recognizer, str(paths[0]))  # warm-up
    start = time.perf_counter()
    for path in paths:
        inference_recognizer(recognizer, str(path))
    return videos_row("mmaction2:inference_recognizer", "fp32", 1, 1, len(paths), time.perf_counter() - start,
                      len(paths), 1, "one video at a time")


def videos_row(backend: str, precision: str, batch: int, concurrency: int, done: int, wall: float, videos: int,
               workers: int, note: str) -> dict[str, Any]:
    """An end-to-end row: videos per second through decoding and the model (failed if any video failed)."""
    return {"stage": "e2e", "backend": backend, "precision": precision, "batch": batch, "concurrency": concurrency,
            "kind": "videos", "status": OK if done == videos else FAILED, "videos": videos, "ok_videos": done,
            "workers": workers, "wall_s": round(wall, 3), "videos_per_s": round(done / wall, 2), "note": note}


def profile_row(module: Callable, frames: torch.Tensor, precision: str, device: str, top: int = 12) -> dict[str, Any]:
    """Where the time goes: the top operators by self time (CUDA time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = Device(device).is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with torch.inference_mode():
        for _ in range(3):
            module(frames)
        with profile(activities=activities) as prof:
            for _ in range(5):
                module(frames)
            if on_gpu:
                torch.cuda.synchronize()
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    total = sum(getattr(e, key, 0) for e in events) or 1
    ops = [{"op": e.key, "self_ms_per_call": round(getattr(e, key, 0) / 1000 / 5, 3),
            "share": round(getattr(e, key, 0) / total, 3), "calls": e.count} for e in events[:top]]
    return {"stage": "model", "backend": "eager-profile", "precision": precision, "batch": int(frames.shape[0]),
            "concurrency": 1, "kind": "ops", "status": OK, "ops": ops, "note": "torch.profiler, 5 calls"}



_SERVER_PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


def server_stats_delta(before: dict[str, Any], after: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """Where a served row's requests spent their time, by Triton's own statistics extension
    (``/v2/models/<name>/stats``, cumulative: the difference over the row's window, warm-up
    included): requests, model executions (batches), mean ms per request in each phase, and the
    server-side throughput (inferences over the window's wall time)."""
    def number(stats: dict[str, Any], *path: str) -> int:
        value: Any = stats
        for key in path:
            value = value.get(key, {}) if isinstance(value, dict) else {}
        return int(value) if isinstance(value, (int, str)) and str(value).isdigit() else 0

    requests = number(after, "inference_stats", "success", "count") - number(before, "inference_stats", "success",
                                                                            "count")
    out: dict[str, Any] = {
        "requests": requests,
        "inferences": number(after, "inference_count") - number(before, "inference_count"),
        "executions": number(after, "execution_count") - number(before, "execution_count"),
        "window_s": round(wall_s, 3),
    }
    for phase in ("success", *_SERVER_PHASES):
        ns = number(after, "inference_stats", phase, "ns") - number(before, "inference_stats", phase, "ns")
        out[f"{'request' if phase == 'success' else phase}_ms"] = round(ns / 1e6 / requests, 3) if requests else None
    out["server_clips_per_s"] = round(out["inferences"] / wall_s, 2) if wall_s > 0 else None
    return out
