"""Client preprocessing: decoded frames -> the uint8 views the deployed model takes.

Sample frame indices, resize the short side, crop; nothing else (decoding is
:mod:`sfdeploy.decode`'s, normalisation is inside the model). Pure functions of arrays and the
:class:`ClipSpec`, so the CPU decode workers, the GPU path (:mod:`sfdeploy.decode.gpu.backends`
resizes and crops in torch with these offsets) and the tests share them. They reproduce
MMAction2's test pipeline for the same spec step by step, so that the exported model sees exactly
the pixels MMAction2 would:

* ``SampleFrames(test_mode=True)``: evenly spread clip offsets (one clip: the centre), indices
  looped past the end (``out_of_bound_opt='loop'``);
* ``DecordDecode`` (accurate mode): ``VideoReader.get_batch`` at :func:`sample_indices`, the same
  call as the registered ``SfdeployVideoDecode`` that training uses (:mod:`sfdeploy.train.transforms`);
  :func:`sfdeploy.decode.clips.load_video` makes it and hands the frames to :func:`clip_views`;
* ``Resize(scale=(-1, S))``: ``mmcv.rescale_size`` then ``cv2.resize`` bilinear;
* ``CenterCrop`` / ``ThreeCrop`` offsets, and ``FormatShape``'s view order (crop-major).

``tests/test_preprocess.py`` checks the output equals MMAction2's pipeline output, pixel for pixel.
"""

from __future__ import annotations

import numpy as np

from sfdeploy.clipspec import ClipSpec


def sample_indices(total_frames: int, spec: ClipSpec) -> np.ndarray:
    """Frame indices ``[num_clips, clip_len]`` as MMAction2's ``SampleFrames`` in test mode."""
    ori_clip_len = (spec.clip_len - 1) * spec.frame_interval + 1
    max_offset = max(total_frames - ori_clip_len, 0)
    if spec.num_clips > 1:
        offsets = np.round(np.arange(spec.num_clips) * (max_offset / float(spec.num_clips - 1)))
    else:
        offsets = np.array([max_offset // 2])
    indices = offsets[:, None] + np.arange(spec.clip_len)[None, :] * spec.frame_interval
    return np.mod(indices, total_frames).astype(np.int64)


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(new_h, new_w) as ``mmcv.rescale_size((w, h), (inf, short_side))``."""
    scale = short_side / min(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def crop_offsets(height: int, width: int, spec: ClipSpec) -> list[tuple[int, int]]:
    """Top-left (x, y) of each spatial view, in MMAction2's order."""
    size = spec.crop_size
    if spec.crop_mode == "center":
        return [((width - size) // 2, (height - size) // 2)]
    if height == size:  # ThreeCrop: along the long side (left, right, middle)
        step = (width - size) // 2
        return [(0, 0), (2 * step, 0), (step, 0)]
    if width == size:
        step = (height - size) // 2
        return [(0, 0), (0, 2 * step), (0, step)]
    raise ValueError(f"ThreeCrop needs crop_size == short side, got {size} for {width}x{height}")


def clip_views(frames: np.ndarray, spec: ClipSpec) -> np.ndarray:
    """Decoded frames ``[num_clips * clip_len, H, W, 3]`` (uint8 RGB, in sampling order) ->
    views ``[V, T, crop, crop, 3]``."""
    import cv2

    height, width = frames.shape[1:3]
    new_h, new_w = resized_size(height, width, spec.short_side)
    if (new_h, new_w) != (height, width):
        frames = np.stack([cv2.resize(f, (new_w, new_h), interpolation=cv2.INTER_LINEAR) for f in frames])
    clips = frames.reshape(spec.num_clips, spec.clip_len, new_h, new_w, 3)
    size = spec.crop_size
    views = [clips[:, :, y:y + size, x:x + size] for x, y in crop_offsets(new_h, new_w, spec)]
    return np.ascontiguousarray(np.concatenate(views, axis=0))  # crop-major, like FormatShape
