"""Training speed per epoch, as the finetuning guide measures it: videos/s, the share of step time
spent waiting for data, and peak memory.

:class:`SpeedHook` times every training iteration the way mmengine's ``IterTimerHook`` does (the
wait for the next batch is the time between one iteration's end and the next one's start; a step
is that wait plus the iteration), on its own monotonic clock, and at each epoch's end logs

* ``videos_per_s``: videos of all processes (each rank's batches x world size) over the epoch's
  wall time (training only: validation is not in it);
* ``data_wait_share``: the part of the step time this process (rank 0) spent waiting for data, in
  [0, 1]: near 1, the loaders are the bottleneck (more ``--workers``, raw frames);
* peak memory: ``peak_gpu_mem_mb`` (``torch.cuda.max_memory_allocated`` over the epoch) on CUDA,
  ``peak_rss_mb`` (the training process's peak resident memory so far) on CPU.

The epochs' figures live on the message hub (``sfdeploy_speed``, saved in every checkpoint), so a
resumed run keeps those of the epochs before it; :func:`overall` sums them for
``finetune_summary.json`` (``speed``), which :class:`sfdeploy.train.hooks.SummaryHook` writes.
"""

from __future__ import annotations

import time
from typing import Any

from mmengine.hooks import Hook

#: the message hub's key for the per-epoch figures (kept in checkpoints: survives --resume)
HUB_KEY = "sfdeploy_speed"


def peak_memory_mb(cuda: bool) -> tuple[str, float]:
    """(field name, MB): torch's peak CUDA allocation on the current device since the last reset, or
    this process's peak RSS (Linux ``ru_maxrss`` is in KiB) on CPU."""
    if cuda:
        import torch

        return "peak_gpu_mem_mb", torch.cuda.max_memory_allocated() / 2**20
    import resource

    return "peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_LABELS = {"peak_gpu_mem_mb": "peak GPU memory (max_memory_allocated)", "peak_rss_mb": "peak RSS"}


def _batch_len(data_batch: Any, fallback: int) -> int:
    inputs = data_batch.get("inputs") if isinstance(data_batch, dict) else None
    return len(inputs) if inputs is not None else fallback


def overall(epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's figures from its epochs': videos over training time, data wait over step time, the
    highest peak. Empty without epochs."""
    if not epochs:
        return {}
    seconds = sum(e["train_s"] for e in epochs)
    steps = sum(e["step_s"] for e in epochs)
    out: dict[str, Any] = {
        "epochs_timed": len(epochs), "videos": sum(e["videos"] for e in epochs), "train_s": round(seconds, 3),
        "videos_per_s": round(sum(e["videos"] for e in epochs) / seconds, 3) if seconds > 0 else None,
        "data_wait_share": round(sum(e["data_wait_s"] for e in epochs) / steps, 4) if steps > 0 else None,
        "device": epochs[-1]["device"], "world_size": epochs[-1]["world_size"]}
    for key in ("peak_gpu_mem_mb", "peak_rss_mb"):
        values = [e[key] for e in epochs if key in e]
        if values:
            out[key] = max(values)
    return out


class SpeedHook(Hook):
    """Per-epoch videos/s, data-wait share and peak memory, logged and kept on the message hub (see
    the module docstring)."""

    priority = "NORMAL"  # before the checkpoint hook (VERY_LOW) saves the hub at the epoch's end

    def __init__(self) -> None:
        self._epochs: list[dict[str, Any]] = []
        self._device, self._cuda = "cpu", False

    def before_train(self, runner: Any) -> None:
        """Keep the figures of the epochs a resumed run already trained (its checkpoint's hub)."""
        kept = runner.message_hub.get_info(HUB_KEY, []) if runner.epoch > 0 else []
        self._epochs = [dict(e) for e in kept or [] if e.get("epoch", 0) <= runner.epoch]
        import torch

        self._cuda = torch.cuda.is_available()  # training runs where finetune puts it: the GPU when torch sees one
        self._device = f"cuda:{torch.cuda.current_device()}" if self._cuda else "cpu"

    def before_train_epoch(self, runner: Any) -> None:
        """Start the epoch's clocks (and the CUDA peak)."""
        if self._cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._start = self._mark = time.monotonic()
        self._data_s = self._step_s = 0.0
        self._iters = self._videos = 0

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        """The wait for this batch ends here."""
        self._data_s += time.monotonic() - self._mark

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        """One step done: count its videos (this rank's batch, as many on every rank)."""
        now = time.monotonic()
        self._step_s += now - self._mark
        self._mark = now
        self._iters += 1
        self._videos += _batch_len(data_batch, runner.train_dataloader.batch_size) * runner.world_size

    def after_train_epoch(self, runner: Any) -> None:
        """Log the epoch's figures and put them on the message hub before its checkpoint is written."""
        if self._cuda:
            import torch

            torch.cuda.synchronize()
        seconds = time.monotonic() - self._start
        name, peak = peak_memory_mb(self._cuda)
        entry = {"epoch": runner.epoch + 1, "iters": self._iters, "videos": self._videos,
                 "train_s": round(seconds, 3), "step_s": round(self._step_s, 3), "data_wait_s": round(self._data_s, 3),
                 "videos_per_s": round(self._videos / seconds, 3) if seconds > 0 else None,
                 "data_wait_share": round(min(1.0, self._data_s / self._step_s), 4) if self._step_s > 0 else None,
                 name: round(peak, 1), "device": self._device, "world_size": runner.world_size}
        self._epochs = [e for e in self._epochs if e["epoch"] != entry["epoch"]] + [entry]
        runner.message_hub.update_info(HUB_KEY, self._epochs, resumed=True)
        share = entry["data_wait_share"]
        runner.logger.info(f"epoch {entry['epoch']} speed: {entry['videos_per_s']} videos/s, data wait "
                           f"{share if share is None else f'{share:.0%}'} of step time, {_LABELS[name]} "
                           f"{peak:.0f} MB ({self._iters} iterations, {self._videos} videos, {seconds:.1f} s)")
