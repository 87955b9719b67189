"""Graph rewrites between "wrap" and "trace": the same function, in the shape the hardware likes.

The deployable graph is ours (:mod:`sfdeploy.export.deploy`), so it may be exported in whatever
form runs fastest on the device that serves it, as long as every output stays the same. Each
rewrite below is one small, named step on a *copy* of the trained recognizer, exact in real
arithmetic (fp32 results move only by summation order, ~1e-6 relative), and every artifact made
with them still passes the parity gate against the untouched MMAction2 model. The steps applied
are recorded in ``manifest.json`` per artifact (``rewrites``).

Why each one, from profiles of SlowFast R50 (``benchmarks/``):

* ``fold_bn``: an inference BatchNorm is a per-channel affine map; folded into the convolution
  before it (``w' = w * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta``,
  computed in float64) it costs nothing. On an H200 in fp16 the separate BN kernels were 12% of
  the time.
* ``frame_conv2d``: a ``(1, k, k)`` Conv3d (most of SlowFast's convolutions) is a 2-D convolution
  applied to every frame: cuDNN's 2-D kernels are its most tuned, and with channels-last
  activations the fold is a view (no copy). (On the CPU PyTorch once ran such 3-D convolutions in
  its reference kernel, ``slow_conv3d_forward``; with two threads it takes oneDNN's path, and the
  runtime's optimize_for_inference does better without the rewrite: see :meth:`Rewrites.for_device`.)
* ``pad_stem``: the two stem convolutions read 3 input channels; cuDNN's fast fp16 kernels want a
  multiple of 4 (8): with 3 the fast pathway's 5x7x7 stem alone was 48% of the fp16 time on an
  H200 (30.6 ms at batch 32), with the input zero-padded to 4 channels and zero weights for the
  extra channel 6.45 ms (3.82 channels-last). The zero channel is appended where the normalised
  input is made, inside the graph. Slower on the CPU (29.8 -> 37.7 ms): GPU only.
* ``channels_last``: cuDNN's tensor-core kernels work in NDHWC; with NCDHW tensors it transposes
  around every convolution (18% of the fp16 time). Weights and the input are laid out
  channels-last; ``Module.to(memory_format=...)`` refuses MMAction2's recognizer (it has non-5-D
  buffers), so only the 4-D/5-D conv weights are converted.

Which steps run is a :class:`Rewrites` value: :meth:`Rewrites.for_device` is the measured choice
per device, ``Rewrites.none()`` the plain graph (the benchmark shows both side by side).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sfdeploy.device import Device

STEPS = ("fold_bn", "frame_conv2d", "pad_stem", "channels_last")
STEM_CHANNELS = 4  # what the padded stems read: the smallest multiple of 4 above RGB's 3


@dataclass(frozen=True)
class Rewrites:
    """Which rewrites an artifact is made with (see the module docstring for each)."""

    fold_bn: bool = False
    frame_conv2d: bool = False
    pad_stem: bool = False
    channels_last: bool = False

    @classmethod
    def none(cls) -> Rewrites:
        """The plain graph (no rewrite): what the CPU runs best, and the benchmark's reference."""
        return cls()

    @classmethod
    def for_device(cls, device: str | Device) -> Rewrites:
        """The measured choice: everything on a GPU (H200, R50 fp16 batch 32, eager: 480 -> 1,114
        clips/s); none on the CPU, where the TorchScript runtime's own freeze + optimize_for_inference
        (oneDNN's prepacked weights, conv+BN folding, conv+ReLU fusion; :mod:`sfdeploy.runtime.torchscript`)
        does better on the plain graph than on a rewritten one, whose reshapes around the 2-D
        convolutions break oneDNN's layout chain. R50 batch 1, one thread, CPU time, 2026-12-04:
        plain 1,090 ms, rewritten 974, plain optimised 684, rewritten optimised 876 (slowfast_tiny
        batch 8: 64.5 / 62.7 / 54.1 / 59.4)."""
        if Device(device).is_cuda:
            return cls(fold_bn=True, frame_conv2d=True, pad_stem=True, channels_last=True)
        return cls()

    @classmethod
    def parse(cls, names: list[str] | tuple[str, ...]) -> Rewrites:
        """The rewrites named (``--rewrites fold_bn,pad_stem``), refused when one is unknown."""
        unknown = [n for n in names if n not in STEPS]
        if unknown:
            raise ValueError(f"unknown rewrite(s) {', '.join(unknown)}; known: {', '.join(STEPS)}")
        return cls(**{n: True for n in names})

    @property
    def names(self) -> list[str]:
        """The steps on, in :data:`STEPS` order (what the manifest records)."""
        return [f.name for f in fields(self) if getattr(self, f.name)]

    @property
    def input_channels(self) -> int:
        """The channels the stem convolutions read: 4 with ``pad_stem`` (zero-padded RGB), else 3."""
        return STEM_CHANNELS if self.pad_stem else 3


class FrameConv2d(nn.Module):
    """A ``(1, kh, kw)`` Conv3d run as a Conv2d over every frame: ``[N, C, T, H, W]`` ->
    ``[N*T, C, H, W]`` -> conv2d -> back. For channels-last (NTHWC) activations both reshapes are
    views; for NCTHW ones they copy (still faster than the 3-D reference kernel on the CPU)."""

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach()[:, :, 0].clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.stride = tuple(conv.stride[1:])
        self.padding = tuple(conv.padding[1:])
        self.dilation = tuple(conv.dilation[1:])
        self.groups = conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The 3-D convolution's output, computed by one 2-D convolution over every frame."""
        n, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(n * t, c, h, w)
        y = F.conv2d(frames, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return y.reshape(n, t, y.shape[1], y.shape[2], y.shape[3]).transpose(1, 2)


def _is_frame_conv(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv3d) and conv.kernel_size[0] == 1 and conv.stride[0] == 1
            and conv.padding[0] == 0 and conv.dilation[0] == 1 and conv.padding_mode == "zeros")


def fold_batchnorm(root: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a convolution inside an mmcv
    ``ConvModule`` (every BN of MMAction2's ResNet3d family) into that convolution; returns how
    many were folded."""
    from mmcv.cnn import ConvModule

    folded = 0
    for module in root.modules():
        if not (isinstance(module, ConvModule) and module.with_norm):
            continue
        order = list(module.order)
        bn = module.norm
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or order.index("norm") != order.index("conv") + 1:
            continue
        if bn.training or not bn.track_running_stats:
            raise ValueError("fold_bn needs eval-mode BatchNorms with running statistics")
        conv = module.conv
        with torch.no_grad():
            scale = (bn.weight.double() if bn.affine else torch.ones_like(bn.running_var, dtype=torch.float64)) \
                / torch.sqrt(bn.running_var.double() + bn.eps)
            shift = bn.bias.double() if bn.affine else torch.zeros_like(scale)
            bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
            weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
            conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
            conv.bias = nn.Parameter(((bias - bn.running_mean.double()) * scale + shift).to(conv.weight.dtype),
                                     requires_grad=False)
        setattr(module, module.norm_name, nn.Identity())
        folded += 1
    return folded


def frame_convs_to_2d(root: nn.Module) -> int:
    """Replace every ``(1, k, k)`` Conv3d (stride 1 and no padding in time) by :class:`FrameConv2d`."""
    replaced = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if _is_frame_conv(child):
                setattr(parent, name, FrameConv2d(child))
                replaced += 1
    return replaced


def stems(backbone: nn.Module) -> list[nn.Conv3d]:
    """The convolutions that read the network input: each pathway's ``conv1`` (SlowFast), or the
    backbone's own ``conv1`` (a single-pathway ResNet3d)."""
    owners = [getattr(backbone, p) for p in ("slow_path", "fast_path") if hasattr(backbone, p)] or [backbone]
    convs = []
    for owner in owners:
        conv = getattr(getattr(owner, "conv1", None), "conv", None)
        if not isinstance(conv, nn.Conv3d) or conv.in_channels != 3:
            raise ValueError(f"pad_stem: no 3-channel conv1 found in {type(owner).__name__}")
        convs.append(conv)
    return convs


def pad_stems(backbone: nn.Module, channels: int = STEM_CHANNELS) -> int:
    """Give each stem convolution ``channels`` input channels, the extra ones with zero weights:
    fed the input with zero channels appended, it computes exactly what it did."""
    convs = stems(backbone)
    for conv in convs:
        with torch.no_grad():
            extra = torch.zeros(conv.out_channels, channels - conv.in_channels, *conv.weight.shape[2:],
                                dtype=conv.weight.dtype, device=conv.weight.device)
            conv.weight = nn.Parameter(torch.cat([conv.weight, extra], dim=1), requires_grad=False)
        conv.in_channels = channels
    return len(convs)


def to_channels_last(root: nn.Module) -> int:
    """Lay out every 4-D and 5-D convolution weight channels-last (the activations follow the
    input's layout through the convolutions)."""
    converted = 0
    for module in root.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Conv3d, nn.Conv2d, FrameConv2d)) and isinstance(weight, torch.Tensor):
            fmt = torch.channels_last_3d if weight.dim() == 5 else torch.channels_last
            module.weight = nn.Parameter(weight.detach().contiguous(memory_format=fmt), requires_grad=False)
            converted += 1
    return converted


def apply(recognizer: Any, rewrites: Rewrites) -> dict[str, int]:
    """Apply ``rewrites`` to ``recognizer`` (in eval mode; changed in place: pass a copy) and
    return how many layers each step changed (recorded in the manifest)."""
    counts: dict[str, int] = {}
    if rewrites.fold_bn:
        counts["fold_bn"] = fold_batchnorm(recognizer.backbone)
    if rewrites.pad_stem:  # before frame_conv2d, which may replace the slow stem (1x7x7)
        counts["pad_stem"] = pad_stems(recognizer.backbone)
    if rewrites.frame_conv2d:
        counts["frame_conv2d"] = frame_convs_to_2d(recognizer.backbone)
    if rewrites.channels_last:
        counts["channels_last"] = to_channels_last(recognizer.backbone)
    return counts
