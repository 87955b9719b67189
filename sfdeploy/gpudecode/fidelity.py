"""The fidelity gate of GPU decoding: a sweep of test videos, a harness that runs each through two
decoders and one model, and the record the gate reads.

Why a gate. NVDEC's YUV->RGB conversion is not FFmpeg's software one (swscale, what decord and
PyAV use), and the resize runs in float on the GPU where OpenCV's runs in fixed point: the pixels
differ by a few grey levels. Whether that changes what the model says is measured, like the parity
gate measures an export: on the sweep (:func:`default_sweep`: h264, hevc, mpeg4, vp9 and mjpeg;
96 px to 1080p; odd sizes; variable frame rate), each video is decoded by the reference (the CPU
path) and the candidate, both clips go through the same model, and per codec the record keeps the
top-1 agreement and the worst probability difference. A codec passes at >= :data:`AGREEMENT`
(99.5%) of its compared videos; under 200 videos of a codec that means none may disagree. The
videos a candidate refuses (NVDEC has no such codec, size or pixel format) are listed with the
reason: at inference they go to the CPU decoder anyway.

The record of a GPU candidate is kept in the export (``EXPORT/decode_fidelity.json``, one entry per
GPU decoder), where ``sfdeploy infer`` reads the gate (:func:`read_gates`); a codec without a
passing entry is decoded on the CPU (:mod:`sfdeploy.gpudecode.select`).

The harness itself is checked on the CPU with decord against PyAV (byte-identical frames:
agreement 100%, difference 0).
"""

from __future__ import annotations

import fractions
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sfdeploy.clipspec import ClipSpec
from sfdeploy.decode import MAX_VIDEO_PIXELS, DecodeError, open_video
from sfdeploy.errors import InputError
from sfdeploy.fsutil import atomic_write_text
from sfdeploy.gpudecode.select import GPU_BACKENDS, Gate, StreamInfo, nvdec_refusal
from sfdeploy.preprocess import load_video, sample_indices

#: top-1 agreement a codec needs, over its compared sweep videos
AGREEMENT = 0.995
#: the gate's file in an export folder
GATE_FILE = "decode_fidelity.json"
SCHEMA = 1

#: PyAV's encoder for each codec of the sweep, and the container it is written in
ENCODERS = {"h264": "libx264", "hevc": "libx265", "mpeg4": "mpeg4", "vp9": "libvpx-vp9", "mjpeg": "mjpeg"}
CONTAINERS = {"mjpeg": "avi"}
ENCODER_OPTIONS = {"libx264": {"preset": "veryfast"}, "libx265": {"preset": "veryfast", "x265-params": "log-level=error"},
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


@dataclass(frozen=True)
class ClipDecoder:
    """A decoder the harness compares: ``load(path)`` gives the views (numpy, or a torch tensor on
    the GPU); ``refusal(info)`` says why it does not take a stream (None: it does)."""

    name: str
    load: Callable[[str], Any]
    refusal: Callable[[StreamInfo], str | None] = lambda info: None
    backend: str | None = None  # the GPU decoder, for a GPU candidate


def cpu_decoder(spec: ClipSpec, decoder: str = "auto", max_pixels: int = MAX_VIDEO_PIXELS) -> ClipDecoder:
    """The CPU path (``auto``: decord, PyAV where decord mis-decodes), or PyAV alone (``pyav``)."""
    return ClipDecoder("cpu" if decoder == "auto" else f"cpu:{decoder}",
                       lambda path: load_video(path, spec, max_pixels=max_pixels, decoder=decoder))


def gpu_decoder(spec: ClipSpec, backend: str, device: str, max_pixels: int = MAX_VIDEO_PIXELS) -> ClipDecoder:
    """NVDEC through ``backend``, with the resize and crop on the GPU: what the routed pool runs."""
    from sfdeploy.gpudecode.backends import GpuClipMaker

    maker = GpuClipMaker(backend, device, spec)

    def load(path: str) -> Any:
        with open_video(path, max_pixels=max_pixels) as video:
            info = StreamInfo.of(video)
            indices = sample_indices(video.num_frames, spec).reshape(-1)
        return maker.clip(path, info, indices.tolist())

    return ClipDecoder(f"nvdec:{backend}", load, lambda info: nvdec_refusal(info, backend, max_pixels), backend)


def _host(clip: Any) -> np.ndarray:
    from sfdeploy.runtime import host_array

    return host_array(clip)


def measure_fidelity(paths: Sequence[Path], reference: ClipDecoder, candidate: ClipDecoder,
                     predict: Callable[[Any], np.ndarray], *, threshold: float = AGREEMENT) -> dict[str, Any]:
    """Each video through both decoders and ``predict`` (a batch -> probabilities); per video the
    two top-1 classes, the largest probability and pixel differences; per codec the agreement, the
    worst probability difference and the verdict (see the module docstring)."""
    from sfdeploy.gpudecode.backends import GpuDecodeFailed
    from sfdeploy.gpudecode.pool import stack_clips

    entries: list[dict[str, Any]] = []
    for path in paths:
        entry: dict[str, Any] = {"video": Path(path).name}
        try:
            with open_video(str(path)) as video:
                info = StreamInfo.of(video)
        except DecodeError as exc:
            entries.append({**entry, "status": "unreadable", "reason": exc.message})
            continue
        entry.update(codec=info.codec, size=f"{info.width}x{info.height}", pix_fmt=info.pix_fmt, frames=info.frames)
        refusal = candidate.refusal(info)
        if refusal:
            entries.append({**entry, "status": "refused", "reason": refusal})
            continue
        try:
            ref, cand = reference.load(str(path)), candidate.load(str(path))
        except (DecodeError, GpuDecodeFailed) as exc:
            entries.append({**entry, "status": "failed", "reason": str(exc).splitlines()[0][:300]})
            continue
        p_ref, p_cand = predict(stack_clips([ref]))[0], predict(stack_clips([cand]))[0]
        pixels = np.abs(_host(ref).astype(np.int16) - _host(cand).astype(np.int16))
        entries.append({**entry, "status": "compared", "top1_reference": int(np.argmax(p_ref)),
                        "top1_candidate": int(np.argmax(p_cand)), "agree": bool(np.argmax(p_ref) == np.argmax(p_cand)),
                        "max_prob_diff": float(np.abs(p_ref - p_cand).max()),
                        "max_pixel_diff": int(pixels.max()), "mean_pixel_diff": round(float(pixels.mean()), 4)})
    return {"schema": SCHEMA, "kind": "sfdeploy-decode-fidelity", "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "reference": reference.name, "candidate": candidate.name, "backend": candidate.backend,
            "threshold": threshold, "codecs": summarize(entries, threshold), "videos": entries}


def summarize(entries: Sequence[dict[str, Any]], threshold: float = AGREEMENT) -> dict[str, dict[str, Any]]:
    """Per codec: videos compared, refused and failed; top-1 agreement; worst differences; passed."""
    codecs: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if "codec" not in entry:
            continue
        stats = codecs.setdefault(entry["codec"], {"compared": 0, "agreed": 0, "refused": 0, "failed": 0,
                                                   "worst_prob_diff": 0.0, "max_pixel_diff": 0})
        if entry["status"] != "compared":
            stats[entry["status"]] += 1
            continue
        stats["compared"] += 1
        stats["agreed"] += entry["agree"]
        stats["worst_prob_diff"] = max(stats["worst_prob_diff"], entry["max_prob_diff"])
        stats["max_pixel_diff"] = max(stats["max_pixel_diff"], entry["max_pixel_diff"])
    for stats in codecs.values():
        n = stats["compared"]
        stats["agreement"] = round(stats["agreed"] / n, 4) if n else None
        stats["passed"] = bool(n) and stats["agreed"] / n >= threshold and not stats["failed"]
    return codecs


def gate_note(codec: str, stats: dict[str, Any], record: dict[str, Any]) -> str:
    """One line: what the gate measured for ``codec``."""
    if not stats["compared"]:
        return f"{codec}: no video compared ({stats['refused']} refused, {stats['failed']} failed)"
    failed = f", {stats['failed']} failed on the GPU" if stats["failed"] else ""
    return (f"{codec}: {stats['agreement']:.1%} top-1 agreement on {stats['compared']} videos{failed} (needs "
            f"{record['threshold']:.1%}), worst probability difference {stats['worst_prob_diff']:.4f} "
            f"({record['candidate']} vs {record['reference']}, {record['date'][:10]})")


def write_gate(export_dir: Path, record: dict[str, Any]) -> Path:
    """Keep a GPU candidate's record in ``EXPORT/decode_fidelity.json`` (one entry per backend,
    replaced by a newer one)."""
    backend = record.get("backend")
    if backend not in GPU_BACKENDS:
        raise InputError(f"only a GPU decoder's record gates GPU decoding, not {record.get('candidate')!r}",
                         fix=f"measure one of: {', '.join(GPU_BACKENDS)}")
    path = Path(export_dir) / GATE_FILE
    data = _read(path) if path.is_file() else {"schema": SCHEMA, "backends": {}}
    data["backends"][backend] = {k: v for k, v in record.items() if k != "videos"}
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"the GPU-decoding fidelity record cannot be read ({exc})", path=path,
                         fix="remove it and measure again: python benchmarks/gpu_fidelity.py --export EXPORT") from exc
    if data.get("schema") != SCHEMA or not isinstance(data.get("backends"), dict):
        raise InputError(f"not a GPU-decoding fidelity record of schema {SCHEMA}", path=path,
                         fix="remove it and measure again: python benchmarks/gpu_fidelity.py --export EXPORT")
    return data


def read_gates(export_dir: Path | None) -> dict[str, Gate]:
    """The gate per GPU decoder from ``EXPORT/decode_fidelity.json``: codec -> (passed, note).
    No export, or no record in it: no gates."""
    path = Path(export_dir) / GATE_FILE if export_dir is not None else None
    if path is None or not path.is_file():
        return {}
    gates: dict[str, Gate] = {}
    for backend, record in _read(path)["backends"].items():
        gates[backend] = {codec: (bool(stats["passed"]), gate_note(codec, stats, record))
                          for codec, stats in record["codecs"].items()}
    return gates

