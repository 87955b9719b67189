"""Run the training of a prepared work dir: in this process, or as one torchrun worker.

``python -m sfdeploy.train.launch WORK`` is what ``finetune --gpus N`` starts N times per node
through ``torch.distributed.run``. Both paths run :func:`run_training` on ``WORK/config.py``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from sfdeploy.train.files import RUN_INFO

#: mmengine warnings about mmengine itself, on every run: kept in the log file, off a quiet console
HARMLESS_WARNINGS = ('"HardDiskBackend" is the alias of "LocalBackend"',)


def cpu_threads(local_processes: int, loader_workers: int) -> int:
    """Torch threads per training process on CPU: the cores shared between this machine's ranks
    and their data loader workers. Oversubscribed torch threads on a small machine make iteration
    times erratic (0.2 s -> 16 s seen on 2 cores)."""
    cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, local_processes) - loader_workers)


def _set_threads(loader_workers: int) -> None:
    import torch

    if torch.cuda.is_available():
        return
    # OMP_NUM_THREADS, when set (by the user, or for torchrun workers by `finetune` or torchrun), wins.
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else cpu_threads(1, loader_workers))


def _quiet_runner(cfg: object) -> object:
    """A Runner whose console shows warnings only (to stderr), with a progress bar instead.

    mmengine logs everything (the environment, the whole config, the hook table, every N
    iterations) to a stream handler on stdout and to ``WORK/<timestamp>/<timestamp>.log``; it logs
    the first of that while the Runner is built, so stdout is swapped for the build. The file log
    keeps everything."""
    import io
    import logging

    from mmengine.runner import Runner

    from sfdeploy.train.hooks import ProgressHook

    real, sys.stdout = sys.stdout, io.StringIO()
    try:
        runner = Runner.from_cfg(cfg)
    finally:
        sys.stdout = real
    for handler in runner.logger.handlers:
        if type(handler) is logging.StreamHandler:  # the console one (a FileHandler is a subclass)
            handler.setStream(sys.stderr)
            handler.setLevel(logging.WARNING)
            handler.addFilter(lambda record: not record.getMessage().startswith(HARMLESS_WARNINGS))
    runner.register_hook(ProgressHook())
    return runner


def run_training(work_dir: Path, *, console_log: bool = True) -> None:
    """Train from ``WORK/config.py`` (resuming when it says so) with sfdeploy's hooks.
    ``console_log=False``: mmengine's log goes to its file only; a progress bar shows the run."""
    import torch
    import torch.distributed as dist

    from sfdeploy.compat import ensure_mmaction, load_config
    from sfdeploy.train.hooks import GroupLRHook, PlainCheckpointHook, SummaryHook
    from sfdeploy.train.speed import SpeedHook

    work_dir = Path(work_dir)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world_size > 1
    if distributed and not torch.cuda.is_available() and not dist.is_initialized():
        # mmengine's init_dist would call torch.cuda.set_device; on CPU we start gloo ourselves.
        dist.init_process_group(backend="gloo")
    ensure_mmaction()
    from mmengine.runner import Runner

    cfg = load_config(work_dir / "config.py")
    cfg.launcher = "pytorch" if distributed else "none"
    _set_threads(int(cfg.train_dataloader.get("num_workers", 0)))
    run_info = json.loads((work_dir / RUN_INFO).read_text())
    try:
        runner = Runner.from_cfg(cfg) if console_log else _quiet_runner(cfg)
        runner.register_hook(PlainCheckpointHook())
        runner.register_hook(SummaryHook(run_info))
        runner.register_hook(GroupLRHook())
        runner.register_hook(SpeedHook())  # videos/s, data-wait share, peak memory per epoch (into the summary)
        runner.train()
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()  # else gloo may abort at interpreter exit


if __name__ == "__main__":
    run_training(Path(sys.argv[1]))
