"""``sfdeploy eval``: an export's accuracy on DATA's val split, beside MMAction2's (:mod:`sfdeploy.evaluate`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sfdeploy.cli.options import target_options
from sfdeploy.infer_options import InferOptions

if TYPE_CHECKING:
    from sfdeploy.evaluate import EvalReport
    from sfdeploy.target import ModelTarget

# per video / per class: in --out and the report folder, not in the one-line summary on stdout
LONG_FIELDS = ("rows", "per_class", "confusion", "confused_pairs", "misclassified_shown")


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
@click.option("--report-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write the model analysis here: confusion.json (the full confusion matrix, rows = true class, "
                   "columns = predicted, with per-class accuracy and the most confused pairs), confusion.png (every "
                   "class, or with many classes the ones with the most mistakes: readable at 400) and "
                   "misclassified.png (the most confident mistakes, as the model received them, each named with "
                   "its true and predicted class; not written when there is none). [default: no files]")
def evaluate(export_dir: Path, data_dir: Path, target: ModelTarget, batch_size: int, workers: int | None,
             reference: bool, work_dir: Path | None, out: Path | None, report_dir: Path | None) -> None:
    """Top-1 / top-5 and mean class accuracy of an exported model on DATA's val split, beside
    MMAction2's own for the checkpoint at the same views, and the share of identical predictions.

    The model is EXPORT run in this process (--backend onnxruntime, torchscript, torch_export or
    aoti), or the same model served by Triton (--backend triton). Mean class accuracy is
    MMAction2's (the acc/mean1 finetune logs): the mean of per-class accuracies, which a rare class
    the model never gets right pulls down even when top-1 looks fine. --report-dir shows what the
    model confuses."""
    from sfdeploy.evaluate import evaluate as run_eval
    from sfdeploy.evaluate import write_report
    from sfdeploy.fsutil import ensure_writable_dir

    if report_dir is not None:  # a typo'd folder fails now, not after the whole val split
        ensure_writable_dir(report_dir, "report folder", "--report-dir")
    report = run_eval(target, data_dir, batch_size=batch_size, workers=workers, reference=reference,
                      work_dir=work_dir)
    if out:
        out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    for failure in report.failed:
        click.echo(f"failed: {failure['path']}: {failure['error']}", err=True)
    click.echo(_console_line(report), err=True)
    summary = {k: v for k, v in report.to_dict().items() if k not in LONG_FIELDS}
    if report_dir is not None:
        files = write_report(report, report_dir)
        written = [files.confusion_json, files.confusion_png] + ([files.misclassified] if files.misclassified else [])
        summary["report_files"] = [str(path) for path in written]
        click.echo(f"model analysis: {', '.join(map(str, written))}" + (f" ({files.message})" if files.message
                                                                          else ""), err=True)
    click.echo(json.dumps(summary))
    if report.failed:
        raise SystemExit(1)


def _console_line(report: EvalReport) -> str:
    line = (f"{report.backend}: top-1 {report.top1:.1%}, top-5 {report.top5:.1%}, mean class accuracy "
            f"{report.mean_class_accuracy:.1%} on {report.evaluated}/{report.videos}")
    if report.mmaction2_top1 is not None:
        line += (f" | MMAction2: top-1 {report.mmaction2_top1:.1%}, top-5 {report.mmaction2_top5:.1%}, mean class "
                 f"accuracy {report.mmaction2_mean_class_accuracy:.1%} | identical top-1: {report.identical_top1:.1%}")
    if report.confused_pairs:
        pair = report.confused_pairs[0]
        line += f" | most confused: {pair['true']} -> {pair['predicted']} ({pair['count']}x)"
    return line
