"""The sweep of test videos the GPU-decoding fidelity gate is measured on (:func:`default_sweep`:
h264, hevc, mpeg4, vp9 and mjpeg; 96 px to 1080p; odd sizes; variable frame rate), encoded with
PyAV from the synthetic motion content of ``sfdeploy data synth``. The videos a candidate refuses
(NVDEC has no such codec, size or pixel format) are listed with the reason by the harness
(:mod:`sfdeploy.bench.fidelity`): at inference they go to the CPU decoder anyway.
"""

from __future__ import annotations

import fractions
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: PyAV's encoder for each codec of the sweep, and the container it is written in
ENCODERS = {"h264": "libx264", "hevc": "libx265", "mpeg4": "mpeg4", "vp9": "libvpx-vp9", "mjpeg": "mjpeg"}
CONTAINERS = {"mjpeg": "avi"}
ENCODER_OPTIONS = {"libx264": {"preset": "veryfast"},
                   "libx265": {"preset": "veryfast", "x265-params": "log-level=error"},
                   "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8"}}
#: even sizes from 96 px to 1080p; odd sizes (4:4:4 for h264/hevc: 4:2:0 needs even sizes)
SWEEP_SIZES = ((96, 96), (160, 120), (320, 240), (426, 240), (640, 360), (1280, 720), (1920, 1080))
ODD_SIZES = ((97, 131), (333, 187))
MOTIONS = ("move_right", "move_left", "move_up", "move_down")


@dataclass(frozen=True)
class SweepVideo:
    """One video of the sweep: codec, size, pixel format, frame timing and content."""

    codec: str
    width: int
    height: int
    pix_fmt: str = "yuv420p"
    vfr: bool = False
    motion: str = "move_right"
    seed: int = 0

    @property
    def filename(self) -> str:
        """A name that says what the video is, so a record's entries can be read without the sweep."""
        timing = "_vfr" if self.vfr else ""
        return (f"{self.codec}_{self.width}x{self.height}_{self.pix_fmt}{timing}_{self.motion}_{self.seed}."
                f"{CONTAINERS.get(self.codec, 'mp4')}")


def default_sweep(per_size: int = 4, codecs: Sequence[str] = tuple(ENCODERS)) -> list[SweepVideo]:
    """``per_size`` videos (motions x seeds) per codec and size of :data:`SWEEP_SIZES`, plus odd sizes
    (one per motion) and variable frame rate (h264, hevc at 320x240, ``per_size``)."""
    def contents(n: int) -> list[tuple[str, int]]:
        return [(MOTIONS[i % len(MOTIONS)], i // len(MOTIONS)) for i in range(n)]

    videos = []
    for codec in codecs:
        pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for width, height in SWEEP_SIZES:
            videos += [SweepVideo(codec, width, height, pix_fmt, False, m, s) for m, s in contents(per_size)]
        odd_fmt = {"h264": "yuv444p", "hevc": "yuv444p", "vp9": "yuv420p"}.get(codec)
        if odd_fmt:
            videos += [SweepVideo(codec, w, h, odd_fmt, False, m, s) for w, h in ODD_SIZES for m, s in contents(1)]
        if codec in ("h264", "hevc"):
            videos += [SweepVideo(codec, 320, 240, "yuv420p", True, m, s) for m, s in contents(per_size)]
    return videos


def encode_video(path: Path, video: SweepVideo, frames: int = 48) -> Path:
    """Write ``video`` with PyAV (FFmpeg's encoders bundled in its wheel): the synthetic motion
    content of ``sfdeploy data synth``, rendered small and scaled to the size; variable frame rate
    as alternating 20 and 40 ms steps."""
    from sfdeploy.data.synth import render_clip

    small = render_clip(video.motion, frames, 128, np.random.default_rng([video.seed, len(video.motion)]))
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = ENCODERS[video.codec]
    return _encode(path, video, small, encoder, ENCODER_OPTIONS.get(encoder, {}))


def _encode(path: Path, video: SweepVideo, small: np.ndarray, encoder: str, options: dict[str, str]) -> Path:
    import av
    import cv2

    frames = len(small)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=25)
        stream.width, stream.height, stream.pix_fmt = video.width, video.height, video.pix_fmt
        stream.options = dict(options)
        step = fractions.Fraction(1, 1000)
        stream.codec_context.time_base = step
        pts = 0
        for t in range(frames):
            rgb = cv2.resize(small[t], (video.width, video.height), interpolation=cv2.INTER_LINEAR)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts, frame.time_base = pts, step
            pts += 20 if (video.vfr and t % 3 == 1) else 40
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def make_sweep(out: Path, videos: Sequence[SweepVideo], frames: int = 48) -> tuple[list[Path], dict[str, str]]:
    """Encode the sweep into ``out`` (files already there are kept); returns the files and, for
    the videos an encoder refused, why."""
    import av

    paths, skipped = [], {}
    for video in videos:
        path = Path(out) / video.filename
        if not path.is_file():
            try:
                encode_video(path, video, frames)
            except (av.FFmpegError, ValueError) as exc:
                path.unlink(missing_ok=True)
                skipped[video.filename] = f"{type(exc).__name__}: {exc}"[:500]
                continue
        paths.append(path)
    return paths, skipped
