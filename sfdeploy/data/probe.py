"""Probe video files with decord: does it open, how many frames, at what rate and size.

A probe decodes the first and the last frame, because a truncated file often opens and reports
its full frame count, then fails when the decoder reaches the missing part. Each rejected file gets
a ``reason`` (a stable code for reports and tests) and a ``fix`` a person can act on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from sfdeploy.progress import progress
from sfdeploy.workers import WorkerFailure, imap_isolated

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".mov", ".webm")

#: reason code -> what the user can do about it
FIXES: dict[str, str] = {
    "zero_bytes": "the file is empty: copy it again from its source, or remove it",
    "unreadable": "decord cannot open it (not a video, or a damaged header): re-encode it, "
    "e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`, or remove it",
    "no_frames": "the video has no decodable frames: re-encode it or remove it",
    "corrupt": "decoding fails partway (truncated or damaged file): re-encode it or remove it",
    "too_short": "use a longer video, or prepare with a preset / --min-frames that needs fewer frames",
    "decoder_crash": "the decoder crashed on this file: re-encode it or remove it",
    "decoder_unsupported": "decord (MMAction2's decoder) mis-decodes this stream (seen with some frame widths, "
    "e.g. 72 px): re-encode it, e.g. `ffmpeg -i IN -vf scale=trunc(iw/16)*16:-2 -c:v libx264 OUT.mp4`",
    "timeout": "decoding took too long: re-encode it or remove it",
}


@dataclass(frozen=True)
class VideoProbe:
    """What decord saw in one file; ``reason`` is None when the file is usable."""

    path: str
    frames: int = 0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    reason: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def fix(self) -> str:
        return FIXES.get(self.reason or "", "")

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.reason:
            data["fix"] = self.fix
        return data


def probe_video(path: str, min_frames: int = 1) -> VideoProbe:
    """Probe one file; never raises for a bad file (the result says what is wrong)."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        return VideoProbe(path, reason="unreadable", detail=exc.strerror or str(exc))
    if size == 0:
        return VideoProbe(path, reason="zero_bytes", detail="0 bytes")
    import decord

    try:
        reader = decord.VideoReader(path, num_threads=1)
    except Exception as exc:  # decord raises DECORDError / RuntimeError for bad containers
        return VideoProbe(path, reason="unreadable", detail=short_error(exc))
    frames = len(reader)
    if frames == 0:
        return VideoProbe(path, reason="no_frames", detail="0 frames")
    try:
        # The call MMAction2's DecordDecode makes, on the first and last frame.
        ends = reader.get_batch([0, frames - 1]).asnumpy()
    except Exception as exc:
        reason = "decoder_unsupported" if "DECORDArrayCopyFromTo" in str(exc) else "corrupt"
        return VideoProbe(path, frames=frames, reason=reason, detail=short_error(exc))
    first = ends.shape[1:]
    if ends.ndim != 4 or first[-1] != 3:
        return VideoProbe(path, frames=frames, reason="decoder_unsupported", detail=f"decoded frames of shape {first}")
    probe = VideoProbe(
        path, frames=frames, fps=float(reader.get_avg_fps()), width=int(first[1]), height=int(first[0])
    )
    if frames < min_frames:
        return VideoProbe(**{**asdict(probe), "reason": "too_short",
                             "detail": f"{frames} frames, a clip needs {min_frames}"})
    return probe


_DECORD_LOCATION = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


def short_error(exc: BaseException) -> str:
    """One readable line: the exception type and its first line, decord's source location removed."""
    lines = str(exc).strip().splitlines()
    text = _DECORD_LOCATION.sub("", lines[0] if lines else "")
    return f"{type(exc).__name__}: {text}"[:300]


def _probe_task(job: tuple[str, int]) -> VideoProbe:
    return probe_video(*job)


def _on_failure(job: tuple[str, int], failure: WorkerFailure) -> VideoProbe:
    reason = {"crash": "decoder_crash", "timeout": "timeout"}.get(failure.kind, "unreadable")
    return VideoProbe(job[0], reason=reason, detail=failure.detail)


def probe_videos(
    paths: Sequence[Path],
    *,
    min_frames: int = 1,
    workers: int | None = None,
    timeout_s: float = 120.0,
    show_progress: bool = True,
) -> list[VideoProbe]:
    """Probe many files in parallel worker processes; results in the order of ``paths``.

    A file that crashes or hangs the decoder is reported as such; the others are unaffected.
    """
    workers = workers or max(1, os.cpu_count() or 1)
    jobs = [(str(p), min_frames) for p in paths]
    results: list[VideoProbe | None] = [None] * len(jobs)
    stream = imap_isolated(_probe_task, jobs, workers=workers, on_failure=_on_failure,
                           timeout_s=timeout_s, prefetch=8)
    for index, probe in progress(stream, desc="probe", unit="video", total=len(jobs),
                                 enabled=show_progress):
        results[index] = probe
    return [r for r in results if r is not None]
