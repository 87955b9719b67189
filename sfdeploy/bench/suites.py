"""What ``sfdeploy bench`` measures.

Model-only (inputs already preprocessed, uint8 clips of the clip spec's shape):

* ``mmaction2`` - the recognizer's ``test_step`` on one clip at a time: what
  ``inference_recognizer`` runs after its pipeline, i.e. what users run today (the baseline);
* ``eager`` - the deploy module in PyTorch, batched (on CUDA also ``eager-channels-last``
  (channels_last_3d) and ``eager-compile`` (``torch.compile``, which captures CUDA graphs));
* ``torchscript``, ``onnxruntime`` - the exported artifacts;
* ``triton-http``, ``triton-grpc`` - the served model, with several requests in flight.

End-to-end: a folder of videos -> predictions through :mod:`sfdeploy.client`, beside the
decode-only ceiling (same decode workers, no model) and MMAction2's ``inference_recognizer``
one video at a time.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfdeploy.bench.measure import Timing, peak_memory_mb, reset_peak_memory, time_calls, time_concurrent
from sfdeploy.bench.model import BenchModel
from sfdeploy.clipspec import ClipSpec
from sfdeploy.export.deploy import SlowFastDeploy

log = logging.getLogger("sfdeploy")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Row:
    backend: str
    precision: str
    batch: int
    concurrency: int
    clips_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    peak_mem_mb: float
    note: str = ""

    @classmethod
    def of(cls, backend: str, precision: str, batch: int, concurrency: int, timing: Timing, memory: float,
           note: str = "") -> Row:
        return cls(backend, precision, batch, concurrency, round(timing.clips_per_s, 2), round(timing.p50_ms, 3),
                   round(timing.p95_ms, 3), round(timing.p99_ms, 3), round(memory, 1), note)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def random_clips(spec: ClipSpec, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *spec.input_shape), dtype=np.uint8)


def deploy_module(model: BenchModel, precision: str, device: str) -> SlowFastDeploy:
    dtype = DTYPES[precision]
    recognizer = copy.deepcopy(model.recognizer).to(device=device, dtype=dtype)
    return SlowFastDeploy(recognizer, model.spec.mean, model.spec.std, compute_dtype=dtype).eval().to(device)


def mmaction2_baseline(model: BenchModel, device: str, warmup: int, iters: int) -> Row:
    """One clip per call through the recognizer's own data preprocessor and predict path."""
    from mmaction.structures import ActionDataSample

    recognizer = copy.deepcopy(model.recognizer).to(device)
    clip = torch.from_numpy(random_clips(model.spec, 1)[0]).permute(0, 4, 1, 2, 3).contiguous()  # [V,3,T,H,W]
    data = {"inputs": [clip], "data_samples": [ActionDataSample()]}

    def call() -> None:
        with torch.no_grad():
            recognizer.test_step(data)

    reset_peak_memory(device)
    timing = time_calls(call, clips_per_call=1, warmup=warmup, iters=iters, device=device)
    return Row.of("mmaction2", "fp32", 1, 1, timing, peak_memory_mb(device), "test_step, as inference_recognizer")


def eager_rows(model: BenchModel, precisions: list[str], batches: list[int], device: str, warmup: int,
               iters: int) -> list[Row]:
    rows = []
    variants: list[tuple[str, Callable[[SlowFastDeploy], Callable]]] = [("eager", lambda m: m)]
    if device.startswith("cuda"):
        variants += [
            ("eager-channels-last", lambda m: m.to(memory_format=torch.channels_last_3d)),
            ("eager-compile", lambda m: torch.compile(m, mode="max-autotune")),
        ]
    for precision in precisions:
        for name, wrap in variants:
            module = wrap(deploy_module(model, precision, device))
            for batch in batches:
                frames = torch.from_numpy(random_clips(model.spec, batch)).to(device)

                def call(module: Callable = module, frames: torch.Tensor = frames) -> None:
                    with torch.inference_mode():
                        module(frames)

                rows.append(_timed_row(name, precision, batch, call, device, warmup, iters))
            del module
    return rows


def predictor_rows(name: str, open_predictor: Callable[[str], Any], spec: ClipSpec, precisions: list[str],
                   batches: list[int], device: str, warmup: int, iters: int) -> list[Row]:
    """Rows for a local predictor (``open_predictor(precision)`` -> object with ``predict``)."""
    rows = []
    for precision in precisions:
        predictor = open_predictor(precision)
        for batch in batches:
            frames = random_clips(spec, batch)
            rows.append(_timed_row(name, precision, batch, lambda p=predictor, f=frames: p.predict(f), device,
                                   warmup, iters))
        predictor.close()
    return rows


def triton_rows(url: str, protocol: str, model_name: str, spec: ClipSpec, precision: str, batch: int,
                concurrencies: list[int], warmup: int, iters: int) -> list[Row]:
    from sfdeploy.runtime.triton import TritonPredictor

    predictor = TritonPredictor(url, model=model_name, protocol=protocol)
    frames = random_clips(spec, batch)
    rows = []
    try:
        for concurrency in concurrencies:
            timing = time_concurrent(lambda: predictor.predict(frames), clips_per_call=batch,
                                     concurrency=concurrency, warmup=warmup, iters=iters)
            rows.append(Row.of(f"triton-{protocol}", precision, batch, concurrency, timing, 0.0,
                               "server process memory not counted"))
    finally:
        predictor.close()
    return rows


def _timed_row(name: str, precision: str, batch: int, call: Callable[[], object], device: str, warmup: int,
               iters: int) -> Row:
    reset_peak_memory(device)
    try:
        timing = time_calls(call, clips_per_call=batch, warmup=warmup, iters=iters, device=device)
    except (RuntimeError, MemoryError) as exc:  # e.g. CUDA out of memory at a large batch: recorded
        log.warning("%s %s batch %d failed: %s", name, precision, batch, exc)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return Row(name, precision, batch, 1, 0.0, 0.0, 0.0, 0.0, 0.0, f"failed: {str(exc)[:120]}")
    return Row.of(name, precision, batch, 1, timing, peak_memory_mb(device))


@dataclass
class EndToEnd:
    videos: int
    workers: int
    backend: str
    batch: int
    concurrency: int
    decode_only_videos_per_s: float
    sfdeploy_videos_per_s: float
    efficiency: float  # sfdeploy / decode-only
    mmaction2_videos: int
    mmaction2_videos_per_s: float
    speedup_vs_mmaction2: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def end_to_end(model: BenchModel, paths: list[Path], classifier: Any, *, workers: int, batch: int,
               concurrency: int, mmaction2_videos: int, device: str) -> EndToEnd:
    from sfdeploy.preprocess import DecodeFailure, decode_many

    spec = model.spec
    start = time.perf_counter()
    decoded = sum(not isinstance(clip, DecodeFailure) for _, clip in decode_many(paths, spec, workers=workers))
    decode_rate = decoded / (time.perf_counter() - start)

    start = time.perf_counter()
    classified = sum(p.ok for p in classifier.classify(paths, batch_size=batch, concurrency=concurrency,
                                                       workers=workers))
    e2e_rate = classified / (time.perf_counter() - start)

    from mmaction.apis import inference_recognizer

    recognizer = copy.deepcopy(model.recognizer).to(device)
    recognizer.cfg = copy.deepcopy(model.cfg)
    recognizer.cfg.test_pipeline = spec.mmaction_pipeline()
    subset = paths[:mmaction2_videos]
    inference_recognizer(recognizer, str(subset[0]))  # warm-up
    start = time.perf_counter()
    for path in subset:
        inference_recognizer(recognizer, str(path))
    mm_rate = len(subset) / (time.perf_counter() - start)
    return EndToEnd(videos=len(paths), workers=workers, backend=classifier.predictor.name, batch=batch,
                    concurrency=concurrency, decode_only_videos_per_s=round(decode_rate, 2),
                    sfdeploy_videos_per_s=round(e2e_rate, 2), efficiency=round(e2e_rate / decode_rate, 3),
                    mmaction2_videos=len(subset), mmaction2_videos_per_s=round(mm_rate, 2),
                    speedup_vs_mmaction2=round(e2e_rate / mm_rate, 2))


def profile_ops(module: Callable, frames: torch.Tensor, device: str, top: int = 12) -> list[dict[str, Any]]:
    """Where the time goes: the top operators by self time (CUDA time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch.inference_mode():
        for _ in range(3):
            module(frames)
        with profile(activities=activities) as prof:
            for _ in range(5):
                module(frames)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    total = sum(getattr(e, key, 0) for e in events) or 1
    return [{"op": e.key, "self_ms_per_call": round(getattr(e, key, 0) / 1000 / 5, 3),
             "share": round(getattr(e, key, 0) / total, 3), "calls": e.count} for e in events[:top]]
