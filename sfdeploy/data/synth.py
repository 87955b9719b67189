"""A synthetic action dataset whose classes differ only in motion.

Every clip shows the same kind of scene (a coloured shape on a noisy background); what tells the
classes apart is how the shape moves over time: left / right / up / down, rotating clockwise /
counter-clockwise, growing / shrinking. A single frame carries no class information, so a model
that scores well on it has learnt temporal features, and left/right classes make horizontal
flipping a label-destroying augmentation (``sfdeploy_dataset.json`` says so, and finetune turns
Flip off).

Output: ``OUT/<class>/<class>_<i>.mp4`` (real MPEG-4 files that decord reads) plus
``OUT/sfdeploy_dataset.json``. The same ``seed`` gives the same videos.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sfdeploy.errors import InputError
from sfdeploy.progress import progress

#: Class names in the order they are used; ``--classes N`` takes the first N.
MOTIONS: tuple[str, ...] = (
    "move_right",
    "move_left",
    "move_down",
    "move_up",
    "rotate_cw",
    "rotate_ccw",
    "grow",
    "shrink",
)

#: Hints about a video folder that ``data prepare`` reads (any dataset may carry one).
HINTS_JSON = "sfdeploy_dataset.json"
FPS = 25


@dataclass(frozen=True)
class SynthOptions:
    """The synthetic dataset ``sfdeploy data synth`` writes (the CLI's options, same defaults): small enough to train
    ``slowfast_tiny`` on 2 CPU cores, and one seed gives the same videos."""

    classes: int = 4
    per_class: int = 16
    frames: int = 48
    size: int = 96
    seed: int = 0


def _validate(opts: SynthOptions) -> None:
    if not 2 <= opts.classes <= len(MOTIONS):
        raise InputError(
            f"--classes must be between 2 and {len(MOTIONS)}, got {opts.classes}",
            fix=f"choose 2..{len(MOTIONS)} classes (motions: {', '.join(MOTIONS)})",
        )
    if opts.per_class < 1:
        raise InputError(f"--per-class must be >= 1, got {opts.per_class}", fix="use --per-class 16")
    if opts.frames < 8:
        raise InputError(f"--frames must be >= 8, got {opts.frames}", fix="use --frames 48")
    if opts.size < 32 or opts.size % 2:
        raise InputError(
            f"--size must be an even number >= 32, got {opts.size}",
            fix="use --size 96 (MPEG-4 encoders need even frame sizes)",
        )


def render_clip(motion: str, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one clip as uint8 RGB ``[T, H, W, 3]``; appearance is random, motion is the class."""
    import cv2

    base = rng.integers(20, 90, size=3)
    background = np.clip(base + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)
    colour = tuple(int(c) for c in rng.integers(150, 256, size=3))
    centre = np.array([size / 2, size / 2]) + rng.uniform(-size * 0.08, size * 0.08, size=2)
    half = size * rng.uniform(0.10, 0.14)  # half side of the shape, pixels
    travel = size * rng.uniform(0.40, 0.55)  # distance covered by the translating classes
    direction = {
        "move_right": (1, 0),
        "move_left": (-1, 0),
        "move_down": (0, 1),
        "move_up": (0, -1),
    }
    angle0 = rng.uniform(0, math.pi)
    spin = math.pi * rng.uniform(0.8, 1.2)  # total rotation over the clip, radians
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        phase = t / (frames - 1) - 0.5  # -0.5 .. 0.5 over the clip
        c, h, angle, aspect = centre.copy(), half, angle0, 1.0
        if motion in direction:
            c += np.array(direction[motion]) * travel * phase
        elif motion in ("rotate_cw", "rotate_ccw"):
            angle += spin * phase * (1 if motion == "rotate_cw" else -1)
            aspect = 0.35  # a bar, so that rotation is visible
            h = half * 1.8
        elif motion in ("grow", "shrink"):
            h = half * (1.0 + 0.9 * (phase if motion == "grow" else -phase))
        frame = background.copy()
        cos, sin = math.cos(angle), math.sin(angle)
        corners = np.array([[-h, -h * aspect], [h, -h * aspect], [h, h * aspect], [-h, h * aspect]])
        rotated = corners @ np.array([[cos, sin], [-sin, cos]]) + c
        cv2.fillPoly(frame, [np.round(rotated).astype(np.int32)], colour, lineType=cv2.LINE_AA)
        out[t] = frame
    return out


def write_mp4(path: Path, clip_rgb: np.ndarray, fps: int = FPS) -> None:
    """Write uint8 RGB ``[T, H, W, 3]`` as an MPEG-4 Part 2 .mp4 (the codec OpenCV ships with)."""
    import cv2

    height, width = clip_rgb.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise InputError(
            "OpenCV cannot open an MPEG-4 writer", path=path, fix="check that the folder is writable"
        )
    try:
        for frame in clip_rgb:
            writer.write(np.ascontiguousarray(frame[:, :, ::-1]))  # OpenCV writes BGR
    finally:
        writer.release()


def encode_h264(clip_rgb: np.ndarray, fps: int = FPS, pix_fmt: str = "yuv420p") -> bytes:
    """Encode uint8 RGB ``[T, H, W, 3]`` as an h264 .mp4, in memory, with PyAV (any size: OpenCV's
    writer rounds sizes down to even; yuv420p itself needs even sizes, yuv444p takes odd ones)."""
    import io

    import av

    height, width = clip_rgb.shape[1:3]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = {"preset": "ultrafast"}
        for frame in clip_rgb:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def synthesize(out: Path, opts: SynthOptions = SynthOptions(), show_progress: bool = True) -> Path:
    """Write the dataset to ``out`` and return the path of its ``sfdeploy_dataset.json``."""
    _validate(opts)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder ({exc.strerror})", path=out,
                         fix="choose a writable OUT folder") from exc
    classes = MOTIONS[: opts.classes]
    jobs = [(ci, name, i) for ci, name in enumerate(classes) for i in range(opts.per_class)]
    for ci, name, i in progress(jobs, desc="synth", unit="video", enabled=show_progress):
        rng = np.random.default_rng([opts.seed, ci, i])
        folder = out / name
        folder.mkdir(exist_ok=True)
        write_mp4(folder / f"{name}_{i:04d}.mp4", render_clip(name, opts.frames, opts.size, rng))
    meta = {
        "kind": "sfdeploy-synthetic",
        "classes": list(classes),
        "per_class": opts.per_class,
        "frames": opts.frames,
        "size": opts.size,
        "fps": FPS,
        "seed": opts.seed,
        # Left/right (and cw/ccw) classes: a horizontal flip turns one class into another.
        "direction_sensitive": True,
    }
    path = out / HINTS_JSON
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path
