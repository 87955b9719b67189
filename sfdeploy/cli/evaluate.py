"""``sfdeploy eval``."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("eval")
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="A prepared DATA folder; its val split is evaluated.")
@click.option("--backend", default="onnxruntime", show_default=True,
              type=click.Choice(["onnxruntime", "torchscript", "triton"]))
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]),
              help="Which artifact of the export (local backends).")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "auto"]),
              help="Where a local backend and the MMAction2 reference run (auto: the GPU when the backend "
                   "can use it).")
@click.option("--url", default="127.0.0.1:8000", show_default=True, help="Triton server (--backend triton).")
@click.option("--protocol", default="http", show_default=True, type=click.Choice(["http", "grpc"]))
@click.option("--model", "model_name", default="slowfast", show_default=True, help="Served model name (triton).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", type=click.IntRange(min=1), help="Decode processes [default: one per CPU core].")
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="Also run the checkpoint in MMAction2 and compare.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the trained run is now, if it moved since the export.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the full report (JSON).")
def evaluate(export_dir: Path, data_dir: Path, backend: str, precision: str, device: str, url: str, protocol: str,
             model_name: str, batch_size: int, workers: int | None, reference: bool, work_dir: Path | None,
             out: Path | None) -> None:
    """Top-1 / top-5 of an exported model on DATA's val split, beside MMAction2's own accuracy
    for the checkpoint at the same views, and the share of identical predictions."""
    from sfdeploy.evaluate import evaluate as run_eval
    from sfdeploy.runtime import open_predictor

    predictor = open_predictor(backend, export_dir=export_dir, precision=precision, device=device, url=url,
                               protocol=protocol, model=model_name)
    try:
        report = run_eval(export_dir, data_dir, predictor, batch_size=batch_size, workers=workers,
                          reference=reference, work_dir=work_dir, device=device)
    finally:
        predictor.close()
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
