"""Decoding a video into the clips the model takes, anywhere it runs: one package, one pool.

* :mod:`~sfdeploy.decode.video`: the one CPU decoder (PyAV, as decord indexes and decodes), the
  frame-size limit on every frame, and why a video cannot be decoded (:class:`DecodeError`);
* :mod:`~sfdeploy.decode.clips`: one video -> the clip spec's views (``load_video``; the sampling,
  resizing and cropping are :mod:`sfdeploy.preprocess`'s, frames -> clips), the rows of videos
  that give none (``DecodeFailure``) and which decoder read each (``DecodedBy``);
* :mod:`~sfdeploy.decode.pool`: the isolated worker processes every caller decodes in
  (``DecodePool``, ``decode_many``): ``eval``, ``bench``, ``infer`` (in Ray tasks too) and a
  Triton ``<name>_video`` instance; given a plan with a GPU decoder it routes streams to NVDEC;
* :mod:`~sfdeploy.decode.gpu`: GPU decoding (NVDEC), imported only when a plan uses it.

This module re-exports :mod:`~sfdeploy.decode.video`'s names and imports nothing heavy (numpy,
PyAV and torch are imported where frames are made): the CLI reads the limits at start.
"""

from sfdeploy.decode.video import (
                                   FIXES,
                                   MAX_VIDEO_PIXELS,
                                   MAX_VIDEO_SIZE,
                                   PLAIN_REASONS,
                                   DecodeError,
                                   Source,
                                   Video,
                                   describe,
                                   open_video,
                                   short_error,
                                   worker_failure_reason,
)

__all__ = ["FIXES", "MAX_VIDEO_PIXELS", "MAX_VIDEO_SIZE", "PLAIN_REASONS", "DecodeError", "Source", "Video", "describe",
           "open_video", "short_error", "worker_failure_reason"]
