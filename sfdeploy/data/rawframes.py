"""``data prepare --rawframes``: every usable video's frames as JPEG images, in MMAction2's
``RawframeDataset`` layout, so that training reads images instead of decoding videos.

::

    DATA/rawframes/<class>/<video_stem>/img_00001.jpg ...   (1-based, MMAction2's default filename_tmpl)
    DATA/rawframes/train/<class>/<video_stem>/...            (a train/ + val/ root: its relative path)

Frames are decoded with :mod:`sfdeploy.decode` (PyAV, RGB, the frames training and serving decode)
and written with OpenCV as BGR, so MMAction2's ``RawFrameDecode`` (``channel_order="rgb"``) reads the
same colours back (JPEG-lossy). ``short_side`` resizes on extraction (bilinear, like MMAction2's
``build_rawframes --new-short``); None keeps the native size.

Extraction runs in isolated worker processes, one video per job: a video that crashes or fails to
decode is a row with the reason, never silently dropped. Each video's frames are written into a
hidden ``.<stem>.partial`` folder renamed into place when complete, with a marker
(:data:`MARKER`) saying what it holds: a later run reuses a folder whose marker matches, and never
takes a half-written folder of a killed run for a finished one. Decoding goes in chunks of at most
:data:`CHUNK_BYTES` of frames (bounded memory per worker; ``Video.frames`` decodes from the start, so a
long high-resolution video decodes its beginning more than once).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sfdeploy.decode import MAX_VIDEO_PIXELS, DecodeError, open_video, worker_failure_reason
from sfdeploy.progress import progress
from sfdeploy.workers import WorkerFailure, imap_isolated

FRAMES_DIR = "rawframes"
#: MMAction2's RawframeDataset default: img_00001.jpg, 1-based
FILENAME_TMPL = "img_{:05}.jpg"
START_INDEX = 1
MARKER = ".sfdeploy_frames.json"
CHUNK_BYTES = 256 * 2**20
JPEG_QUALITY = 95  # mmcv.imwrite's (OpenCV's) default
EXTRACT_FIX = "re-encode or replace the video (it decodes partway only), or prepare without --rawframes"


def frame_dir_name(video: Path, video_root: Path) -> str:
    """The frame folder of ``video`` relative to ``DATA/rawframes``: its path under the root, without
    the extension (``<class>/<stem>``)."""
    return Path(video).relative_to(video_root).with_suffix("").as_posix()


def _scaled(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    if not short_side or min(width, height) == short_side:
        return width, height
    scale = short_side / min(width, height)
    if width <= height:
        return short_side, max(1, round(height * scale))
    return max(1, round(width * scale)), short_side


def _done(folder: Path, expect: dict[str, Any]) -> dict[str, Any] | None:
    marker = folder / MARKER
    try:
        kept = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    same = all(kept.get(k) == v for k, v in expect.items())
    return kept if same and len(list(folder.glob("img_*.jpg"))) == kept.get("frames") else None


def _write_frames(video: Any, folder: Path, size: tuple[int, int]) -> int:
    """Decode ``video`` in bounded chunks and write its frames into ``folder``; returns the bytes."""
    import cv2
    import numpy as np

    written, per_chunk = 0, max(1, CHUNK_BYTES // max(1, video.width * video.height * 3))
    for start in range(0, video.num_frames, per_chunk):
        frames = video.frames(np.arange(start, min(video.num_frames, start + per_chunk)))
        for offset, rgb in enumerate(frames):
            if (rgb.shape[1], rgb.shape[0]) != size:
                rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)
            path = folder / FILENAME_TMPL.format(start + offset + START_INDEX)
            bgr = np.ascontiguousarray(rgb[..., ::-1])  # OpenCV writes BGR; RawFrameDecode reads it back as RGB
            if not cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
                raise OSError(f"OpenCV could not write {path}")
            written += path.stat().st_size
    return written


def extract_video(job: tuple[str, str, int | None, int]) -> dict[str, Any]:
    """One video -> its frame folder (a worker's job: video, frame folder, short side, pixel limit);
    returns its row: ``frames``, ``bytes``, ``reused``, or ``reason`` and ``detail`` when it failed."""
    source, target, short_side, max_pixels = job
    folder = Path(target)
    row: dict[str, Any] = {"path": source, "frame_dir": str(folder)}
    try:
        with open_video(source, max_pixels=max_pixels) as video:
            size = _scaled(video.width, video.height, short_side)
            expect = {"frames": video.num_frames, "width": size[0], "height": size[1],
                      "source_bytes": os.path.getsize(source)}
            kept = _done(folder, expect)
            if kept:
                return {**row, "frames": kept["frames"], "bytes": kept["bytes"], "reused": True}
            partial = folder.with_name(f".{folder.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            written = _write_frames(video, partial, size)
        (partial / MARKER).write_text(json.dumps({**expect, "bytes": written}) + "\n")
        shutil.rmtree(folder, ignore_errors=True)  # an older extraction (another size): replaced
        os.replace(partial, folder)
        return {**row, "frames": expect["frames"], "bytes": written, "reused": False}
    except DecodeError as exc:
        return {**row, "reason": exc.reason, "detail": exc.message}
    except OSError as exc:
        return {**row, "reason": "write_failed", "detail": str(exc)}


def _on_failure(job: tuple[str, str, int | None, int], failure: WorkerFailure) -> dict[str, Any]:
    return {"path": job[0], "frame_dir": job[1], "reason": worker_failure_reason(failure.kind),
            "detail": failure.detail}


def extract_rawframes(videos: Sequence[Path], video_root: Path, frames_root: Path, *, short_side: int | None = None,
                      workers: int | None = None, show_progress: bool = True, max_pixels: int = MAX_VIDEO_PIXELS,
                      timeout_s: float = 600.0) -> dict[Path, dict[str, Any]]:
    """Extract ``videos`` (under ``video_root``) into ``frames_root`` in parallel (at most one
    process per core); returns each video's row (see :func:`extract_video`), ``frame_dir`` relative to
    ``frames_root``. Failed rows carry ``reason``, ``detail`` and ``fix``."""
    frames_root.mkdir(parents=True, exist_ok=True)
    for stale in frames_root.rglob(".*.partial"):  # a killed run's half-written folders
        shutil.rmtree(stale, ignore_errors=True)
    workers = max(1, min(workers or os.cpu_count() or 1, os.cpu_count() or 1, len(videos) or 1))
    jobs = [(str(v), str(frames_root / frame_dir_name(v, video_root)), short_side, max_pixels) for v in videos]
    rows: dict[Path, dict[str, Any]] = {}
    stream = imap_isolated(extract_video, jobs, workers=workers, on_failure=_on_failure, timeout_s=timeout_s,
                           prefetch=2)
    for index, row in progress(stream, desc="rawframes", unit="video", total=len(jobs), enabled=show_progress):
        row["frame_dir"] = frame_dir_name(videos[index], video_root)
        if row.get("reason"):
            row["fix"] = EXTRACT_FIX
        rows[Path(videos[index])] = row
    return rows


def summary(rows: dict[Path, dict[str, Any]], frames_root: Path, short_side: int | None) -> dict[str, Any]:
    """What ``prepare_report.json`` says of the extraction: where, how many frames and bytes, what failed."""
    ok = [r for r in rows.values() if not r.get("reason")]
    return {"root": str(frames_root), "filename_tmpl": FILENAME_TMPL, "start_index": START_INDEX,
            "frame_short_side": short_side, "videos": len(ok), "frames": sum(r["frames"] for r in ok),
            "bytes": sum(r["bytes"] for r in ok), "reused": sum(bool(r.get("reused")) for r in ok),
            "failed": [r for r in rows.values() if r.get("reason")],
            "decoder": "pyav (sfdeploy.decode), written as JPEG by OpenCV (BGR on disk, read back as RGB by "
                       "MMAction2's RawFrameDecode)"}
