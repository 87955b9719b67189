"""The one decode pool: every caller decodes in these isolated worker processes
(:mod:`sfdeploy.workers`), and GPU decoding joins in only when a plan routes streams to it.

Callers: ``eval`` and ``bench`` (:func:`decode_many`), ``infer`` on one machine (with the run's
:class:`~sfdeploy.decode.gpu.select.DecodePlan`) and in Ray tasks (``--engine ray``, one worker
per task), and a Triton ``<name>_video`` instance, request after request, without starting an
interpreter per request (:class:`DecodePool`, kept between calls). All get the same results:
``(index, clip or DecodeFailure, DecodedBy)`` per source, as they complete; a caller that does not
report the decoder ignores the third item.

A video that crashes or hangs the decoder costs its own result and its worker (replaced), never
the caller's process; one with frames of more than ``max_pixels`` is refused before decoding
them, in its header or at the first such frame (:mod:`sfdeploy.decode.video`); a failure's
``path`` is the path, or ``<N bytes of an encoded video>``.

Without a plan, or with one whose decoder is the CPU's (its ``why`` is every row's reason), a
worker opens and decodes each video, and nothing of :mod:`sfdeploy.decode.gpu` is imported or run.
With a GPU decoder in the plan, the worker also checks the stream against the plan's rules and
hands the streams NVDEC takes back to this process, where :mod:`sfdeploy.decode.gpu.route`
decodes them on the GPU (that module says why the work is split so).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfdeploy.clipspec import ClipSpec
from sfdeploy.decode.clips import DecodedBy, DecodeFailure, decode_failure, video_clip, worker_failure
from sfdeploy.decode.video import MAX_VIDEO_PIXELS, DecodeError, open_video
from sfdeploy.workers import IsolatedPool, WorkerFailure

if TYPE_CHECKING:
    from sfdeploy.decode.gpu.select import DecodePlan

DEFAULT_TIMEOUT_S = 300.0  # a video that takes longer to decode fails (its worker is replaced)

#: a clip: numpy uint8 ``[V, T, H, W, 3]``, or the same as a torch tensor on the GPU (GPU-decoded)
Clip = Any
#: (source, spec, max_pixels, the plan when it has a GPU decoder, the reason a CPU decode is given)
Job = tuple[str | bytes | memoryview, ClipSpec, int, "DecodePlan | None", str]
Decoded = tuple[int, Clip | DecodeFailure, DecodedBy]


def _decode_task(job: Job) -> tuple[Any, DecodedBy]:
    """In a worker: decode one video here, unless the job's plan gives its stream to the GPU
    decoder (then what that needs to read it, :class:`~sfdeploy.decode.gpu.route.ToGpu`). A video
    that cannot be decoded is its failure row; the others go on."""
    source, spec, max_pixels, plan, reason = job
    try:
        with open_video(source, max_pixels=max_pixels) as video:
            if plan is not None:
                from sfdeploy.decode.gpu.route import route_stream

                to_gpu, reason = route_stream(video, spec, plan, max_pixels)
                if to_gpu is not None:
                    return to_gpu, DecodedBy(f"nvdec:{plan.backend}", reason)
            return video_clip(video, spec), DecodedBy(video.decoder, reason)
    except DecodeError as exc:  # this input's row says why; the others go on
        return decode_failure(source, exc), DecodedBy("", reason)


def _decode_failed(job: Job, failure: WorkerFailure) -> tuple[DecodeFailure, DecodedBy]:
    """The row of a video whose worker crashed or hung on it."""
    return worker_failure(job[0], failure), DecodedBy("", job[4])


def _wire(source: str | bytes) -> str | memoryview:
    """How a source travels to a worker: the bytes of a video as a view, which the worker pipe sends
    out of band, without the copy pickle makes of ``bytes`` (:mod:`sfdeploy.worker_protocol`)."""
    return memoryview(source) if isinstance(source, bytes) else source


def single_threaded() -> None:
    """Worker start-up: OpenCV on one thread, since the worker processes are the parallelism."""
    import cv2

    cv2.setNumThreads(1)


class DecodePool:
    """Decode worker processes kept between calls (see the module docstring): :meth:`decode`
    yields ``(index, clip or DecodeFailure, DecodedBy)`` per source. ``plan`` (``infer``'s
    :func:`~sfdeploy.decode.gpu.select.plan_decoding`) routes streams to a GPU decoder in this
    process, with ``gpu_threads`` NVDEC sessions at once; without one, the CPU decodes everything."""

    def __init__(self, spec: ClipSpec, *, plan: DecodePlan | None = None, workers: int | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, prefetch: int = 2, max_pixels: int = MAX_VIDEO_PIXELS,
                 gpu_threads: int | None = None) -> None:
        self.spec, self.plan, self.max_pixels = spec, plan, max_pixels
        self._pool = IsolatedPool(_decode_task, workers=workers or max(1, os.cpu_count() or 1),
                                  on_failure=_decode_failed, timeout_s=timeout_s, prefetch=prefetch,
                                  init=single_threaded)
        # A plan without a GPU decoder routes nothing: its reason goes in every row, and the
        # workers get no plan (no GPU code runs on a CPU-only run).
        self._gpu_plan = plan if plan is not None and plan.backend is not None else None
        self._reason = plan.why if plan is not None and self._gpu_plan is None else ""
        self._gpu: Any = None
        if self._gpu_plan is not None:
            from sfdeploy.decode.gpu.route import GpuRouter

            self._gpu = GpuRouter(self._gpu_plan, spec, gpu_threads, max_pixels)

    def warm(self) -> None:
        """Start the workers now (imports done before the first video arrives)."""
        self._pool.warm()

    def decode(self, sources: Sequence[str | Path | bytes], *, cpu_because: str | None = None) -> Iterator[Decoded]:
        """``(index, clip or DecodeFailure, DecodedBy)`` for each source (a path or the bytes of an
        encoded file), as they complete. ``cpu_because``: this call decodes on the CPU whatever the
        plan, for that reason (a served request that asks for it)."""
        # bytes (numpy's bytes_ from a Triton BYTES tensor too) as they are: a copy of an upload costs its size again
        items = [s if isinstance(s, bytes) else bytes(s) if isinstance(s, (bytearray, memoryview)) else str(s)
                 for s in sources]
        plan, reason = (None, cpu_because) if cpu_because is not None else (self._gpu_plan, self._reason)
        jobs: list[Job] = [(_wire(s), self.spec, self.max_pixels, plan, reason) for s in items]
        results = ((index, result, how) for index, (result, how) in self._pool.imap(jobs))
        if self._gpu is None or plan is None:
            yield from results
            return
        retry = yield from self._gpu.read(items, results)  # [(index, why the GPU decoder failed on it)]
        if retry:  # the CPU decoder reads what the GPU decoder could not
            backend = self._gpu_plan.backend
            jobs = [(_wire(items[i]), self.spec, self.max_pixels, None, f"{backend} failed on it ({why})")
                    for i, why in retry]
            for k, (clip, how) in self._pool.imap(jobs):
                yield retry[k][0], clip, how

    def close(self) -> None:
        """Stop the workers (a server's instance does on unload; :func:`decode_many` when done)."""
        self._pool.close()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decode_many(sources: Sequence[str | Path | bytes], spec: ClipSpec, *, plan: DecodePlan | None = None,
                workers: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, prefetch: int = 2,
                max_pixels: int = MAX_VIDEO_PIXELS) -> Iterator[Decoded]:
    """One pass of a :class:`DecodePool` of its own over ``sources`` (paths or encoded bytes), for
    callers that decode one set of videos: ``(index, clip or DecodeFailure, DecodedBy)`` as they
    complete."""
    with DecodePool(spec, plan=plan, workers=workers, timeout_s=timeout_s, prefetch=prefetch,
                    max_pixels=max_pixels) as pool:
        yield from pool.decode(sources)
