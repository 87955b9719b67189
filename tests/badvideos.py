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
