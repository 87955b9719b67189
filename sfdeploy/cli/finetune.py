"""``sfdeploy finetune``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sfdeploy.cli.options import GreedyOption, parse_cfg_options


@click.command()
@click.argument("data", required=False, type=click.Path(path_type=Path))
@click.option("--work-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the config, checkpoints, logs and summary go.")
@click.option("--preset", default="slowfast_r50_4x16", show_default=True,
              help="slowfast_r50_4x16, slowfast_r50_8x8, slowfast_tiny, or a path to your own config .py.")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs [default: the preset's].")
@click.option("--batch-size", type=click.IntRange(min=1), help="Videos per batch per process [default: the preset's].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True),
              help="Learning rate, used as given [default: the preset's, scaled to the total batch].")
@click.option("--pretrained", default="default", show_default=True,
              help="PATH or URL of a checkpoint, 'none' to train from scratch, or 'default' "
                   "(the preset's: Kinetics-400 weights for the R50 presets).")
@click.option("--amp", is_flag=True, help="Mixed precision (CUDA only).")
@click.option("--resume", is_flag=True, help="Continue the run in --work-dir from its last checkpoint.")
@click.option("--gpus", default=1, show_default=True, type=click.IntRange(min=1),
              help="Processes (torchrun DDP): GPUs, or CPU processes (gloo) on a machine without one.")
@click.option("--flip/--no-flip", default=None,
              help="Horizontal flip augmentation [default: the preset's; off for direction-sensitive "
                   "data such as the synthetic set].")
@click.option("--seed", default=0, show_default=True, help="Random seed.")
@click.option("--deterministic", is_flag=True, help="Deterministic algorithms (slower).")
@click.option("--balanced", is_flag=True, help="Class-balanced sampling (each class equally likely per draw).")
@click.option("--patience", type=click.IntRange(min=1),
              help="Stop early after this many epochs without a better val top-1.")
@click.option("--workers", type=click.IntRange(min=0),
              help="Data loader workers per process [default: sized to the CPU].")
@click.option("--train-list", type=click.Path(dir_okay=False, path_type=Path),
              help="An existing MMAction2 train list (video or rawframes format) instead of DATA.")
@click.option("--val-list", type=click.Path(dir_okay=False, path_type=Path), help="... its val list.")
@click.option("--class-index", type=click.Path(dir_okay=False, path_type=Path), help="... class names, one per line.")
@click.option("--media-root", type=click.Path(file_okay=False, path_type=Path),
              help="... the folder the paths in the lists are relative to.")
@click.option("--cfg-options", cls=GreedyOption, multiple=True, metavar="KEY=VALUE ...",
              help="Override config entries, e.g. --cfg-options model.cls_head.dropout_ratio=0.3")
def finetune(data: Path | None, work_dir: Path, preset: str, epochs: int | None, batch_size: int | None,
             lr: float | None, pretrained: str, amp: bool, resume: bool, gpus: int, flip: bool | None,
             seed: int, deterministic: bool, balanced: bool, patience: int | None, workers: int | None,
             train_list: Path | None, val_list: Path | None, class_index: Path | None,
             media_root: Path | None, cfg_options: tuple[str, ...]) -> None:
    """Finetune SlowFast with MMAction2 on DATA (a folder from `sfdeploy data prepare`).

    Writes WORK/config.py (the full MMAction2 config), the best checkpoint by val top-1,
    WORK/class_index.txt and WORK/finetune_summary.json. Training logs and TensorBoard events
    go to WORK/<timestamp>/.
    """
    from sfdeploy.data.layout import PreparedData
    from sfdeploy.train.config import FinetuneOptions
    from sfdeploy.train.run import finetune as run_finetune

    lists = (train_list, val_list, class_index)
    if any(lists) and not all(lists):
        raise click.UsageError("--train-list, --val-list and --class-index go together")
    prepared = None
    if not resume:
        if all(lists):
            prepared = PreparedData.from_annotations(train_list, val_list, class_index, media_root)
        elif data is not None:
            prepared = PreparedData.from_dir(data)
        else:
            raise click.UsageError("pass DATA (from `sfdeploy data prepare`) or --train-list/--val-list/--class-index")
    opts = FinetuneOptions(
        work_dir=work_dir, preset=preset, epochs=epochs, batch_size=batch_size, lr=lr,
        pretrained=pretrained, amp=amp, resume=resume, gpus=gpus, flip=flip, seed=seed,
        deterministic=deterministic, balanced=balanced, patience=patience, workers=workers,
        cfg_options=parse_cfg_options(cfg_options),
    )
    summary = run_finetune(prepared, opts)
    top1 = summary["best_top1"]
    click.echo(json.dumps({k: summary[k] for k in ("best_top1", "best_checkpoint", "epochs_run", "wall_time_s")}))
    click.echo(f"best val top-1 {top1:.3f} -> {summary['best_checkpoint']}" if top1 is not None else
               "no validation result", err=True)
