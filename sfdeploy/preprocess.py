"""Client preprocessing: a video file -> the uint8 views the deployed model takes.

Decode (:mod:`sfdeploy.decode`: decord, PyAV on the streams decord mis-decodes), sample frame
indices, resize the short side, crop; nothing else (normalisation is inside the model). It
reproduces MMAction2's test pipeline for the same :class:`ClipSpec` step by step, so that the
exported model sees exactly the pixels MMAction2 would:

* ``SampleFrames(test_mode=True)``: evenly spread clip offsets (one clip: the centre), indices
  looped past the end (``out_of_bound_opt='loop'``);
* ``DecordDecode`` (accurate mode): ``VideoReader.get_batch``, the same call as the registered
  ``SfdeployVideoDecode`` that training uses (:mod:`sfdeploy.train.transforms`);
* ``Resize(scale=(-1, S))``: ``mmcv.rescale_size`` then ``cv2.resize`` bilinear;
* ``CenterCrop`` / ``ThreeCrop`` offsets, and ``FormatShape``'s view order (crop-major).

``tests/test_preprocess.py`` checks the output equals MMAction2's pipeline output, pixel for pixel.
Used by ``export`` (parity gate), ``eval``, ``infer`` and ``bench``, and by server-side decoding
(``load_video`` takes the bytes of an encoded file as well as a path).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sfdeploy.clipspec import ClipSpec
from sfdeploy.decode import (
    FIXES,
    MAX_VIDEO_PIXELS,
    PLAIN_REASONS,
    DecodeError,
    Video,
    describe,
    open_video,
    worker_failure_reason,
)
from sfdeploy.workers import IsolatedPool, WorkerFailure


def sample_indices(total_frames: int, spec: ClipSpec) -> np.ndarray:
    """Frame indices ``[num_clips, clip_len]`` as MMAction2's ``SampleFrames`` in test mode."""
    ori_clip_len = (spec.clip_len - 1) * spec.frame_interval + 1
    max_offset = max(total_frames - ori_clip_len, 0)
    if spec.num_clips > 1:
        offsets = np.round(np.arange(spec.num_clips) * (max_offset / float(spec.num_clips - 1)))
    else:
        offsets = np.array([max_offset // 2])
    indices = offsets[:, None] + np.arange(spec.clip_len)[None, :] * spec.frame_interval
    return np.mod(indices, total_frames).astype(np.int64)


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(new_h, new_w) as ``mmcv.rescale_size((w, h), (inf, short_side))``."""
    scale = short_side / min(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def crop_offsets(height: int, width: int, spec: ClipSpec) -> list[tuple[int, int]]:
    """Top-left (x, y) of each spatial view, in MMAction2's order."""
    size = spec.crop_size
    if spec.crop_mode == "center":
        return [((width - size) // 2, (height - size) // 2)]
    if height == size:  # ThreeCrop: along the long side (left, right, middle)
        step = (width - size) // 2
        return [(0, 0), (2 * step, 0), (step, 0)]
    if width == size:
        step = (height - size) // 2
        return [(0, 0), (0, 2 * step), (0, step)]
    raise ValueError(f"ThreeCrop needs crop_size == short side, got {size} for {width}x{height}")


def clip_views(frames: np.ndarray, spec: ClipSpec) -> np.ndarray:
    """Decoded frames ``[num_clips * clip_len, H, W, 3]`` (uint8 RGB, in sampling order) ->
    views ``[V, T, crop, crop, 3]``."""
    import cv2

    height, width = frames.shape[1:3]
    new_h, new_w = resized_size(height, width, spec.short_side)
    if (new_h, new_w) != (height, width):
        frames = np.stack([cv2.resize(f, (new_w, new_h), interpolation=cv2.INTER_LINEAR) for f in frames])
    clips = frames.reshape(spec.num_clips, spec.clip_len, new_h, new_w, 3)
    size = spec.crop_size
    views = [clips[:, :, y:y + size, x:x + size] for x, y in crop_offsets(new_h, new_w, spec)]
    return np.ascontiguousarray(np.concatenate(views, axis=0))  # crop-major, like FormatShape


def load_video(source: str | Path | bytes, spec: ClipSpec, *, max_pixels: int = MAX_VIDEO_PIXELS,
               decoder: str = "auto") -> np.ndarray:
    """Decode and preprocess one video: uint8 ``[V, T, crop, crop, 3]`` RGB.

    ``source`` is a path or the bytes of an encoded file (server-side decoding receives those; no
    temporary file is written). Decoding is :mod:`sfdeploy.decode`'s, the decoder MMAction2 trains
    with here (decord, PyAV on the streams decord mis-decodes); a stream with frames of more than
    ``max_pixels`` is refused before decoding. Raises :class:`sfdeploy.decode.DecodeError` (an
    :class:`InputError` naming the video and the fix). ``decoder="pyav"``: PyAV for every stream
    (:data:`sfdeploy.decode.CPU_DECODERS`).
    """
    with open_video(source, max_pixels=max_pixels, decoder=decoder) as video:
        return video_clip(video, spec)


def video_clip(video: Video, spec: ClipSpec) -> np.ndarray:
    """The views of an opened video: its sampled frames, resized and cropped."""
    return clip_views(video.frames(sample_indices(video.num_frames, spec).reshape(-1)), spec)


@dataclass(frozen=True)
class DecodeFailure:
    """Why a video gave no clip; stays in the results so that no input is dropped."""

    path: str
    error: str


def _decode_task(job: tuple[str | bytes, ClipSpec, int]) -> np.ndarray | DecodeFailure:
    """Decode one video, or say why not and what to do."""
    source, spec, max_pixels = job
    try:
        return load_video(source, spec, max_pixels=max_pixels)
    except DecodeError as exc:  # this input's row says why; the others go on
        return decode_failure(source, exc)


def decode_failure(source: str | bytes, exc: DecodeError) -> DecodeFailure:
    """The row of a video the decoder refused: what went wrong and the fix."""
    what = exc.message if exc.reason in PLAIN_REASONS else f"cannot decode: {exc.message}"
    return DecodeFailure(describe(source), f"{what}; {exc.fix}")


def worker_failure(source: str | bytes, failure: WorkerFailure) -> DecodeFailure:
    """The row of a video whose decode worker crashed or hung on it."""
    what = {"crash": "the decoder crashed", "timeout": "decoding timed out"}.get(failure.kind, "cannot decode")
    fix = FIXES[worker_failure_reason(failure.kind)]
    return DecodeFailure(describe(source), f"{what}: {failure.detail}; {fix}")


def _decode_failed(job: tuple[str | bytes, ClipSpec, int], failure: WorkerFailure) -> DecodeFailure:
    return worker_failure(job[0], failure)


def single_threaded() -> None:
    import cv2

    cv2.setNumThreads(1)  # one decode per worker process; the processes are the parallelism


DEFAULT_TIMEOUT_S = 300.0  # a video that takes longer to decode fails (its worker is replaced)


class DecodePool:
    """Decode worker processes kept between calls: the pool behind :func:`decode_many`, and what a
    Triton model instance (``<name>_video``) decodes its requests with, request after request,
    without starting an interpreter per request. A video that crashes or hangs the decoder costs
    its own result and its worker (replaced), never the caller's process; one with frames of more
    than ``max_pixels`` is refused before decoding (:mod:`sfdeploy.decode`)."""

    def __init__(self, spec: ClipSpec, *, workers: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 prefetch: int = 2, max_pixels: int = MAX_VIDEO_PIXELS) -> None:
        self.spec = spec
        self.max_pixels = max_pixels
        self._pool = IsolatedPool(_decode_task, workers=workers or max(1, os.cpu_count() or 1),
                                  on_failure=_decode_failed, timeout_s=timeout_s, prefetch=prefetch,
                                  init=single_threaded)

    def warm(self) -> None:
        """Start the workers now (imports done before the first video arrives)."""
        self._pool.warm()

    def decode(self, sources: Sequence[str | Path | bytes]) -> Iterator[tuple[int, np.ndarray | DecodeFailure]]:
        """``(index, views or DecodeFailure)`` for each source, as they complete."""
        jobs = [(bytes(s) if isinstance(s, (bytes, bytearray, memoryview)) else str(s), self.spec, self.max_pixels)
                for s in sources]
        yield from self._pool.imap(jobs)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decode_many(sources: Sequence[str | Path | bytes], spec: ClipSpec, *, workers: int | None = None,
                timeout_s: float = DEFAULT_TIMEOUT_S, prefetch: int = 2, max_pixels: int = MAX_VIDEO_PIXELS
                ) -> Iterator[tuple[int, np.ndarray | DecodeFailure]]:
    """Decode videos (paths or encoded bytes) in worker processes (:mod:`sfdeploy.workers`); yields
    ``(index, views or DecodeFailure)`` as they complete. A video that crashes or hangs the decoder
    fails alone; a failure's ``path`` is the path, or ``<N bytes of an encoded video>``."""
    with DecodePool(spec, workers=workers, timeout_s=timeout_s, prefetch=prefetch, max_pixels=max_pixels) as pool:
        yield from pool.decode(sources)
