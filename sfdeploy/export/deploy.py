"""The deployable SlowFast: raw uint8 frames in, class probabilities out.

Everything a client would otherwise have to get exactly right lives inside the graph: the cast,
the mean/std normalisation, the channel and axis layout, the slow/fast temporal split (done by
``ResNet3dSlowFast`` itself) and the averaging over views. A client only decodes, samples,
resizes and crops (see :mod:`sfdeploy.decode.clips`), which it must do anyway to make a batch.

Input ``frames``: ``uint8 [N, V, T, H, W, 3]``, RGB, N clips in the batch (dynamic), V views of
the same video. Output ``probs``: ``float32 [N, num_classes]``, the MMAction2 test-time result:
with ``average_clips='prob'`` the mean over views of the per-view softmax, with ``'score'`` the
softmax of the mean logits (MMAction2 returns the mean logits; the manifest records which).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class SlowFastDeploy(nn.Module):
    """Wraps a trained MMAction2 ``Recognizer3D`` (its backbone and head, not patched).

    ``input_channels`` > 3: the normalised input gets zero channels appended for stems whose
    weights were zero-padded (:func:`sfdeploy.export.rewrites.pad_stems`); ``channels_last``: the
    input reaches the backbone laid out NTHWC (a view of the frames' own layout, no copy)."""

    def __init__(self, recognizer: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 compute_dtype: torch.dtype = torch.float32, *, input_channels: int = 3,
                 channels_last: bool = False) -> None:
        super().__init__()
        averaging = recognizer.cls_head.average_clips
        if averaging not in ("prob", "score"):
            raise ValueError(f"cls_head.average_clips={averaging!r}: sfdeploy needs 'prob' or 'score'")
        self.backbone = recognizer.backbone
        self.cls_head = recognizer.cls_head
        self.average_probs = averaging == "prob"
        self.compute_dtype = compute_dtype
        self.pad_channels = input_channels - 3
        self.channels_last = channels_last
        # [1, 3, 1, 1, 1]: broadcast over N*V, T, H, W of the NCTHW layout the backbone takes.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1, 1))

    def _normalise(self, frames: torch.Tensor) -> torch.Tensor:
        # [N, V, T, H, W, 3] -> [N*V, 3, T, H, W]: views become batch entries, as MMAction2's
        # Recognizer3D does with its num_segs axis.
        x = frames.flatten(0, 1).permute(0, 4, 1, 2, 3)
        # Normalise in float32 exactly as ActionDataPreprocessor does; only then drop to the
        # compute precision, so fp16 sees the same normalised values rounded once.
        x = ((x.float() - self.mean) / self.std).to(self.compute_dtype)
        if self.pad_channels:  # zero channels for the zero weights of the padded stems
            x = torch.cat([x, x.new_zeros(x.shape[0], self.pad_channels, *x.shape[2:])], dim=1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames ``[N, V, T, H, W, 3]`` -> float32 probabilities ``[N, classes]``: normalise, backbone,
        head, softmax, averaged over the V views as the config averages."""
        n, v = frames.shape[0], frames.shape[1]
        logits = self.cls_head(self.backbone(self._normalise(frames))).float().view(n, v, -1)
        if self.average_probs:
            return F.softmax(logits, dim=2).mean(dim=1)
        return F.softmax(logits.mean(dim=1), dim=1)


def deploy_module(recognizer: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                  dtype: torch.dtype = torch.float32, device: str = "cpu", rewrites: Any = None
                  ) -> tuple[SlowFastDeploy, dict[str, int]]:
    """The deploy module of a *copy* of ``recognizer`` in ``dtype`` on ``device``, with
    ``rewrites`` (a :class:`sfdeploy.export.rewrites.Rewrites`; None: the plain graph) applied;
    returns it and what each rewrite changed. The one place export and bench make it."""
    import copy

    from sfdeploy.export.rewrites import Rewrites, apply

    rewrites = rewrites or Rewrites.none()
    model = copy.deepcopy(recognizer).eval()
    counts = apply(model, rewrites)  # in fp32 on the CPU copy: BN folding computes in float64 anyway
    model = model.to(device=device, dtype=dtype)
    if rewrites.channels_last:  # .to() keeps strides, but re-apply after a dtype change to be sure
        from sfdeploy.export.rewrites import to_channels_last

        to_channels_last(model.backbone)
    module = SlowFastDeploy(model, mean, std, compute_dtype=dtype, input_channels=rewrites.input_channels,
                            channels_last=rewrites.channels_last).eval().to(device)
    return module, counts
