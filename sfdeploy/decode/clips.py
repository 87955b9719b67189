"""One video -> the views the deployed model takes, and what stands in the results for a video
that gives none.

:func:`load_video` opens a video with :mod:`sfdeploy.decode.video` (PyAV, reading as decord
would, capped at the pixel limit) and turns its sampled frames into the clip spec's views with
:mod:`sfdeploy.preprocess` (sample, resize, crop: MMAction2's test pipeline, pixel for pixel).
``source`` is a path or the bytes of an encoded file (server-side decoding receives those; no
temporary file is written).

Every input keeps its place in the results, so that no video is dropped silently: a video that
cannot be decoded is a :class:`DecodeFailure` (what went wrong, and the fix), and
:class:`DecodedBy` says which decoder read a video and why that one (the ``decoder`` columns of
``infer``'s rows).
Used by ``export`` (parity gate), ``eval``, ``infer``, ``bench`` and server-side decoding, mostly
through the worker pool of :mod:`sfdeploy.decode.pool`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sfdeploy.clipspec import ClipSpec
from sfdeploy.decode.video import (
    FIXES,
    MAX_VIDEO_PIXELS,
    PLAIN_REASONS,
    DecodeError,
    Video,
    describe,
    open_video,
    worker_failure_reason,
)
from sfdeploy.preprocess import clip_views, sample_indices
from sfdeploy.workers import WorkerFailure


def load_video(source: str | Path | bytes, spec: ClipSpec, *, max_pixels: int = MAX_VIDEO_PIXELS) -> np.ndarray:
    """Decode and preprocess one video: uint8 ``[V, T, crop, crop, 3]`` RGB.

    ``source`` is a path or the bytes of an encoded file (server-side decoding receives those; no
    temporary file is written). Decoding is :mod:`sfdeploy.decode.video`'s, the decoder MMAction2
    trains with here (PyAV, reading as decord would); a stream with frames of more than
    ``max_pixels`` is refused before decoding, and so is one whose frames grow past it. Raises
    :class:`sfdeploy.decode.DecodeError` (an :class:`InputError` naming the video and the fix).
    """
    with open_video(source, max_pixels=max_pixels) as video:
        return video_clip(video, spec)


def video_clip(video: Video, spec: ClipSpec) -> np.ndarray:
    """The views of an opened video: its sampled frames, resized and cropped (the decode pool's
    workers open the video themselves, to probe it before deciding where it is decoded)."""
    return clip_views(video.frames(sample_indices(video.num_frames, spec).reshape(-1)), spec)


@dataclass(frozen=True)
class DecodeFailure:
    """Why a video gave no clip; stays in the results so that no input is dropped."""

    path: str
    error: str


@dataclass(frozen=True)
class DecodedBy:
    """Which decoder read a video (``nvdec:<backend>``, ``pyav`` on the CPU; ``""`` when none
    could) and why that one: the ``decoder`` and ``decoder_reason`` of its row."""

    decoder: str
    reason: str


@dataclass(frozen=True)
class ServerDecoded:
    """A video classified by ``<name>_video``: its probabilities, and which decoder read it on the
    server and why (what the client's :class:`DecodedBy` says of a video decoded here)."""

    probs: np.ndarray
    decoded_by: DecodedBy


def decode_failure(source: str | bytes, exc: DecodeError) -> DecodeFailure:
    """The row of a video the decoder refused: what went wrong and the fix."""
    what = exc.message if exc.reason in PLAIN_REASONS else f"cannot decode: {exc.message}"
    return DecodeFailure(describe(source), f"{what}; {exc.fix}")


def worker_failure(source: str | bytes, failure: WorkerFailure) -> DecodeFailure:
    """The row of a video whose decode worker crashed or hung on it."""
    what = {"crash": "the decoder crashed", "timeout": "decoding timed out"}.get(failure.kind, "cannot decode")
    fix = FIXES[worker_failure_reason(failure.kind)]
    return DecodeFailure(describe(source), f"{what}: {failure.detail}; {fix}")
