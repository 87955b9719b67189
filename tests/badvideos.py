"""Makers of bad inputs, shared by the tests of every command that reads videos."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sfdeploy.data.synth import render_clip, write_mp4


def good_video(path: Path, frames: int = 48, size: int = 96, motion: str = "move_right", seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(path, render_clip(motion, frames, size, np.random.default_rng(seed)))
    return path


def zero_byte(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def not_a_video(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("this is a text file with a video extension\n" * 20)
    return path


def truncated(path: Path, source: Path) -> Path:
    """The first half of a real mp4: its index (moov, written last by OpenCV) is gone."""
    data = source.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def encoded_video(path: Path, width: int, height: int, frames: int = 40, *, codec: str = "libx264",
                  pix_fmt: str = "yuv444p", vfr: bool = False, gray: bool = False, seed: int = 0) -> Path:
    """A video in any size (odd too), optionally with variable frame timing or grey frames, encoded
    with PyAV (OpenCV's writer rounds sizes down to even)."""
    import fractions

    import av

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=25)
    stream.width, stream.height = width, height
    stream.pix_fmt = "gray" if gray and codec == "ffv1" else pix_fmt
    stream.codec_context.time_base = fractions.Fraction(1, 1000)
    background = rng.integers(20, 80, size=(height, width, 3), dtype=np.uint8)
    pts = 0
    for i in range(frames):
        frame = background.copy()
        x = int(i * (width - 20) / max(1, frames - 1))
        frame[height // 3: height // 3 + 16, x: x + 20] = 220
        if gray:
            frame[:] = frame.mean(axis=2, keepdims=True).astype(np.uint8)
        out = av.VideoFrame.from_ndarray(frame, format="rgb24")
        out.pts, out.time_base = pts, fractions.Fraction(1, 1000)
        pts += 20 if (vfr and i % 3 == 1) else 40  # VFR: some frames 20 ms apart, others 40
        for packet in stream.encode(out):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def no_video_frames(path: Path) -> Path:
    """An mp4 whose video track holds no frame (only its audio track has packets)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        for i in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(audio.encode(frame))
        container.mux(audio.encode())
    return path


def corrupt_index(path: Path, source: Path, seed: int = 0) -> Path:
    """A real mp4 whose index (the moov box) is overwritten with random bytes."""
    data = bytearray(source.read_bytes())
    start = data.find(b"moov") + 8
    rng = np.random.default_rng(seed)
    data[start:start + 400] = rng.integers(0, 256, size=len(data[start:start + 400]), dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def bad_input_matrix(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Every awkward input, in two class folders: (files that must be used, files that must fail)."""
    a, b = root / "move_left", root / "move_right"
    usable = {
        "plain": good_video(a / "plain.mp4", frames=48, motion="move_left"),
        "grayscale": encoded_video(a / "gray.mkv", 96, 96, frames=40, codec="ffv1", gray=True),
        "odd_size": encoded_video(a / "odd_97x131.mp4", 131, 97, frames=40),
        "portrait": encoded_video(b / "portrait.mp4", 80, 128, frames=40),
        "very_long": encoded_video(b / "long.mp4", 96, 96, frames=1500, seed=1),
        "variable_frame_rate": encoded_video(b / "vfr.mp4", 96, 96, frames=60, vfr=True, seed=2),
        "plain_b": good_video(b / "plain.mp4", frames=48, motion="move_right"),
        # decord mis-decodes 72 px wide streams: sfdeploy decodes every stream with PyAV (decord only indexes)
        "decord_width_bug": encoded_video(b / "narrow_72.mp4", 72, 128, frames=40, seed=3),
    }
    failing = {
        "corrupt": corrupt_index(a / "corrupt.mp4", usable["plain"]),
        "truncated": truncated(b / "truncated.mp4", usable["plain_b"]),
        "zero_byte": zero_byte(a / "empty.mp4"),
        "not_a_video": not_a_video(b / "notes.avi"),
    }
    return usable, failing


def decompression_bomb(path: Path, width: int = 4096, height: int = 4096, frames: int = 2) -> Path:
    """A small file of huge frames (flat black compresses to almost nothing: 4096x4096 x 2 is ~50 KB,
    made in under a second), as an attacker would send; decoding its frames takes gigabytes."""
    return _flat_h264(path, width, height, frames)


def growing_stream(path: Path, small: tuple[int, int] = (64, 64), large: tuple[int, int] = (8192, 8192),
                   frames: int = 2) -> Path:
    """A stream whose header and first 8 frames are ``small`` (width, height) and whose last
    ``frames`` frames are ``large``: two MPEG-TS h264 segments one after the other (a valid stream:
    the second brings its own parameter sets). Its header passes any limit; decoding its later
    frames takes gigabytes (flat black: ~2 s to make, a few hundred KB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_flat_h264_segment(*small, 8) + _flat_h264_segment(*large, frames))
    return path


def _flat_h264_segment(width: int, height: int, frames: int) -> bytes:
    import io

    import av

    out = io.BytesIO()
    with av.open(out, "w", format="mpegts") as container:
        _encode_flat(container, width, height, frames)
    return out.getvalue()


def many_small_frames(path: Path, frames: int = 20_000, size: int = 16) -> Path:
    """The harmless opposite: a long video of tiny frames (decodes the clip's frames only)."""
    return _flat_h264(path, size, size, frames)


def _flat_h264(path: Path, width: int, height: int, frames: int) -> Path:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        _encode_flat(container, width, height, frames)
    return path


def _encode_flat(container: object, width: int, height: int, frames: int) -> None:
    import av

    stream = container.add_stream("libx264", rate=25)  # type: ignore[attr-defined]
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"preset": "ultrafast", "crf": "40"}
    image = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), dtype=np.uint8), format="rgb24")
    for _ in range(frames):
        for packet in stream.encode(image):
            container.mux(packet)  # type: ignore[attr-defined]
    for packet in stream.encode():
        container.mux(packet)  # type: ignore[attr-defined]
