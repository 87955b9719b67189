"""``sfdeploy finetune``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sfdeploy.cli.options import BatchSize, GreedyOption, parse_cfg_options
from sfdeploy.train.options import STUDENT_PRESETS, FinetuneOptions
from sfdeploy.train.presets import available_presets

#: the library's defaults, shown by --help (one source for both)
DEFAULTS = FinetuneOptions(work_dir=Path("."))


@click.command()
@click.argument("data", nargs=-1, type=click.Path(path_type=Path))
@click.option("--work-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the config, checkpoints, logs and summary go.")
@click.option("--preset", help=f"{', '.join(available_presets())}, or a path to your own config .py "
                               f"[default: {DEFAULTS.preset}; with --distill-from, the teacher preset's student: "
                               f"{', '.join(f'{t} -> {s}' for t, s in STUDENT_PRESETS.items())}].")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs [default: the preset's].")
@click.option("--batch-size", type=BatchSize(),
              help="Videos per batch per process, or 'auto': on CUDA the largest that fits (trial steps) and "
                   "keeps 8 optimizer steps per epoch (the summary says which limit decided), on CPU the "
                   "preset's [default: the preset's].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True),
              help="Learning rate, used as given [default: the preset's, scaled to the effective batch].")
@click.option("--pretrained", default=DEFAULTS.pretrained, show_default=True,
              help="PATH or URL of a checkpoint, 'none' to train from scratch, or 'default' "
                   "(the preset's: Kinetics-400 weights for the R50 presets).")
@click.option("--amp", is_flag=True, help="Mixed precision (CUDA only).")
@click.option("--checkpointing", is_flag=True,
              help="Activation (gradient) checkpointing in the backbone (MMAction2's with_cp): less GPU memory "
                   "per video (R50: -59%), a second forward pass of the residual blocks per step; same losses.")
@click.option("--resume", is_flag=True, help="Continue the run in --work-dir from its last checkpoint.")
@click.option("--gpus", default=DEFAULTS.gpus, show_default=True, type=click.IntRange(min=1),
              help="Processes per machine (torchrun DDP): GPUs, or CPU processes (gloo) on a machine without one.")
@click.option("--flip/--no-flip", default=None,
              help="Horizontal flip augmentation [default: the preset's; off for direction-sensitive "
                   "data such as the synthetic set].")
@click.option("--seed", default=DEFAULTS.seed, show_default=True, help="Random seed.")
@click.option("--deterministic", is_flag=True, help="Deterministic algorithms (slower).")
@click.option("--balanced", is_flag=True, help="Class-balanced sampling (each class equally likely per draw).")
@click.option("--patience", type=click.IntRange(min=1),
              help="Stop early after this many epochs without a better val top-1.")
@click.option("--workers", type=click.IntRange(min=0),
              help="Data loader workers per process [default: sized to the CPU].")
@click.option("--train-list", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="An existing MMAction2 train list (video or rawframes format) instead of DATA; repeat "
                   "the four options for several sets (the n-th of each go together).")
@click.option("--val-list", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="... its val list.")
@click.option("--class-index", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="... class names, one per line (once for all sets, or once per set).")
@click.option("--media-root", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="... the folder the paths in the lists are relative to (none, once, or once per set).")
@click.option("--freeze-backbone", is_flag=True,
              help="Train the head only: backbone weights and BatchNorm statistics stay as pretrained. "
                   "Needs pretrained weights.")
@click.option("--unfreeze-after", type=click.IntRange(min=1), metavar="N",
              help="Gradual unfreezing: head only for N epochs, then the whole model (the schedule continues). "
                   "Needs pretrained weights.")
@click.option("--backbone-lr-mult", type=click.FloatRange(min=0, min_open=True), metavar="F",
              help="Backbone learning rate = F x the head's (e.g. 0.1), through mmengine's paramwise_cfg.")
@click.option("--accumulate", default=DEFAULTS.accumulate, show_default=True, type=click.IntRange(min=1), metavar="N",
              help="Gradient accumulation: one optimizer step per N batches (effective batch = batch x N x "
                   "processes; the learning rate is scaled to it).")
@click.option("--class-weights", metavar="auto|FILE",
              help="Class-weighted loss: 'auto' = inverse class frequency of the train list (mean 1), or a "
                   "file with one 'CLASS_NAME WEIGHT' (or 'WEIGHT') line per class.")
@click.option("--overfit", type=click.IntRange(min=1), metavar="N",
              help="Sanity check: train and validate on the same N training videos; the summary says "
                   "whether val top-1 reached 100% (training stops when it does).")
@click.option("--nnodes", default=DEFAULTS.nnodes, show_default=True, type=click.IntRange(min=1),
              help="Machines in a multi-node run; each runs this same command with its --node-rank "
                   "(--gpus stays the processes per machine).")
@click.option("--node-rank", default=DEFAULTS.node_rank, show_default=True, type=click.IntRange(min=0),
              help="This machine's rank (0..nnodes-1); node 0 writes WORK.")
@click.option("--master-addr", help="Address of the node-0 machine (multi-node).")
@click.option("--master-port", default=DEFAULTS.master_port, show_default=True, type=click.IntRange(1, 65535),
              help="Free TCP port on the node-0 machine (multi-node).")
@click.option("--distill-from", type=click.Path(file_okay=False, path_type=Path), metavar="TEACHER_WORK",
              help="Knowledge distillation: train the (smaller) --preset to imitate the model finetuned in "
                   "TEACHER_WORK (its config.py and best checkpoint; frozen, eval mode, same classes and clip spec, "
                   "checked before training). loss = (1-W)*CE(labels) + W*T^2*KL(teacher||student at temperature "
                   "T), logged as loss_cls and loss_distill. The checkpoint is the student's alone (`export` makes "
                   "the student); the summary compares both models' val top-1 and measured speed.")
@click.option("--distill-temperature", default=DEFAULTS.distill_temperature, show_default=True,
              type=click.FloatRange(min=0, min_open=True), metavar="T",
              help="Softmax temperature of the distillation term (higher: softer teacher targets).")
@click.option("--distill-weight", default=DEFAULTS.distill_weight, show_default=True,
              type=click.FloatRange(min=0, max=1, min_open=True), metavar="W",
              help="Weight W of the distillation term against the label cross-entropy (1-W).")
@click.option("--cfg-options", cls=GreedyOption, multiple=True, metavar="KEY=VALUE ...",
              help="Override config entries, e.g. --cfg-options model.cls_head.dropout_ratio=0.3")
def finetune(data: tuple[Path, ...], work_dir: Path, train_list: tuple[Path, ...], val_list: tuple[Path, ...],
             class_index: tuple[Path, ...], media_root: tuple[Path, ...], cfg_options: tuple[str, ...],
             **options: object) -> None:
    """Finetune SlowFast with MMAction2 on DATA (a folder from `sfdeploy data prepare`), or on
    the union of several: DATA1 DATA2 ... (classes merged by name; each set keeps its own val
    split, and the union of those is validated on).

    Writes WORK/config.py (the full MMAction2 config), the best checkpoint by val top-1,
    WORK/class_index.txt and WORK/finetune_summary.json. Training logs and TensorBoard events
    (loss, accuracy, the learning rate of each module) go to WORK/<timestamp>/. Nonsensical
    option combinations are refused before anything starts.
    """
    from sfdeploy.train.run import finetune as run_finetune

    sets = None if options["resume"] else _datasets(data, train_list, val_list, class_index, media_root)
    opts = FinetuneOptions(work_dir=work_dir, cfg_options=parse_cfg_options(cfg_options), **options)
    summary = run_finetune(sets, opts)
    if opts.node_rank != 0:  # its summary says where node 0 writes WORK
        click.echo(json.dumps(summary))
        return
    top1 = summary["best_top1"]
    click.echo(json.dumps({k: summary[k] for k in ("best_top1", "best_checkpoint", "epochs_run", "wall_time_s")}))
    click.echo(f"best val top-1 {top1:.3f} -> {summary['best_checkpoint']}" if top1 is not None else
               "no validation result", err=True)
    if summary.get("distillation"):
        d = summary["distillation"]
        click.echo(f"distilled from {d['teacher_work']}: student val top-1 {d['student_best_top1']} vs teacher "
                   f"{d['teacher_best_top1']} (difference {d['top1_difference_points']} points), "
                   f"{d['speed_ratio']}x the teacher's clips/s here", err=True)
    if summary.get("overfit"):
        reached = summary["overfit"]["reached_100"]
        click.echo(f"overfit check on {summary['overfit']['videos']} videos: "
                   + ("reached 100%" if reached else "did NOT reach 100%: check labels, pipeline and LR"), err=True)


def _datasets(data: tuple[Path, ...], train_list: tuple[Path, ...], val_list: tuple[Path, ...],
              class_index: tuple[Path, ...], media_root: tuple[Path, ...]) -> list:
    """The sets to train on: DATA folders, then --train-list sets (the n-th --val-list,
    --class-index and --media-root go with the n-th --train-list; one of the last two serves all)."""
    from sfdeploy.data.layout import PreparedData

    n = len(train_list)
    if (n or val_list or class_index) and not (n and len(val_list) == n and len(class_index) in (1, n)):
        raise click.UsageError("--train-list, --val-list and --class-index go together: one --val-list per "
                               "--train-list, and --class-index once (for all) or once per --train-list")
    if len(media_root) not in (0, 1, n) or (media_root and not n):
        raise click.UsageError("--media-root goes with --train-list: none, once (for all), or once per --train-list")
    if not data and not n:
        raise click.UsageError("pass DATA (from `sfdeploy data prepare`) or --train-list/--val-list/--class-index")
    part = len(data) + n > 1  # one set of several: checked as a union
    sets = [PreparedData.from_dir(folder, part=part) for folder in data]
    for i in range(n):
        sets.append(PreparedData.from_annotations(train_list[i], val_list[i], class_index[min(i, len(class_index) - 1)],
                                                  media_root[min(i, len(media_root) - 1)] if media_root else None,
                                                  part=part))
    return sets
