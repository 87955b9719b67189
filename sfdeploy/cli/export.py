"""``sfdeploy export``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sfdeploy.artifacts import (
    DEFAULT_FORMATS,
    DEVICE_NOISE_FACTOR,
    FORMATS,
    FP16_MIN_TOP1_AGREEMENT,
    FP32_MAX_ABS_DIFF,
    REDUCED_MAX_ABS_DIFF,
    parse_formats,
)
from sfdeploy.cli.options import device_option
from sfdeploy.device import Device
from sfdeploy.errors import InputError
from sfdeploy.precision import AUTO, EXPORT_PRECISIONS, FP16_FLAG, precision_words


def _formats(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    try:
        return parse_formats(value)
    except InputError as exc:
        raise click.BadParameter(f"{exc.message}; {exc.fix}") from exc


def _precisions(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    try:
        return precision_words(value)
    except InputError as exc:
        raise click.BadParameter(f"{exc.message}; {exc.fix}") from exc


HELP = f"""Export the model trained in WORK, with preprocessing baked in: TorchScript, ONNX,
torch.export's ExportedProgram and (--formats ...,aoti) an AOTInductor package compiled for
--device.

Each artifact takes uint8 RGB frames [N, V, T, H, W, 3] and returns class probabilities
[N, classes]; the clip spec travels inside it. Before it is written as done, every artifact
is compared with the eager MMAction2 model (fp32, on the CPU) on val clips (the parity gate):
the command fails if an fp32 artifact differs by more than max({FP32_MAX_ABS_DIFF:g},
{DEVICE_NOISE_FACTOR:g} x MMAction2's own difference on the GPU the gate runs on), or a reduced
precision one agrees on top-1 for < {FP16_MIN_TOP1_AGREEMENT:.0%} or differs by more than
{REDUCED_MAX_ABS_DIFF['fp16']:g} (fp16) / {REDUCED_MAX_ABS_DIFF['bf16']:g} (bf16). The artifacts
that pass are then timed on --device: `sfdeploy repo` serves the fastest by default.
"""


@click.command(help=HELP)
@click.argument("work", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for model.pt / model.onnx / manifest.json.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint to export [default: the best one of WORK/finetune_summary.json].")
@click.option("--formats", default=",".join(DEFAULT_FORMATS), show_default=True, callback=_formats,
              help=f"Comma-separated, of: {', '.join(FORMATS)}. aoti compiles an AOTInductor package for --device "
                   "(minutes for R50; it runs only on that device kind and this torch build).")
@click.option("--precisions", default=AUTO, show_default=True, callback=_precisions,
              help=f"{AUTO} (fp32, plus fp16 on a GPU, bf16 on a CPU with AVX512-BF16 or AMX), or comma-separated, of: "
                   f"{', '.join(EXPORT_PRECISIONS)} (fp32 is always written). Reduced precisions take uint8 in, "
                   "float32 out; ONNX has no bf16.")
@click.option("--fp16", is_flag=True,
              help=f"Also write {FP16_FLAG} variants (the same as adding {FP16_FLAG} to --precisions).")
@click.option("--views", default=1, show_default=True, type=click.IntRange(min=1),
              help="Views per video: 1 = the centre clip and crop (the val pipeline); more = clips x "
                   "crops of the config's test pipeline (e.g. 30 for R50: 10 clips x 3 crops).")
@device_option("Where the reduced precisions are traced, the AOTInductor package is compiled, and the self-checks, "
               "the parity gate and the timings run; auto: the GPU for each backend that can use it here, cuda: the "
               "GPU or a clear error.")
@click.option("--parity-videos", default=64, show_default=True, type=click.IntRange(min=1),
              help="Val videos the parity gate compares on (spread over the classes).")
@click.option("--parity-data", type=click.Path(file_okay=False, path_type=Path),
              help="Take the parity videos from this prepared DATA instead of the training config's val list.")
@click.option("--rewrites", default="auto", show_default=True,
              help="Graph rewrites that keep every output and make the graph faster: auto (the measured "
                   "choice for --device: on a GPU fold_bn, frame_conv2d, pad_stem, channels_last; on the CPU "
                   "none, the runtime optimises the plain graph), none (the plain graph), or a comma-separated "
                   "list of those steps. "
                   "Every artifact still passes the parity gate; manifest.json records the steps.")
@click.option("--measure/--no-measure", default=True, show_default=True,
              help="Time the artifacts that passed the gate on --device (recorded in manifest.json: `sfdeploy repo "
                   "--runtime auto` serves the fastest; without a measurement it serves TorchScript).")
def export(work: Path, out: Path, checkpoint: Path | None, formats: tuple[str, ...], precisions: tuple[str, ...],
           fp16: bool, views: int, device: Device, parity_videos: int, parity_data: Path | None, rewrites: str,
           measure: bool) -> None:
    """``sfdeploy export`` (its help is :data:`HELP`, written from the gate's own thresholds)."""
    from sfdeploy.export.run import ExportOptions, export_work

    manifest = export_work(work, ExportOptions(out=out, checkpoint=checkpoint, formats=formats, precisions=precisions,
                                               fp16=fp16, views=views, device=device, parity_videos=parity_videos,
                                               parity_data=parity_data, rewrites=rewrites, measure=measure))
    timed = manifest.timings.get("ms_per_clip", {})
    for key, result in manifest.parity["artifacts"].items():
        speed = "  ".join(f"b{b} {ms:.1f} ms/clip" for b, ms in timed.get(key, {}).items())
        click.echo(f"{key:<18} {manifest.artifacts[key].file:<22} max |diff| {result['max_abs_diff']:.1e}  "
                   f"top-1 agreement {result['top1_agreement']:.1%}  ({result['videos']} val videos)"
                   + (f"  {speed}" if speed else ""), err=True)
    click.echo(json.dumps({"out": str(out), "artifacts": {k: a.file for k, a in manifest.artifacts.items()},
                           "parity_passed": manifest.parity_passed}))
