"""mmengine hooks that sfdeploy registers on its Runner (in code, not in WORK/config.py).

* :class:`PlainCheckpointHook` makes checkpoints loadable with ``torch.load(weights_only=True)``
  (see :mod:`sfdeploy.compat`, trap 2): on save it turns the message hub's ``HistoryBuffer``
  objects and numpy values into lists, numbers and tensors; on load (resume) it turns them back.
* :class:`SummaryHook` records val accuracy per epoch (in ``WORK/val_history.json``: the epoch
  checkpoint is written before that epoch's validation, so the message hub would miss it) and
  the elapsed time (in the message hub, so it survives ``--resume``), and writes
  ``WORK/finetune_summary.json`` when the run ends (with the training speed per epoch and overall that
  :class:`sfdeploy.train.speed.SpeedHook` keeps on the message hub).
* :class:`GroupLRHook` logs the learning rate of each top-level module (``train/lr_backbone``,
  ``train/lr_cls_head``) to the log and TensorBoard; mmengine logs the first parameter group's only,
  which hides ``--backbone-lr-mult``.
* :class:`ProgressHook` shows the run as one progress bar (iterations, epoch, loss, val top-1) when
  the console is quiet (``sfdeploy demo``: mmengine's log goes to its file only).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer

from sfdeploy.train.files import SUMMARY_FILE
from sfdeploy.train.speed import HUB_KEY as SPEED_KEY
from sfdeploy.train.speed import overall as overall_speed

_BUFFER_TAG = "__sfdeploy_history_buffer__"
HISTORY_FILE = "val_history.json"


def to_plain(value: Any) -> Any:
    """numpy arrays -> tensors, numpy scalars -> Python numbers, recursively through containers."""
    import numpy as np
    import torch

    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return type(value)((k, to_plain(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v) for v in value)
    return value


class PlainCheckpointHook(Hook):
    """Keeps checkpoints loadable with ``torch.load(weights_only=True)``: plain lists, numbers and
    tensors in the file, mmengine's objects rebuilt on resume (see the module docstring)."""

    priority = "VERY_LOW"  # after other hooks have added to the checkpoint

    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        """Turn the message hub's ``HistoryBuffer`` objects into tagged plain dicts and numpy values
        into numbers and tensors, in place, before mmengine writes the checkpoint."""
        hub = checkpoint.get("message_hub")
        if hub and "log_scalars" in hub:
            hub["log_scalars"] = {
                key: {_BUFFER_TAG: True, "log": buf._log_history.tolist(),
                      "count": buf._count_history.tolist(), "max_length": int(buf.max_length)}
                for key, buf in hub["log_scalars"].items()
            }
        for key in list(checkpoint):
            checkpoint[key] = to_plain(checkpoint[key])

    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        """Rebuild the ``HistoryBuffer`` objects :meth:`before_save_checkpoint` flattened, so a
        resumed run's log and schedulers see what they saved."""
        hub = checkpoint.get("message_hub")
        if not hub or "log_scalars" not in hub:
            return
        hub["log_scalars"] = {
            key: HistoryBuffer(value["log"], value["count"], value["max_length"])
            if isinstance(value, dict) and value.get(_BUFFER_TAG) else value
            for key, value in hub["log_scalars"].items()
        }


class GroupLRHook(Hook):
    """Per-module learning rates as ``train/lr_<module>`` scalars (LoggerHook writes every
    ``train/`` scalar of the message hub to the log and the visualizer backends)."""

    priority = "NORMAL"  # after RuntimeInfoHook, before LoggerHook writes (after_train_iter)

    def __init__(self) -> None:
        self._groups: dict[str, dict] = {}

    def before_train(self, runner: Any) -> None:
        """Note the first parameter group of each top-level module (the live dict, which the LR
        schedulers update); with several optimizers there is nothing to add."""
        from mmengine.model import is_model_wrapper
        from mmengine.optim import OptimWrapper

        if not isinstance(runner.optim_wrapper, OptimWrapper):
            return  # several optimizers: each already names its own LR
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        owner = {id(p): name.split(".", 1)[0] for name, p in model.named_parameters()}
        for group in runner.optim_wrapper.optimizer.param_groups:
            for param in group["params"]:
                if id(param) in owner:  # the first group of each module; the live dict (schedulers set "lr")
                    self._groups.setdefault(owner[id(param)], group)

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        """Put each module's current learning rate on the message hub for the logger."""
        for module, group in self._groups.items():
            runner.message_hub.update_scalar(f"train/lr_{module}", group["lr"])


class ProgressHook(Hook):
    """One progress bar for the whole run on stderr: iterations done, the epoch, the last loss and
    val top-1. What a quiet console shows instead of mmengine's per-iteration lines."""

    priority = "LOW"

    def __init__(self) -> None:
        self.shown: Any = None
        self.top1: float | None = None

    def before_train(self, runner: Any) -> None:
        """Open the bar over every iteration of the run, already advanced to where a resumed run
        starts."""
        from sfdeploy.progress import bar

        total = runner.max_epochs * len(runner.train_dataloader)
        self.shown = bar(total, desc="finetune", unit="it")
        self.shown.update(min(total, runner.iter))  # a resumed run starts where it stopped

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        """Advance the bar by one iteration, showing the epoch, this iteration's loss and the last
        val top-1."""
        loss = (outputs or {}).get("loss")
        facts = f"epoch {runner.epoch + 1}/{runner.max_epochs}"
        if loss is not None:
            facts += f", loss {loss.detach().item() if hasattr(loss, 'detach') else float(loss):.3f}"
        if self.top1 is not None:
            facts += f", val top-1 {self.top1:.0%}"
        self.shown.set_postfix_str(facts, refresh=False)
        self.shown.update(1)

    def after_val_epoch(self, runner: Any, metrics: dict[str, float] | None = None) -> None:
        """Remember the val top-1, shown from the next iteration on."""
        if metrics and "acc/top1" in metrics:
            self.top1 = float(metrics["acc/top1"])

    def after_train(self, runner: Any) -> None:
        """Close the bar (the console is the CLI's again)."""
        if self.shown is not None:
            self.shown.close()


class SummaryHook(Hook):
    """Writes ``finetune_summary.json``; ``run_info`` holds what the Runner does not know
    (preset, class names, pretrained report)."""

    priority = "LOW"

    def __init__(self, run_info: dict[str, Any]):
        self.run_info = run_info
        self._segment_start = 0.0
        self._resumed = False
        self._validate_resumed = False

    def before_train(self, runner: Any) -> None:
        """Start the clock, continuing a resumed run's elapsed time and val history from where its
        checkpoint was; runs after the resume has loaded it (``runner.epoch`` is where training
        restarts)."""
        self._segment_start = time.monotonic()
        self._resumed = runner.epoch > 0
        self._base = float(runner.message_hub.get_info("sfdeploy_elapsed_s", 0.0)) if self._resumed else 0.0
        self._history_path = Path(runner.work_dir) / HISTORY_FILE
        self._history: list[dict[str, Any]] = []
        if self._resumed and self._history_path.is_file():
            kept = json.loads(self._history_path.read_text())
            self._history = [h for h in kept if h["epoch"] <= runner.epoch]
        self._validate_resumed = self._resumed and not any(h["epoch"] == runner.epoch for h in self._history)

    def before_train_epoch(self, runner: Any) -> None:
        """Validate the resumed epoch's weights first when its validation was interrupted: the epoch
        checkpoint is written before that epoch's validation, so a run killed in between would never
        validate (nor consider as best) the weights it resumes from. Here, not in ``before_train``,
        so that every hook (the checkpoint hook's best tracking) is set up."""
        if self._validate_resumed and runner.val_loop is not None:
            self._validate_resumed = False
            runner.logger.info(f"validating resumed epoch {runner.epoch}: its validation was interrupted")
            runner.val_loop.run()

    def _elapsed(self) -> float:
        return self._base + time.monotonic() - self._segment_start

    def after_train_epoch(self, runner: Any) -> None:
        """Store the elapsed time on the message hub before this epoch's checkpoint is written (the
        checkpoint hook runs after), so that a resumed run continues the clock from here."""
        runner.message_hub.update_info("sfdeploy_elapsed_s", self._elapsed(), resumed=True)

    def after_val_epoch(self, runner: Any, metrics: dict[str, float] | None = None) -> None:
        """Append this epoch's metrics to ``WORK/val_history.json`` (rank 0), written at once so that
        a killed run keeps them."""
        if not metrics or runner.rank != 0:
            return
        self._history.append({"epoch": runner.epoch, **{k: float(v) for k, v in metrics.items()}})
        self._history_path.write_text(json.dumps(self._history, indent=1) + "\n")

    def _overfit_result(self, top1: list[float]) -> dict[str, Any]:
        overfit = self.run_info.get("overfit")
        if not overfit:
            return {}
        return {"overfit": {**overfit, "reached_100": bool(top1) and max(top1) >= 1.0}}

    def after_run(self, runner: Any) -> None:
        """Write ``WORK/finetune_summary.json`` (rank 0): the run's facts, its best and last val
        top-1, the best checkpoint, epochs run, wall time, training speed (per epoch and overall) and the
        val history."""
        if runner.rank != 0:
            return
        hub = runner.message_hub
        history = self._history
        best = hub.get_info("best_ckpt")
        best_score = hub.get_info("best_score")
        top1 = [h.get("acc/top1") for h in history if "acc/top1" in h]
        max_epochs = runner.max_epochs
        speed = list(hub.get_info(SPEED_KEY, None) or [])
        summary = {
            **self.run_info,
            "best_top1": float(best_score) if best_score is not None else (max(top1) if top1 else None),
            "best_checkpoint": str(Path(best).resolve()) if best else None,
            "last_top1": top1[-1] if top1 else None,
            "epochs": max_epochs,
            "epochs_run": runner.epoch,
            "stopped_early": runner.epoch < max_epochs,
            "resumed": self._resumed,
            "world_size": runner.world_size,
            "wall_time_s": round(self._elapsed(), 2),
            "speed": {**overall_speed(speed), "epochs": speed},
            "val_history": history,
            **self._overfit_result(top1),
            "work_dir": str(Path(runner.work_dir).resolve()),
            "log": str((Path(runner.log_dir) / f"{runner.timestamp}.log").resolve()),  # mmengine's, in full
        }
        path = Path(runner.work_dir) / SUMMARY_FILE
        path.write_text(json.dumps(summary, indent=2) + "\n")
