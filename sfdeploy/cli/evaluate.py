"""``sfdeploy eval``: an export's accuracy on DATA's val split, beside MMAction2's (:mod:`sfdeploy.evaluate`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sfdeploy.cli.options import target_options
from sfdeploy.infer_options import InferOptions

if TYPE_CHECKING:
    from sfdeploy.target import ModelTarget


@click.command("eval")
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="A prepared DATA folder; its val split is evaluated.")
@target_options(export_option=False, transport=False,
                device_help="Where a local backend and the MMAction2 reference run (auto: the GPU when the backend "
                            "can use it here; cuda: the GPU or a clear error).")
@click.option("--batch-size", default=InferOptions.batch_size, show_default=True, type=click.IntRange(min=1),
              help="Videos per model call (as for `infer`).")
@click.option("--workers", type=click.IntRange(min=1), help="Decode processes [default: one per CPU core].")
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="Also run the checkpoint in MMAction2 and compare.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the trained run is now, if it moved since the export.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the full report (JSON).")
def evaluate(export_dir: Path, data_dir: Path, target: ModelTarget, batch_size: int, workers: int | None,
             reference: bool, work_dir: Path | None, out: Path | None) -> None:
    """Top-1 / top-5 of an exported model on DATA's val split, beside MMAction2's own accuracy
    for the checkpoint at the same views, and the share of identical predictions.

    The model is EXPORT run in this process (--backend onnxruntime, torchscript, torch_export or
    aoti), or the same model served by Triton (--backend triton)."""
    from sfdeploy.evaluate import evaluate as run_eval

    report = run_eval(target, data_dir, batch_size=batch_size, workers=workers, reference=reference,
                      work_dir=work_dir)
    if out:
        out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    for failure in report.failed:
        click.echo(f"failed: {failure['path']}: {failure['error']}", err=True)
    line = f"{report.backend}: top-1 {report.top1:.1%}, top-5 {report.top5:.1%} on {report.evaluated}/{report.videos}"
    if report.mmaction2_top1 is not None:
        line += (f" | MMAction2: top-1 {report.mmaction2_top1:.1%}, top-5 {report.mmaction2_top5:.1%}"
                 f" | identical top-1: {report.identical_top1:.1%}")
    click.echo(line, err=True)
    summary = {k: v for k, v in report.to_dict().items() if k != "rows"}
    click.echo(json.dumps(summary))
    if report.failed:
        raise SystemExit(1)
