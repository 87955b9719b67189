"""The deployable SlowFast: raw uint8 frames in, class probabilities out.

Everything a client would otherwise have to get exactly right lives inside the graph: the cast,
the mean/std normalisation, the channel and axis layout, the slow/fast temporal split (done by
``ResNet3dSlowFast`` itself) and the averaging over views. A client only decodes, samples,
resizes and crops (see :mod:`sfdeploy.preprocess`), which it must do anyway to make a batch.

Input ``frames``: ``uint8 [N, V, T, H, W, 3]``, RGB, N clips in the batch (dynamic), V views of
the same video. Output ``probs``: ``float32 [N, num_classes]``, the MMAction2 test-time result:
with ``average_clips='prob'`` the mean over views of the per-view softmax, with ``'score'`` the
softmax of the mean logits (MMAction2 returns the mean logits; the manifest records which).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SlowFastDeploy(nn.Module):
    """Wraps a trained MMAction2 ``Recognizer3D`` (its backbone and head, not patched)."""

    def __init__(self, recognizer: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        averaging = recognizer.cls_head.average_clips
        if averaging not in ("prob", "score"):
            raise ValueError(f"cls_head.average_clips={averaging!r}: sfdeploy needs 'prob' or 'score'")
        self.backbone = recognizer.backbone
        self.cls_head = recognizer.cls_head
        self.average_probs = averaging == "prob"
        self.compute_dtype = compute_dtype
        # [1, 3, 1, 1, 1]: broadcast over N*V, T, H, W of the NCTHW layout the backbone takes.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1, 1))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        n, v = frames.shape[0], frames.shape[1]
        # [N, V, T, H, W, 3] -> [N*V, 3, T, H, W]: views become batch entries, as MMAction2's
        # Recognizer3D does with its num_segs axis.
        x = frames.flatten(0, 1).permute(0, 4, 1, 2, 3)
        # Normalise in float32 exactly as ActionDataPreprocessor does; only then drop to the
        # compute precision, so fp16 sees the same normalised values rounded once.
        x = ((x.float() - self.mean) / self.std).to(self.compute_dtype)
        logits = self.cls_head(self.backbone(x)).float().view(n, v, -1)
        if self.average_probs:
            return F.softmax(logits, dim=2).mean(dim=1)
        return F.softmax(logits.mean(dim=1), dim=1)
