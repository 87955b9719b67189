"""Timing, memory and machine facts for benchmarks.

Every measurement warms up first (JIT, cuDNN autotuning, allocator growth, lazy session init),
then times ``iters`` calls, and more until ``min_time_s`` has passed (a row of fast calls is then
not a handful of milliseconds that one scheduler hiccup decides); throughput is clips over wall
time, latency percentiles are per call.
GPU work is synchronised before each clock read, so a call's time includes its kernels.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import re
import resource
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

import numpy as np

from sfdeploy.device import Device


@dataclass
class Timing:
    """What timing a function found: calls, clips, wall time and the latency percentiles of one call."""

    calls: int
    clips: int
    wall_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float

    @property
    def clips_per_s(self) -> float:
        """Throughput over the timed wall time (0 when nothing was timed)."""
        return self.clips / self.wall_s if self.wall_s else 0.0


def _sync(device: str) -> None:
    if Device(device).is_cuda:
        import torch

        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], *, clips_per_call: int, warmup: int, iters: int,
               device: str = "cpu", min_time_s: float = 0.0) -> Timing:
    """Time at least ``iters`` sequential calls of ``fn``, and for at least ``min_time_s``, after
    ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    latencies: list[float] = []
    start = time.perf_counter()
    while len(latencies) < iters or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    return _timing(latencies, len(latencies) * clips_per_call, wall)


def time_concurrent(fn: Callable[[], object], *, clips_per_call: int, concurrency: int, warmup: int,
                    iters: int, min_time_s: float = 0.0) -> Timing:
    """``concurrency`` threads each make ``iters`` calls (and go on until ``min_time_s`` has
    passed); requests overlap, as clients of a server do. ``warmup`` calls first, then one untimed
    call in each thread (its own connection, for a client that keeps one per thread), then all
    threads start together. Latency is per request, throughput over the whole run."""
    for _ in range(warmup):
        fn()
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    ready = threading.Barrier(concurrency + 1)

    def client() -> None:
        mine = []
        try:
            fn()
        except BaseException as exc:  # re-raised in the caller's thread below
            errors.append(exc)
        ready.wait()
        begun = time.perf_counter()
        try:
            while not errors and (len(mine) < iters or time.perf_counter() - begun < min_time_s):
                t0 = time.perf_counter()
                fn()
                mine.append(time.perf_counter() - t0)
        except BaseException as exc:  # re-raised in the caller's thread below
            errors.append(exc)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return _timing(latencies, len(latencies) * clips_per_call, wall)


def _timing(latencies: list[float], clips: int, wall: float) -> Timing:
    ms = np.array(latencies) * 1000.0
    return Timing(calls=len(latencies), clips=clips, wall_s=wall, p50_ms=float(np.percentile(ms, 50)),
                  p95_ms=float(np.percentile(ms, 95)), p99_ms=float(np.percentile(ms, 99)))


def peak_memory_mb(device: str) -> float:
    """GPU: peak bytes allocated by torch since the last reset; CPU: the process's peak RSS."""
    if Device(device).is_cuda:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory(device: str) -> None:
    """Start :func:`peak_memory_mb`'s count afresh on a GPU (the CPU's peak RSS cannot be reset)."""
    if Device(device).is_cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def device_info(device: str) -> dict:
    """Machine, device, driver and package versions: what a number needs to be comparable."""
    import torch

    info: dict = {
        "device": device,
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        # other work on the machine when the record was started (a shared machine's numbers are noisy)
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "packages": {},
    }
    for dist in ("torch", "onnxruntime", "onnxruntime-gpu", "mmaction2", "mmengine", "tritonclient",
                 "nvidia-pytriton", "numpy", "decord", "av", "pynvvideocodec", "torchcodec", "sfdeploy"):
        try:
            info["packages"][dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    if Device(device).is_cuda:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            info["driver"], info["gpu_memory"] = [part.strip() for part in out.split(",")][:2]
        except (OSError, ValueError, subprocess.TimeoutExpired):
            info["driver"] = "unknown"
    return info


def device_slug(info: dict) -> str:
    """``<device>-<date>``, used to name result files: e.g. nvidia-h100-80gb-hbm3-2026-11-24."""
    name = info.get("gpu") if Device(info["device"]).is_cuda else f"cpu-{info['cpu_cores']}c-{info['cpu']}"
    slug = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")
    slug = re.sub(r"-(r|tm|cpu)-", "-", slug)[:60].strip("-")
    return f"{slug}-{date.today().isoformat()}"
