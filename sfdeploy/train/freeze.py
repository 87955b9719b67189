"""Head-only training and gradual unfreezing: ``finetune --freeze-backbone`` / ``--unfreeze-after N``.

Imported by WORK/config.py through ``custom_imports`` (only when one of the two is used), so that
mmengine can build ``custom_hooks=[dict(type='BackboneFreezeHook', unfreeze_after=N)]``.
"""

from __future__ import annotations

from typing import Any

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class BackboneFreezeHook(Hook):
    """Freeze ``model.backbone`` (no gradients, BatchNorm in eval mode so its running statistics
    stay as pretrained) for the whole run, or for the first ``unfreeze_after`` epochs, after which
    the whole model trains and the LR schedule simply continues.

    Why a hook that freezes in ``before_train`` rather than at model construction: mmengine's
    optimizer constructor drops parameters that do not require gradients, so a backbone frozen
    before the optimizer is built could never be unfrozen. Frozen here, the backbone's parameters
    are in the optimizer but get no gradient, and PyTorch optimizers skip parameters whose
    ``.grad`` is None (no step, no weight decay): the tensors stay bit-identical. Under DDP the
    config sets ``find_unused_parameters`` so that the reducer does not wait for their gradients.
    The state is derived from ``runner.epoch``, so ``--resume`` lands in the right phase.
    """

    priority = "HIGH"

    def __init__(self, unfreeze_after: int | None = None) -> None:
        self.unfreeze_after = unfreeze_after
        self.frozen = False

    @staticmethod
    def _backbone(runner: Any) -> Any:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        return model.backbone

    def _should_freeze(self, epoch: int) -> bool:
        return self.unfreeze_after is None or epoch < self.unfreeze_after

    def _set(self, runner: Any, frozen: bool) -> None:
        set_backbone_frozen(self._backbone(runner), frozen)
        self.frozen = frozen

    def before_train(self, runner: Any) -> None:
        """Freeze the backbone when the run (or a resumed one) starts in the frozen phase."""
        frozen = self._should_freeze(runner.epoch)
        self._set(runner, frozen)
        if frozen:
            until = "for the whole run" if self.unfreeze_after is None else f"until epoch {self.unfreeze_after}"
            runner.logger.info(f"backbone frozen {until}: training the head only")

    def before_train_epoch(self, runner: Any) -> None:
        """Unfreeze the backbone at the first epoch past ``unfreeze_after``."""
        if self.frozen and not self._should_freeze(runner.epoch):
            self._set(runner, False)
            runner.logger.info(f"epoch {runner.epoch + 1}: backbone unfrozen, training the whole model")

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        """Keep a frozen backbone in eval mode: the train loop puts the model back in training mode
        at each epoch start, which would let BatchNorm update its running statistics."""
        if self.frozen:
            backbone = self._backbone(runner)
            if backbone.training:
                backbone.eval()


def set_backbone_frozen(backbone: Any, frozen: bool) -> None:
    """Frozen: no gradients for the backbone's parameters and its BatchNorm in eval mode (running
    statistics kept); unfrozen: gradients again (the train loop sets the mode)."""
    for param in backbone.parameters():
        param.requires_grad_(not frozen)
    if frozen:
        backbone.eval()
