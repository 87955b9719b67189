"""Decoding routed per stream: CPU worker processes probe every video and decode those the plan
keeps on the CPU; the GPU decoder reads the others in this process, and their clips stay on the
GPU.

Why this split. The probe (the stream's header, with the pixel limit, and decord's frame count:
the index the sampled frames are taken from) runs where hostile input costs one worker, as on the
CPU path: a decompression bomb is refused there before any decoder, CPU or GPU, allocates a frame.
NVDEC decoding has to run in the process that holds the CUDA context the model uses (a clip made
in another process would cross back through the host, the round trip GPU decoding is there to
avoid), in a few threads (:data:`GPU_THREADS`: NVDEC sessions run concurrently, and the H200 has 7
engines). A stream the GPU decoder fails on goes back to a CPU worker with the reason; a video
the CPU decoder cannot read either is that video's error row. What a native crash inside the GPU
decoder would cost is this process (the rows written so far are kept: ``--resume``).

Every result says which decoder read the video and why (:class:`DecodedBy`): ``nvdec:<backend>``,
``decord`` or ``pyav``, and the rule of :mod:`sfdeploy.gpudecode.select` that chose it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sfdeploy.clipspec import ClipSpec
from sfdeploy.decode import MAX_VIDEO_PIXELS, DecodeError, open_video
from sfdeploy.gpudecode.select import DecodePlan, StreamInfo
from sfdeploy.preprocess import (DEFAULT_TIMEOUT_S, DecodeFailure, decode_failure, sample_indices, single_threaded,
                                 video_clip, worker_failure)
from sfdeploy.workers import IsolatedPool, WorkerFailure

#: GPU decoding threads in this process (NVDEC sessions at once)
GPU_THREADS = 8


@dataclass(frozen=True)
class DecodedBy:
    """Which decoder read a video (``nvdec:<backend>``, ``decord``, ``pyav``; ``""`` when none
    could) and why that one."""

    decoder: str
    reason: str


@dataclass(frozen=True)
class _ToGpu:
    """A stream a worker probed and the plan gives the GPU decoder: its header and sampled indices."""

    info: StreamInfo
    indices: tuple[int, ...]


Job = tuple[str | bytes, ClipSpec, int, DecodePlan | None, str]
Clip = Any  # numpy uint8 [V, T, H, W, 3], or the same as a torch tensor on the GPU


def _route_task(job: Job) -> tuple[np.ndarray | DecodeFailure | _ToGpu, DecodedBy]:
    """In a worker: probe the video; decode it here unless ``plan`` gives it to the GPU. A job
    without a plan is decoded here, for the reason it carries."""
    source, spec, max_pixels, plan, reason = job
    try:
        with open_video(source, max_pixels=max_pixels) as video:
            if plan is not None:
                info = StreamInfo.of(video, in_memory=not isinstance(source, str))
                on_gpu, reason = plan.route(info, max_pixels)
                if on_gpu:
                    indices = tuple(sample_indices(video.num_frames, spec).reshape(-1).tolist())
                    return _ToGpu(info, indices), DecodedBy(f"nvdec:{plan.backend}", reason)
            return video_clip(video, spec), DecodedBy(video.decoder, reason)
    except DecodeError as exc:
        return decode_failure(source, exc), DecodedBy("", reason)


def _route_failed(job: Job, failure: WorkerFailure) -> tuple[DecodeFailure, DecodedBy]:
    return worker_failure(job[0], failure), DecodedBy("", job[4])


class RoutedDecodePool:
    """The decoding of ``sfdeploy infer``: :meth:`decode` yields ``(index, clip or DecodeFailure,
    DecodedBy)`` per source as they complete (see the module docstring). With a plan that decodes
    on the CPU only, it is the CPU path of :class:`sfdeploy.preprocess.DecodePool` (same workers,
    same pixels), saying which CPU decoder read each video."""

    def __init__(self, spec: ClipSpec, plan: DecodePlan, *, workers: int | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, prefetch: int = 2, max_pixels: int = MAX_VIDEO_PIXELS,
                 gpu_threads: int = GPU_THREADS) -> None:
        self.spec, self.plan, self.max_pixels = spec, plan, max_pixels
        self.gpu_threads = gpu_threads
        self._pool = IsolatedPool(_route_task, workers=workers or max(1, os.cpu_count() or 1),
                                  on_failure=_route_failed, timeout_s=timeout_s, prefetch=prefetch,
                                  init=single_threaded)
        self._gpu: Any = None
        if plan.backend is not None:
            from sfdeploy.gpudecode.backends import GpuClipMaker

            self._gpu = GpuClipMaker(plan.backend, plan.device, spec)

    def decode(self, sources: Sequence[str | Path | bytes]) -> Iterator[tuple[int, Clip | DecodeFailure, DecodedBy]]:
        items = [bytes(s) if isinstance(s, (bytes, bytearray, memoryview)) else str(s) for s in sources]
        jobs: list[Job] = [(s, self.spec, self.max_pixels, self.plan, "") for s in items]
        retry: list[tuple[int, str]] = []  # (index, why the GPU decoder failed on it)
        if self._gpu is None:
            for index, (clip, how) in self._pool.imap(jobs):
                yield index, clip, how
            return
        pending: dict[Future, tuple[int, DecodedBy]] = {}
        with ThreadPoolExecutor(self.gpu_threads, thread_name_prefix="sfdeploy-nvdec") as threads:
            for index, (result, how) in self._pool.imap(jobs):
                if not isinstance(result, _ToGpu):
                    yield index, result, how
                    continue
                pending[threads.submit(self._gpu.clip, items[index], result.info, result.indices)] = (index, how)
                # Bounded: a slow GPU (or model) holds back the workers instead of piling up clips.
                yield from _finished(pending, retry, block=len(pending) >= 2 * self.gpu_threads)
            while pending:
                yield from _finished(pending, retry, block=True)
        if retry:  # the CPU decoder reads what the GPU decoder could not
            backend = self.plan.backend
            jobs = [(items[i], self.spec, self.max_pixels, None, f"{backend} failed on it ({why})") for i, why in retry]
            for k, (clip, how) in self._pool.imap(jobs):
                yield retry[k][0], clip, how

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> RoutedDecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _finished(pending: dict[Future, tuple[int, DecodedBy]], retry: list[tuple[int, str]], *, block: bool
              ) -> Iterator[tuple[int, Clip, DecodedBy]]:
    from sfdeploy.gpudecode.backends import GpuDecodeFailed

    done = wait(pending, return_when=FIRST_COMPLETED).done if block else [f for f in pending if f.done()]
    for future in done:
        index, how = pending.pop(future)
        try:
            yield index, future.result(), how
        except GpuDecodeFailed as exc:
            retry.append((index, str(exc)))


def decode_routed(sources: Sequence[str | Path | bytes], spec: ClipSpec, plan: DecodePlan, *,
                  workers: int | None = None, max_pixels: int = MAX_VIDEO_PIXELS
                  ) -> Iterator[tuple[int, Clip | DecodeFailure, DecodedBy]]:
    """One pass of a :class:`RoutedDecodePool` (what :func:`sfdeploy.preprocess.decode_many` is to
    the CPU path)."""
    with RoutedDecodePool(spec, plan, workers=workers, max_pixels=max_pixels) as pool:
        yield from pool.decode(sources)


def stack_clips(clips: Sequence[Clip]) -> Any:
    """A batch of clips: numpy when every clip is, else a torch tensor on the GPU the GPU-decoded
    clips are on (the CPU-decoded ones of the batch copied up to it)."""
    from sfdeploy.runtime import is_torch_tensor

    on_gpu = [c for c in clips if is_torch_tensor(c)]
    if not on_gpu:
        return np.stack(clips)
    import torch

    device = on_gpu[0].device
    return torch.stack([c if is_torch_tensor(c) else torch.from_numpy(c).to(device) for c in clips])
