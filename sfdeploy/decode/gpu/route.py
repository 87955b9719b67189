"""GPU decoding inside the decode pool (:class:`sfdeploy.decode.pool.DecodePool` with a plan
that has a GPU decoder): CPU worker processes probe every video and decode those the plan keeps
on the CPU; the GPU decoder reads the others in this process, and their clips stay on the GPU.

Why this split. The probe (the stream's header, with the pixel limit, and decord's frame count:
the index the sampled frames are taken from) runs where hostile input costs one worker, as on the
CPU path: a decompression bomb is refused there before any decoder, CPU or GPU, allocates a frame.
NVDEC decoding has to run in the process that holds the CUDA context the model uses (a clip made
in another process would cross back through the host, the round trip GPU decoding is there to
avoid), in a few threads (:data:`GPU_THREADS`: NVDEC sessions run concurrently, and the H200 has 7
engines). A stream the GPU decoder fails on goes back to a CPU worker with the reason; a video
the CPU decoder cannot read either is that video's error row. What a native crash inside the GPU
decoder would cost is this process (the rows written so far are kept: ``--resume``).

Every result says which decoder read the video and why
(:class:`~sfdeploy.decode.clips.DecodedBy`): ``nvdec:<backend>`` or ``pyav`` (the CPU decoder), and
the rule of :mod:`sfdeploy.decode.gpu.select` that chose it. A GPU-decoded frame over the pixel
limit (a stream that grows after its header) is the video's ``frame_too_large`` row, as on the CPU.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from sfdeploy.clipspec import ClipSpec
from sfdeploy.decode.clips import DecodedBy, decode_failure
from sfdeploy.decode.gpu.select import DecodePlan, StreamInfo
from sfdeploy.decode.video import MAX_VIDEO_PIXELS, DecodeError, Video
from sfdeploy.preprocess import sample_indices

#: GPU decoding threads in this process (NVDEC sessions at once)
GPU_THREADS = 8

Decoded = tuple[int, Any, DecodedBy]


@dataclass(frozen=True)
class ToGpu:
    """A stream a worker probed and the plan gives the GPU decoder: its header and sampled indices
    (the worker's answer instead of a clip; the GPU decoder in the parent reads the video)."""

    info: StreamInfo
    indices: tuple[int, ...]


def route_stream(video: Video, spec: ClipSpec, plan: DecodePlan, max_pixels: int) -> tuple[ToGpu | None, str]:
    """In a worker, for a video it opened: ``(ToGpu, why)`` when ``plan`` gives the stream to the
    GPU decoder, ``(None, why not)`` when the CPU decoder reads it."""
    info = StreamInfo.of(video)
    on_gpu, reason = plan.route(info, max_pixels)
    if not on_gpu:
        return None, reason
    return ToGpu(info, tuple(sample_indices(video.num_frames, spec).reshape(-1).tolist())), reason


class GpuRouter:
    """The GPU side of a routed :class:`~sfdeploy.decode.pool.DecodePool`, in this process: the
    plan's decoder on the plan's device, ``threads`` NVDEC sessions at once."""

    def __init__(self, plan: DecodePlan, spec: ClipSpec, threads: int | None = None,
                 max_pixels: int = MAX_VIDEO_PIXELS) -> None:
        from sfdeploy.decode.gpu.backends import GpuClipMaker

        self.threads = GPU_THREADS if threads is None else threads
        self._maker = GpuClipMaker(plan.backend, plan.device, spec, max_pixels=max_pixels)

    def read(self, items: Sequence[str | bytes], results: Iterable[Decoded]
             ) -> Generator[Decoded, None, list[tuple[int, str]]]:
        """The workers' ``results`` passed on, with each :class:`ToGpu` replaced by its clip decoded
        here (``items``: the sources, by index); returns ``(index, why)`` of the videos the GPU
        decoder failed on, for the CPU decoder to read."""
        retry: list[tuple[int, str]] = []
        pending: dict[Future, tuple[int, DecodedBy, str | bytes]] = {}
        with ThreadPoolExecutor(self.threads, thread_name_prefix="sfdeploy-nvdec") as threads:
            for index, result, how in results:
                if not isinstance(result, ToGpu):
                    yield index, result, how
                    continue
                source = items[index]
                pending[threads.submit(self._maker.clip, source, result.info, result.indices)] = (index, how, source)
                # Bounded: a slow GPU (or model) holds back the workers instead of piling up clips.
                yield from _finished(pending, retry, block=len(pending) >= 2 * self.threads)
            while pending:
                yield from _finished(pending, retry, block=True)
        return retry


def _finished(pending: dict[Future, tuple[int, DecodedBy, str | bytes]], retry: list[tuple[int, str]], *,
              block: bool) -> Iterator[Decoded]:
    """The GPU clips done (waiting for one when ``block``); a failed one goes to ``retry``, a
    refused one (frames over the pixel limit) is its failure row."""
    from sfdeploy.decode.gpu.backends import GpuDecodeFailed

    done = wait(pending, return_when=FIRST_COMPLETED).done if block else [f for f in pending if f.done()]
    for future in done:
        index, how, source = pending.pop(future)
        try:
            clip = future.result()
        except GpuDecodeFailed as exc:
            retry.append((index, str(exc)))
        except DecodeError as exc:
            yield index, decode_failure(source, exc), DecodedBy("", how.reason)
        else:
            yield index, clip, how
