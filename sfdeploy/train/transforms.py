"""MMAction2 transforms that decode with :mod:`sfdeploy.decode`: training reads the pixels serving reads.

``dict(type="SfdeployVideoInit")`` and ``dict(type="SfdeployVideoDecode")`` replace
``DecordInit`` / ``DecordDecode`` in every pipeline of the ``WORK/config.py`` that ``finetune``
writes, and the config imports this module through ``custom_imports``. So MMAction2's own tools
(``init_recognizer``, ``inference_recognizer``, ``tools/test.py``) decode a video exactly as
sfdeploy's client does: PyAV counting frames as decord's index does (frame count and rate) and
decoding them, capped at the pixel limit, on every width (decord fails on some) and stream (none
grows past the limit).

They are drop-in replacements: same keys in and out as MMAction2's decord pair (``total_frames``,
``avg_fps``, ``video_reader``; ``imgs``, ``original_shape``, ``img_shape``), same file reading
(``io_backend`` and its arguments), and the same frames wherever decord can decode
(``tests/test_decode_sweep.py``). ``results["decoder"]`` says which decoder produced them (``pyav``).
"""

from __future__ import annotations

import os.path as osp
from typing import Any

from mmaction.datasets.transforms.loading import DecordDecode
from mmaction.registry import TRANSFORMS
from mmcv.transforms import BaseTransform

from sfdeploy.decode import open_video


@TRANSFORMS.register_module()
class SfdeployVideoInit(BaseTransform):
    """``DecordInit`` through sfdeploy's decoder: opens ``results["filename"]``."""

    def __init__(self, io_backend: str = "disk", **kwargs: Any) -> None:
        self.io_backend = io_backend
        self.kwargs = kwargs
        self.file_client: Any = None

    def transform(self, results: dict) -> dict:
        from mmengine.fileio import FileClient

        filename = results["filename"]
        if osp.splitext(filename)[0] == filename:  # as DecordInit: a name without extension is an .mp4
            filename = filename + ".mp4"
        if self.file_client is None:
            self.file_client = FileClient(self.io_backend, **self.kwargs)
        video = open_video(self.file_client.get(filename))
        results["video_reader"] = video
        results["total_frames"] = video.num_frames
        results["avg_fps"] = video.fps
        return results

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(io_backend={self.io_backend})"


@TRANSFORMS.register_module()
class SfdeployVideoDecode(DecordDecode):
    """``DecordDecode`` (accurate mode) through sfdeploy's decoder: the frames at ``frame_inds``."""

    def __init__(self, mode: str = "accurate") -> None:
        if mode != "accurate":
            raise ValueError(f"SfdeployVideoDecode decodes exact frames only (mode='accurate'), got {mode!r}")
        super().__init__(mode=mode)

    def _decord_load_frames(self, container: Any, frame_inds: Any) -> list:
        return list(container.frames(frame_inds))

    def transform(self, results: dict) -> dict:
        video = results["video_reader"]
        results = super().transform(results)
        results["decoder"] = video.decoder
        video.close()
        return results
