"""``sfdeploy data synth``, ``sfdeploy data prepare`` and ``sfdeploy data preview``."""

from __future__ import annotations

from pathlib import Path

import click

from sfdeploy.cli.options import max_video_pixels_option


@click.group()
def data() -> None:
    """Make a synthetic dataset, prepare a folder of labelled videos for training, look at what
    the model will see."""


@data.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", default=4, show_default=True, type=click.IntRange(2, 8),
              help="Number of motion classes (move right/left/down/up, rotate cw/ccw, grow/shrink).")
@click.option("--per-class", default=16, show_default=True, type=click.IntRange(min=1),
              help="Videos per class.")
@click.option("--frames", default=48, show_default=True, type=click.IntRange(min=8),
              help="Frames per video (25 fps).")
@click.option("--size", default=96, show_default=True, type=click.IntRange(min=32),
              help="Frame width and height in pixels (even).")
@click.option("--seed", default=0, show_default=True, help="Same seed, same videos.")
def synth(out: Path, classes: int, per_class: int, frames: int, size: int, seed: int) -> None:
    """Write a synthetic action dataset to OUT: one folder per class of .mp4 videos.

    The classes differ only in motion, so a model must learn temporal features; left/right
    classes mark the set direction-sensitive (finetune then turns horizontal flips off).
    """
    from sfdeploy.data.synth import SynthOptions, synthesize

    if size % 2:
        raise click.BadParameter("must be even (MPEG-4 encoders need even frame sizes)", param_hint="--size")
    meta = synthesize(out, SynthOptions(classes=classes, per_class=per_class, frames=frames, size=size,
                                        seed=seed))
    click.echo(f"wrote {classes * per_class} videos in {classes} classes to {out} ({meta.name} describes them)")


@data.command()
@click.argument("video_root", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the annotation lists, class index and report.")
@click.option("--val-ratio", default=0.2, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Share of each class held out for validation (ignored for train/ + val/ roots).")
@click.option("--seed", default=0, show_default=True, help="Seed of the stratified split.")
@click.option("--preset", default=None,
              help="The finetune preset (or config .py) the data is for: videos shorter than its clip are "
                   "kept (MMAction2 loops their frames) and listed as short in the report "
                   "[default: slowfast_r50_4x16].")
@click.option("--min-frames", type=click.IntRange(min=1), default=None,
              help="Reject videos with fewer frames than this [default: keep every decodable video].")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Parallel probe (and --rawframes extraction) processes [default: one per CPU core].")
@click.option("--rawframes", is_flag=True,
              help="Also extract every usable video's frames as JPEGs into OUT/rawframes/<class>/<video>/img_00001.jpg "
                   "(MMAction2's RawframeDataset layout) and write rawframes lists of the same split: finetune then "
                   "reads images instead of decoding videos (eval still needs a video DATA).")
@click.option("--frame-short-side", type=click.IntRange(min=8), default=None, metavar="N",
              help="With --rawframes: resize frames to this short side on extraction [default: native size].")
@max_video_pixels_option("The probe")
def prepare(video_root: Path, out: Path, val_ratio: float, seed: int, preset: str | None,
            min_frames: int | None, workers: int | None, rawframes: bool, frame_short_side: int | None,
            max_pixels: int) -> None:
    """Probe and split VIDEO_ROOT/<class>/*.mp4 (or VIDEO_ROOT/{train,val}/<class>/) into
    MMAction2 annotation lists.

    Every video is decoded in parallel (PyAV, as decord indexes and decodes, as in training and
    serving); corrupt, empty and unreadable files are listed with the reason and the
    fix in OUT/prepare_report.json, and the rest is used. Videos shorter than the preset's clip are
    used too, and listed as short. With --rawframes the frames are extracted in parallel too
    (resumable: a finished video's frames are reused by the next run).
    """
    from sfdeploy.data.prepare import prepare as run_prepare
    from sfdeploy.train.presets import DEFAULT_PRESET
    from sfdeploy.train.presets import clip_frames as preset_clip_frames

    if frame_short_side is not None and not rawframes:
        raise click.UsageError("--frame-short-side resizes the extracted frames: pass --rawframes too")
    preset = preset or DEFAULT_PRESET
    clip_frames = preset_clip_frames(preset)
    result = run_prepare(video_root, out, val_ratio=val_ratio, seed=seed, min_frames=min_frames or 1,
                         clip_frames=clip_frames, preset=preset, workers=workers, max_pixels=max_pixels,
                         rawframes=rawframes, frame_short_side=frame_short_side)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    for item in result.rejected:
        click.echo(f"rejected: {item['path']}: {item['reason']}: {item['detail']}", err=True)
    for item in result.short[:SHOW_SHORT]:
        click.echo(f"short: {item['path']}: {item['frames']} frames (a clip spans {clip_frames}; looped)", err=True)
    if len(result.short) > SHOW_SHORT:
        click.echo(f"short: ... {len(result.short) - SHOW_SHORT} more in the report", err=True)
    click.echo(f"{len(result.classes)} classes, {result.train} train / {result.val} val videos "
               f"({len(result.short)} short: fewer than the {clip_frames} frames of one clip, frames loop), "
               f"{len(result.rejected)} rejected, {len(result.ignored)} other files ignored -> {out}")
    if rawframes:
        import json

        frames = json.loads(result.report_path.read_text())["rawframes"]
        click.echo(f"rawframes: {frames['videos']} videos, {frames['frames']} frames, "
                   f"{frames['bytes'] / 1e6:.1f} MB ({frames['reused']} reused) -> {frames['root']}")
    click.echo(f"report: {result.report_path}")


@data.command()
@click.argument("data_dir", metavar="DATA", type=click.Path(path_type=Path))
@click.option("--split", type=click.Choice(["train", "val"]), default="train", show_default=True,
              help="Which pipeline: train (with its random augmentation) or val (its fixed crop).")
@click.option("--n", "count", default=8, show_default=True, type=click.IntRange(min=1),
              help="Videos on the sheet, spread over the classes.")
@click.option("--out", default=Path("preview.png"), show_default=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The PNG contact sheet (an index of it goes next to it as .json).")
@click.option("--gif", is_flag=True, help="Also write an animated version (same name, .gif).")
@click.option("--preset", default=None, help="Use the pipelines finetune would build with this preset "
                                             "[default: the preset DATA was prepared for, `data prepare --preset`].")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path),
              help="Use the pipelines of a trained run (WORK/config.py) instead of a preset.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random augmentation.")
def preview(data_dir: Path, split: str, count: int, out: Path, gif: bool, preset: str | None, work: Path | None,
            seed: int) -> None:
    """Write a contact sheet of what the model sees: for N videos of DATA, the frames of the
    sampled clip after the training config's pipeline (MMAction2's own transforms), with class and
    file names; frames of the SlowFast slow and fast pathways are marked.
    """
    from sfdeploy.data.layout import PreparedData
    from sfdeploy.train.preview import write_preview

    if preset and work:
        raise click.UsageError("--preset and --work are alternatives: pass one")
    result = write_preview(PreparedData.from_dir(data_dir), out, split=split, n=count, seed=seed, preset=preset,
                           work=work, gif=gif)
    click.echo(f"{len(result.clips)} clips ({split} pipeline of {result.source}) -> {result.png}"
               + (f", {result.gif}" if result.gif else ""))


SHOW_SHORT = 5

