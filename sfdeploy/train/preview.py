"""``sfdeploy data preview``: a contact sheet of what the model sees.

For N videos (spread over the classes), the clip that the training config's pipeline produces,
exactly as the model receives it: the ``inputs`` tensor of MMAction2's dataset (its own
``Compose`` of the config's transforms, whatever decoder, sampling, crop and flip they name),
after every augmentation and before the model's normalisation. Frames that the SlowFast slow
pathway sees are marked, as are the fast pathway's. Nothing of the pipeline is re-implemented
here: the config is the one ``finetune`` builds (or a trained run's ``WORK/config.py``) and the
frames come out of MMAction2.

Randomness: clip k of the sheet is produced right after seeding Python's, numpy's and torch's
generators with ``seed + k``, so the same seed gives the same sheet.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfdeploy import sheet
from sfdeploy.data.layout import PreparedData, leaf_datasets, spread_by_class
from sfdeploy.errors import InputError
from sfdeploy.sheet import BACKGROUND, GAP, HEADER, PAD, TEXT_COLOUR

log = logging.getLogger("sfdeploy")

SPLITS = ("train", "val")


@dataclass
class PreviewClip:
    """One clip of the sheet: the video, its label, and the frames exactly as the training pipeline
    gives them to the model, with the frames each SlowFast pathway takes."""

    video: Path
    label: int
    class_name: str
    frames: np.ndarray  # uint8 [V, T, H, W, 3], RGB: the pipeline's `inputs`, views x time
    slow: list[int] = field(default_factory=list)  # frame indices the slow pathway takes ([] if not SlowFast)
    fast: list[int] = field(default_factory=list)


@dataclass
class PreviewResult:
    """What ``data preview`` wrote: the contact sheet, its JSON index (which video and frame is drawn
    where), the optional GIF, and the clips drawn."""

    png: Path
    index: Path  # JSON: the videos of the sheet and where each frame is drawn
    gif: Path | None
    clips: list[PreviewClip]
    source: str = ""  # whose pipelines: "preset <name>" or "WORK <dir>"


def previewed_preset(data: PreparedData, preset: str | None = None) -> str:
    """The preset whose pipelines a preview shows: ``preset``, else the one DATA was prepared for
    (``data prepare --preset``, recorded in DATA), else the default (DATA made before it was recorded)."""
    from sfdeploy.train.presets import DEFAULT_PRESET

    if preset is None and data.preset is None:
        log.info("DATA records no preset (prepared by an older sfdeploy): previewing %s's pipelines; pass "
                 "--preset to choose", DEFAULT_PRESET)
    return preset or data.preset or DEFAULT_PRESET


def preview_config(data: PreparedData, *, preset: str | None = None, work: Path | None = None) -> Any:
    """The training config whose pipelines are previewed: what ``finetune --preset`` would build for
    DATA, or the config of the trained run in ``work`` pointed at DATA's lists."""
    from mmengine.utils import import_modules_from_strings

    from sfdeploy.compat import load_config
    from sfdeploy.train.config import build_config
    from sfdeploy.train.options import FinetuneOptions
    from sfdeploy.train.presets import preset_path

    if work is not None:
        path = Path(work) / "config.py"
        if not path.is_file():
            raise InputError("no config.py in the work dir", path=work,
                             fix="pass the --work-dir of a `sfdeploy finetune` run, or use --preset")
        cfg = load_config(path)
        for split in ("train", "val"):
            # A run on several datasets reads a ConcatDataset: its first set's settings, DATA's lists.
            loader, source = cfg[f"{split}_dataloader"], data.mmaction_dataset(split)
            dataset = leaf_datasets(loader.dataset)[0]
            if dataset.get("type") != source["type"]:
                raise InputError(f"the run was trained on {dataset.get('type')} data, DATA is in {data.format} format",
                                 path=data.source, fix="preview with the DATA the run was trained on")
            loader.dataset = {k: v for k, v in {**dataset, **source}.items() if k != "indices"}
    else:
        name = previewed_preset(data, preset)
        cfg = build_config(load_config(preset_path(name)), data,
                           FinetuneOptions(work_dir=Path(tempfile.gettempdir()), preset=name))
    if cfg.get("custom_imports"):
        import_modules_from_strings(**cfg.custom_imports)  # transforms the pipeline names
    return cfg


def pathway_frames(model_cfg: Any, clip_len: int) -> tuple[list[int], list[int]]:
    """Frame indices the slow and the fast pathway take from a clip of ``clip_len`` frames: the same
    ``interpolate(mode='nearest')`` calls as ``ResNet3dSlowFast.forward``, applied to frame numbers."""
    import inspect

    import torch
    import torch.nn.functional as F

    backbone = model_cfg.get("backbone") or {}
    if backbone.get("type") != "ResNet3dSlowFast":
        return [], []
    from mmaction.models.backbones import ResNet3dSlowFast

    defaults = inspect.signature(ResNet3dSlowFast.__init__).parameters
    tau = backbone.get("resample_rate", defaults["resample_rate"].default)
    alpha = backbone.get("speed_ratio", defaults["speed_ratio"].default)
    index = torch.arange(clip_len, dtype=torch.float32).view(1, 1, clip_len, 1, 1)

    def take(step: float) -> list[int]:
        picked = F.interpolate(index, mode="nearest", scale_factor=(1.0 / step, 1.0, 1.0))
        return [int(i) for i in picked.flatten().tolist()]

    return take(tau), take(tau // alpha)


def preview_clips(data: PreparedData, *, split: str = "train", n: int = 8, seed: int = 0,
                  preset: str | None = None, work: Path | None = None) -> list[PreviewClip]:
    """Run the config's ``split`` pipeline (through MMAction2's dataset) on ``n`` videos."""
    from sfdeploy.compat import ensure_mmaction

    if split not in SPLITS:
        raise InputError(f"unknown split '{split}'", fix=f"use one of: {', '.join(SPLITS)}")
    if n < 1:
        raise InputError(f"--n must be >= 1, got {n}", fix="use e.g. --n 8")
    ensure_mmaction()
    from mmaction.registry import DATASETS
    from mmengine.runner import set_random_seed

    cfg = preview_config(data, preset=preset, work=work)
    dataset = DATASETS.build(cfg[f"{split}_dataloader"].dataset)
    names = data.train.names if split == "train" else data.val.names
    labels = data.train.labels if split == "train" else data.val.labels
    clips = []
    for k, i in enumerate(spread_by_class(labels, n)):
        set_random_seed(seed + k)  # what MMAction2's transforms draw from, as the Runner seeds it
        result = dataset.prepare_data(i)  # get_data_info + the pipeline; no retry on another video
        video = data.media_root / names[i]
        if result is None:
            raise InputError("the pipeline returned nothing for this video", path=video,
                             fix="check the video with `sfdeploy data prepare`")
        inputs = result["inputs"]
        if inputs.ndim != 5 or inputs.dtype.is_floating_point:
            raise InputError(f"preview shows uint8 NCTHW clips; this pipeline gives {inputs.dtype} "
                             f"{tuple(inputs.shape)}", fix="preview a 3D recognizer config (FormatShape NCTHW)")
        frames = inputs.permute(0, 2, 3, 4, 1).numpy().astype(np.uint8)  # V, T, H, W, C
        slow, fast = pathway_frames(cfg.model, frames.shape[1])
        clips.append(PreviewClip(video=video, label=labels[i], class_name=data.classes[labels[i]],
                                 frames=frames, slow=slow, fast=fast))
    return clips


def _sheet_clip(clip: PreviewClip) -> sheet.SheetClip:
    views = clip.frames.shape[0]
    caption = f"{clip.class_name}  ({clip.label})   {clip.video.name}" + (f"   {views} views" if views > 1 else "")
    return sheet.SheetClip(frames=clip.frames, caption=caption, slow=clip.slow, fast=clip.fast)


def _rows(clips: list[PreviewClip], boxes: list) -> list[dict[str, Any]]:
    return [{"video": str(clip.video), "class": clip.class_name, "label": clip.label, "boxes": clip_boxes,
             "slow": clip.slow, "fast": clip.fast} for clip, clip_boxes in zip(clips, boxes, strict=True)]


def sheet_layout(clips: list[PreviewClip]) -> tuple[tuple[int, int], list[dict[str, Any]]]:
    """Canvas size (height, width) and, per clip, the box ``[y, x, h, w]`` of each frame by view and
    time (:func:`sfdeploy.sheet.layout`), with the clip's video, class and pathway frames."""
    size, boxes = sheet.layout([_sheet_clip(clip) for clip in clips])
    return size, _rows(clips, boxes)


def contact_sheet(clips: list[PreviewClip], title: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The sheet as an RGB uint8 image, and its layout (see :func:`sheet_layout`)."""
    image, boxes = sheet.draw([_sheet_clip(clip) for clip in clips], title)
    return image, _rows(clips, boxes)


def animation(clips: list[PreviewClip], columns: int = 4) -> list[np.ndarray]:
    """One image per time step: view 0 of every clip in a grid, captioned with its class."""
    from PIL import Image, ImageDraw

    frames, height, width = clips[0].frames.shape[1:4]
    columns = min(columns, len(clips))
    rows = -(-len(clips) // columns)
    cell_h, cell_w = height + HEADER + GAP, width + GAP
    font = sheet.font()
    images = []
    for t in range(frames):
        canvas = np.full((PAD * 2 + rows * cell_h, PAD * 2 + columns * cell_w, 3), BACKGROUND, dtype=np.uint8)
        for k, clip in enumerate(clips):
            y, x = PAD + (k // columns) * cell_h + HEADER, PAD + (k % columns) * cell_w
            if t < clip.frames.shape[1]:
                canvas[y:y + height, x:x + width] = clip.frames[0, t, :height, :width]
        image = Image.fromarray(canvas)
        draw = ImageDraw.Draw(image)
        for k, clip in enumerate(clips):
            y, x = PAD + (k // columns) * cell_h, PAD + (k % columns) * cell_w
            mark = "S" if t in clip.slow else ""
            draw.text((x, y), f"{clip.class_name[:max(4, width // 7)]} {mark}", fill=TEXT_COLOUR, font=font)
        images.append(np.asarray(image))
    return images


def write_preview(data: PreparedData, out: Path, *, split: str = "train", n: int = 8, seed: int = 0,
                  preset: str | None = None, work: Path | None = None, gif: bool = False) -> PreviewResult:
    """Write ``out`` (PNG contact sheet), ``out`` with ``.json`` (its index) and, with ``gif``,
    ``out`` with ``.gif`` (the clips animated)."""
    from PIL import Image

    from sfdeploy.fsutil import ensure_writable_dir

    out = Path(out)
    ensure_writable_dir(out.parent, "output folder", "--out")
    preset = previewed_preset(data, preset) if work is None else None
    clips = preview_clips(data, split=split, n=n, seed=seed, preset=preset, work=work)
    source = f"WORK {work}" if work is not None else f"preset {preset}"
    sheet, rows = contact_sheet(clips, f"{split} pipeline ({source}), seed {seed}: what the model receives")
    Image.fromarray(sheet).save(out, format="PNG")
    index = out.with_suffix(".json")
    index.write_text(json.dumps({"split": split, "seed": seed, "source": source, "png": str(out),
                                 "rows": rows}, indent=1) + "\n")
    gif_path = None
    if gif:
        gif_path = out.with_suffix(".gif")
        frames = [Image.fromarray(f) for f in animation(clips)]
        frames[0].save(gif_path, format="GIF", save_all=True, append_images=frames[1:], duration=120, loop=0)
    return PreviewResult(png=out, index=index, gif=gif_path, clips=clips, source=source)
