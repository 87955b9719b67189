"""Contact sheets: uint8 clips drawn frame by frame, one caption per clip, in one RGB image.

The one drawing of "what the model sees", shared by ``data preview`` (the training pipeline's
clips, :mod:`sfdeploy.train.preview`) and ``eval --report-dir`` (the misclassified val clips as
the client path fed them to the model, :mod:`sfdeploy.analysis`). It sits at the bottom of the
layers (numpy and PIL only), so both can draw without importing each other.

A clip is ``uint8 [V, T, H, W, 3]`` RGB (views x time); each view is one row of frames under the
clip's caption. Optional marks under the frames say which SlowFast pathway takes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PAD, GAP, HEADER, MARK = 6, 2, 16, 4
SLOW_COLOUR = (255, 140, 0)  # frames the slow pathway sees (the fast pathway sees them too)
FAST_COLOUR = (30, 144, 255)  # frames only the fast pathway sees
BACKGROUND = (24, 24, 24)
TEXT_COLOUR = (235, 235, 235)
MIN_WIDTH = 480  # room for the title line, however small the frames
PATHWAY_LEGEND = "   | orange bar: slow + fast pathway   blue bar: fast pathway only"


@dataclass
class SheetClip:
    """One clip to draw: its frames, the line of text above them, and the frame indices marked as
    the slow / fast pathway's (empty: no marks)."""

    frames: np.ndarray  # uint8 [V, T, H, W, 3], RGB
    caption: str
    slow: list[int] = field(default_factory=list)
    fast: list[int] = field(default_factory=list)


def font() -> Any:
    """PIL's built-in bitmap font: present everywhere, no font file to find or ship."""
    from PIL import ImageFont

    return ImageFont.load_default()


def layout(clips: Sequence[SheetClip]) -> tuple[tuple[int, int], list[list[list[list[int]]]]]:
    """Canvas size (height, width) and, per clip, the box ``[y, x, h, w]`` of each frame by view and
    time: the one definition of where a sheet draws what (callers write it into their index)."""
    y = PAD + HEADER  # title line
    width = 0
    boxes_of_clips = []
    for clip in clips:
        views, frames, height, w = clip.frames.shape[:4]
        y += HEADER  # the caption
        boxes = []
        for _ in range(views):
            boxes.append([[y, PAD + t * (w + GAP), height, w] for t in range(frames)])
            y += height + MARK + GAP
        width = max(width, PAD * 2 + frames * (w + GAP))
        boxes_of_clips.append(boxes)
        y += GAP
    return (y + PAD, max(width, MIN_WIDTH)), boxes_of_clips


def draw(clips: Sequence[SheetClip], title: str) -> tuple[np.ndarray, list[list[list[list[int]]]]]:
    """The sheet as an RGB uint8 image ``[H, W, 3]``, and its boxes (see :func:`layout`). The title
    gains the pathway legend when any clip has marks."""
    from PIL import Image, ImageDraw

    (height, width), boxes_of_clips = layout(clips)
    canvas = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    for clip, boxes in zip(clips, boxes_of_clips, strict=True):
        for view, row in enumerate(boxes):
            for t, (y, x, h, w) in enumerate(row):
                canvas[y:y + h, x:x + w] = clip.frames[view, t]
                colour = SLOW_COLOUR if t in clip.slow else FAST_COLOUR if t in clip.fast else None
                if colour:
                    canvas[y + h + 1:y + h + MARK, x:x + w] = colour
    image = Image.fromarray(canvas)
    pen = ImageDraw.Draw(image)
    face = font()
    legend = title + (PATHWAY_LEGEND if any(clip.slow for clip in clips) else "")
    pen.text((PAD, PAD), legend, fill=TEXT_COLOUR, font=face)
    for clip, boxes in zip(clips, boxes_of_clips, strict=True):
        first_y = boxes[0][0][0]
        pen.text((PAD, first_y - HEADER + 2), clip.caption, fill=TEXT_COLOUR, font=face)
    return np.asarray(image), boxes_of_clips
