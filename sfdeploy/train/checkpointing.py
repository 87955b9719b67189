"""``finetune --checkpointing``: MMAction2's activation checkpointing, with BatchNorm kept exact.

MMAction2's ResNet3d blocks (``with_cp=True``) run their convolutions under
``torch.utils.checkpoint``: the forward pass keeps only each block's input, and the backward pass
runs the block's forward again to get the activations it needs. The weights and the losses are
exactly those of a run without it. One side effect is not: the recomputation runs the block's
BatchNorm layers in training mode a second time, on the same input, so each running mean and
variance is updated twice per step (MMAction2 and torch leave it so). Two updates with momentum
``m'`` on the same batch statistics equal one update with ``m`` when ``(1 - m')**2 = 1 - m``;
:class:`CheckpointBatchNormHook` sets that momentum on the BatchNorm layers that run inside a
checkpointed block, so the running statistics (what validation, export and serving use) are those
of a run without checkpointing. ``num_batches_tracked`` still counts each batch twice; it is
only read with ``momentum=None`` (a cumulative average, which counting every batch twice does not
change).

Imported by WORK/config.py through ``custom_imports`` when ``--checkpointing`` is used.
"""

from __future__ import annotations

import math
from typing import Any

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


def twice_momentum(momentum: float) -> float:
    """The momentum whose two updates on the same statistics equal one update with ``momentum``."""
    return 1.0 - math.sqrt(1.0 - momentum)


def recomputed_batchnorms(model: Any) -> list[Any]:
    """The BatchNorm layers that run inside a checkpointed block (MMAction2's ``BasicBlock3d`` /
    ``Bottleneck3d`` with ``with_cp``): conv1..conv3 and the downsample; not a block's non-local
    module, which runs after the checkpointed part."""
    from mmaction.models.backbones.resnet3d import BasicBlock3d, Bottleneck3d
    from torch.nn.modules.batchnorm import _BatchNorm

    found = []
    for block in model.modules():
        if isinstance(block, (BasicBlock3d, Bottleneck3d)) and block.with_cp:
            outside = {id(m) for m in block.non_local_block.modules()} if block.non_local else set()
            found += [m for m in block.modules() if isinstance(m, _BatchNorm) and id(m) not in outside]
    return found


@HOOKS.register_module()
class CheckpointBatchNormHook(Hook):
    """Before training, give every BatchNorm recomputed by activation checkpointing the momentum
    that makes its two updates per step equal one (see the module docstring)."""

    priority = "HIGH"

    def before_train(self, runner: Any) -> None:
        """Adjust the momentum of every recomputed BatchNorm once, before the first step, and log how
        many."""
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        layers = [bn for bn in recomputed_batchnorms(model) if bn.momentum is not None]
        for bn in layers:
            bn.momentum = twice_momentum(bn.momentum)
        runner.logger.info(f"activation checkpointing: {len(layers)} BatchNorm layers are updated twice per step "
                           "(forward and recomputation); their momentum is set so that the two updates equal one")
