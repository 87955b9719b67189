"""Probe video files with sfdeploy's decoder: does it open, how many frames, at what rate and size.

A probe decodes the first and the last frame, because a truncated file often opens and reports
its full frame count, then fails when the decoder reaches the missing part. It decodes through
:mod:`sfdeploy.decode`, the adapter that training and serving use, so a file the probe accepts is
one that MMAction2 (through the registered ``SfdeployVideoDecode``) and the client can read. Each
rejected file gets a ``reason`` (a stable code for reports and tests) and a ``fix`` a person can
act on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from sfdeploy.decode import FIXES, MAX_VIDEO_PIXELS, DecodeError, open_video, worker_failure_reason
from sfdeploy.progress import progress
from sfdeploy.workers import WorkerFailure, imap_isolated

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".mov", ".webm")



@dataclass(frozen=True)
class VideoProbe:
    """What the decoder saw in one file; ``reason`` is None when the file is usable."""

    path: str
    frames: int = 0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    decoder: str = ""  # which decoder gave the frames: "pyav" (sfdeploy.decode)
    reason: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        """Whether the file can be trained on (the decoder found no reason against it)."""
        return self.reason is None

    @property
    def fix(self) -> str:
        """What the user can do about ``reason`` (empty for a usable file), for the report."""
        return FIXES.get(self.reason or "", "")

    def to_dict(self) -> dict:
        """The row ``prepare_report.json`` lists for this file, with the fix when it was rejected."""
        data = asdict(self)
        if self.reason:
            data["fix"] = self.fix
        return data


def probe_video(path: str, max_pixels: int = MAX_VIDEO_PIXELS) -> VideoProbe:
    """Probe one file; never raises for a bad file (the result says what is wrong)."""
    try:
        with open_video(path, max_pixels=max_pixels) as video:
            ends = video.frames([0, video.num_frames - 1])
            return VideoProbe(path, frames=video.num_frames, fps=video.fps, width=int(ends.shape[2]),
                              height=int(ends.shape[1]), decoder=video.decoder)
    except DecodeError as exc:
        reason = "unreadable" if exc.reason == "not_found" else exc.reason
        return VideoProbe(path, reason=reason, detail=exc.message)


def _probe_job(job: tuple[str, int]) -> VideoProbe:
    return probe_video(*job)


def _on_failure(job: tuple[str, int], failure: WorkerFailure) -> VideoProbe:
    return VideoProbe(job[0], reason=worker_failure_reason(failure.kind), detail=failure.detail)


def probe_videos(
    paths: Sequence[Path],
    *,
    workers: int | None = None,
    timeout_s: float = 120.0,
    show_progress: bool = True,
    max_pixels: int = MAX_VIDEO_PIXELS,
) -> list[VideoProbe]:
    """Probe many files in parallel worker processes; results in the order of ``paths``.

    A file that crashes or hangs the decoder is reported as such; the others are unaffected; one
    with frames of more than ``max_pixels`` is refused (``frame_too_large``) before decoding.
    """
    workers = workers or max(1, os.cpu_count() or 1)
    jobs = [(str(p), max_pixels) for p in paths]
    results: list[VideoProbe | None] = [None] * len(jobs)
    stream = imap_isolated(_probe_job, jobs, workers=workers, on_failure=_on_failure,
                           timeout_s=timeout_s, prefetch=8)
    for index, probe in progress(stream, desc="probe", unit="video", total=len(jobs),
                                 enabled=show_progress):
        results[index] = probe
    return [r for r in results if r is not None]
