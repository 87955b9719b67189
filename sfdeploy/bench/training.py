"""``bench --stage train``: training speed as the finetuning guide measures it (videos/s, the share
of step time spent waiting for data, peak memory), through the real ``finetune`` path.

Each measured row is a ``finetune`` run (:func:`sfdeploy.train.run.finetune`, in this process) of
the profile's preset (small: ``slowfast_tiny``; full: ``slowfast_r50_4x16``) from random weights
(``--pretrained none``) on synthetic videos (small: ``data synth``'s defaults; full: 320 px, as a
GPU host's videos would be), at batch 8 (or the largest of ``--batch-sizes`` without 8 in them):
two epochs of ``--iters`` steps each (the train set is ``iters x batch`` videos, the val set one per
class). The first epoch is the warm-up (loader workers starting, cuDNN choosing its algorithms);
the row is the second epoch's figures from ``finetune_summary.json`` (``speed``), the first's kept
beside them. On CUDA fp32 and ``--amp`` (row precision ``amp``); on a CPU fp32.

Beside them, from the same videos:

* ``rawframes``: the preset trained on ``data prepare --rawframes`` of them, with the disk each
  form takes (``disk_bytes``: the videos, or their JPEG frames);
* the guide's data-loading levers (small profile, unless ``--workers`` fixes the loader workers):
  workers 0, 1, 2, with persistent workers on and off (``finetune``'s defaults were set from these);
* the guide's own table as **reference** rows (other hardware, not measured here, ``reference``
  true): SlowFast R50 at batch 8, ~40 videos/s on an RTX 3090 and ~35 on a V100; batch 4, ~18 on a
  2080 Ti.

The synthetic sets and prepared DATA folders are made once in ``<record>.work/train`` and kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from sfdeploy.bench import suites
from sfdeploy.bench.context import Context
from sfdeploy.bench.model import PROFILES
from sfdeploy.bench.rows import FAILED, SKIPPED
from sfdeploy.bench.stages import Task

STAGE = "train"
KIND = "train"
EPOCHS = 2  # the first is the warm-up; the row is the last one's
TRAIN_BATCH = 8
R50_VIDEO_SIZE = 320  # px, the GPU issue's synthetic videos for R50
#: the finetuning guide's table: (row name, GPU, batch, videos/s, GPU memory GB); SlowFast R50 4x16
REFERENCE = (("reference:rtx-3090", "NVIDIA GeForce RTX 3090", 8, 40.0, 16),
             ("reference:v100", "NVIDIA V100", 8, 35.0, 14),
             ("reference:rtx-2080ti", "NVIDIA GeForce RTX 2080 Ti", 4, 18.0, 10))
#: the loader levers measured on the small profile: (workers, persistent workers)
LOADER_LEVERS = ((0, False), (1, False), (1, True), (2, False), (2, True))


def train_batch(c: Context) -> int:
    """The batch the training rows use: 8, unless ``--batch-sizes`` leaves it out (then its largest)."""
    return TRAIN_BATCH if TRAIN_BATCH in c.opts.batch_sizes else max(c.opts.batch_sizes)


def _synth_root(c: Context, preset: str, batch: int) -> Path:
    """A pre-split root (train/ + val/) of synthetic videos: ``iters x batch`` to train on, one per
    class to validate on; made once (its hints file is written last)."""
    from sfdeploy.data.synth import HINTS_JSON, SynthOptions, synthesize

    full = preset != PROFILES["small"][0]
    size = R50_VIDEO_SIZE if full else SynthOptions.size
    frames = max(SynthOptions.frames, c.model.spec.min_frames)
    per_class = -(-c.opts.iters * batch // SynthOptions.classes)
    root = c.work / STAGE / f"videos-{size}px-{frames}f-{per_class}"
    if not (root / "val" / HINTS_JSON).is_file():
        shutil.rmtree(root, ignore_errors=True)
        synthesize(root / "train", SynthOptions(per_class=per_class, frames=frames, size=size), show_progress=False)
        synthesize(root / "val", SynthOptions(per_class=1, frames=frames, size=size, seed=1), show_progress=False)
    return root


def _data(c: Context, preset: str, batch: int, rawframes: bool) -> tuple[Path, int]:
    """DATA for the rows (video or rawframes lists of the same videos), made once; and its media's bytes."""
    from sfdeploy.data.prepare import prepare

    root = _synth_root(c, preset, batch)
    out = root.with_name(root.name + ("-rawframes" if rawframes else "-data"))
    report = out / "prepare_report.json"
    if not (out / "dataset.json").is_file():
        prepare(root, out, seed=0, workers=c.workers, show_progress=False, rawframes=rawframes)
    if rawframes:
        return out, int(json.loads(report.read_text())["rawframes"]["bytes"])
    return out, sum(p.stat().st_size for p in root.rglob("*.mp4"))


def _finetune_row(c: Context, backend: str, precision: str, batch: int, *, rawframes: bool = False,
                  workers: int | None = None, persistent: bool | None = None) -> dict[str, Any]:
    """One ``finetune`` run, as a row of its last epoch's speed."""
    from sfdeploy.data.layout import PreparedData
    from sfdeploy.train.config import use_cuda
    from sfdeploy.train.options import FinetuneOptions
    from sfdeploy.train.run import finetune

    preset = PROFILES[c.opts.profile][0]
    if c.device.is_cuda != use_cuda():
        return suites.unmeasured_row(STAGE, backend, precision, batch, 1, SKIPPED, f"finetune trains on "
                                     f"{'CUDA' if use_cuda() else 'the CPU'} here, the run asks for {c.device}",
                                     kind=KIND)
    c.release()
    data, disk = _data(c, preset, batch, rawframes)
    run = c.work / STAGE / "runs" / backend.replace(":", "_").replace(" ", "_").replace("=", "") / precision
    shutil.rmtree(run, ignore_errors=True)
    extra = {} if persistent is None else {f"{s}_dataloader.persistent_workers": persistent
                                           for s in ("train", "val", "test")}
    opts = FinetuneOptions(work_dir=run, preset=preset, epochs=EPOCHS, batch_size=batch, pretrained="none",
                           amp=precision == "amp", workers=workers if workers is not None else c.opts.workers,
                           cfg_options=extra)
    try:
        summary = finetune(PreparedData.from_dir(data), opts, console_log=False)
    except Exception as exc:  # noqa: BLE001 - a failed run (out of memory, ...) is a row saying why
        return suites.unmeasured_row(STAGE, backend, precision, batch, 1, FAILED, f"{type(exc).__name__}: {exc}",
                                     kind=KIND)
    return _row(backend, precision, batch, summary, disk, rawframes)


def _row(backend: str, precision: str, batch: int, summary: dict[str, Any], disk: int, rawframes: bool
         ) -> dict[str, Any]:
    speed = summary["speed"]
    last, first = speed["epochs"][-1], speed["epochs"][0]
    cuda = "peak_gpu_mem_mb" in last
    config = _loader_facts(summary)
    return {"stage": STAGE, "backend": backend, "precision": precision, "batch": batch, "concurrency": 1,
            "kind": KIND, "status": "ok", "reference": False, "preset": summary["preset"],
            "videos_per_s": last["videos_per_s"], "data_wait_share": last["data_wait_share"],
            "peak_mem_mb": last.get("peak_gpu_mem_mb", last.get("peak_rss_mb")),
            "peak_mem_what": "torch.cuda.max_memory_allocated" if cuda else "peak RSS of the process that trained "
                             "(the bench's own: finetune runs in it)",
            "device": last["device"], "steps": last["iters"], "videos": last["videos"],
            "first_epoch": {k: first.get(k) for k in ("videos_per_s", "data_wait_share", "train_s")},
            "media": "rawframes" if rawframes else "videos", "disk_bytes": disk, **config,
            "note": f"finetune, epoch {last['epoch']} of {len(speed['epochs'])} (the first is the warm-up)"}


def _loader_facts(summary: dict[str, Any]) -> dict[str, Any]:
    """The train loader's workers and persistence, as WORK/config.py has them."""
    from sfdeploy.compat import load_config

    loader = load_config(summary["config"]).train_dataloader
    return {"workers": int(loader.get("num_workers", 0)), "persistent_workers": bool(loader.get("persistent_workers"))}


def _reference(name: str, gpu: str, batch: int, videos_per_s: float, memory_gb: int) -> Task:
    def measure(c: Context) -> dict[str, Any]:
        return {"stage": STAGE, "backend": name, "precision": "-", "batch": batch, "concurrency": 1, "kind": KIND,
                "status": "ok", "reference": True, "preset": "slowfast_r50_4x16", "videos_per_s": videos_per_s,
                "data_wait_share": None, "peak_mem_mb": memory_gb * 1024, "peak_mem_what": "GPU memory (the guide)",
                "device": gpu, "note": "the finetuning guide's figure: other hardware, not measured here"}
    return Task(STAGE, name, "-", batch, 1, measure)


def _measured(backend: str, precision: str, batch: int, **how: Any) -> Task:
    return Task(STAGE, backend, precision, batch, 1, lambda c: _finetune_row(c, backend, precision, batch, **how))


def plan(c: Context) -> list[Task]:
    """The training rows (see the module docstring): fp32 (and amp on CUDA) on videos, fp32 on raw
    frames, the loader levers (small profile, unless --workers is given), then the guide's references."""
    preset, batch = PROFILES[c.opts.profile][0], train_batch(c)
    precisions = ("fp32", "amp") if c.device.is_cuda else ("fp32",)
    tasks = [_measured(f"finetune:{preset}", p, batch) for p in precisions]
    tasks.append(_measured(f"finetune:{preset} rawframes", "fp32", batch, rawframes=True))
    if c.opts.profile == "small" and c.opts.workers is None:
        tasks += [_measured(f"finetune:{preset} workers={w}{' persistent' if keep else ''}", "fp32", batch,
                            workers=w, persistent=keep) for w, keep in LOADER_LEVERS]
    tasks += [_reference(*ref) for ref in REFERENCE]
    return tasks
