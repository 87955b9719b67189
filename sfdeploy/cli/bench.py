"""``sfdeploy bench``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sfdeploy.bench import BACKENDS, DEFAULT_BACKENDS, DEFAULT_STAGES, STAGES
from sfdeploy.cli.options import device_option
from sfdeploy.device import Device
from sfdeploy.precision import BENCH_PRECISIONS


def _ints(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        numbers = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of integers") from None
    if not numbers or min(numbers) < 1:
        raise click.BadParameter("give positive integers, e.g. 1,8,32")
    return numbers


def _words(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


@click.command()
@click.option("--full", is_flag=True,
              help="SlowFast R50 4x16 at 224 px (the real model; for GPUs) instead of the small profile.")
@click.option("--work", "work_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Benchmark the model trained in this work dir instead.")
@click.option("--stage", "stages", default=",".join(DEFAULT_STAGES), show_default=True, callback=_words,
              help=f"Comma-separated, of {', '.join(STAGES)}: model (MMAction2 baseline, eager, TorchScript, ONNX "
                   "Runtime), triton (served model vs in-process at the same batch and concurrency), e2e (videos "
                   "-> predictions), compile (torch.compile / CUDA-graph variants: minutes per shape; only when "
                   "named), train (finetune of the profile's preset on synthetic videos, --iters steps an epoch: "
                   "videos/s, data-wait share, peak memory; raw frames vs videos with their disk bytes; the loader "
                   "workers 0/1/2 with persistent workers on/off, small profile without --workers; beside the "
                   "finetuning guide's reference figures; only when named), distill (a distilled student beside its "
                   "teacher: GFLOP, clips/s; only when named).")
@click.option("--resume", is_flag=True,
              help="Continue the record at --out: keep its rows, measure only the missing ones (same settings).")
@click.option("--export", "export_dir", type=click.Path(file_okay=False, path_type=Path),
              help="The bench export to make once and reuse [default: <out>.work/export, kept].")
@click.option("--backends", default=",".join(DEFAULT_BACKENDS), show_default=True, callback=_words,
              help=f"Comma-separated, of: {', '.join(BACKENDS)} (aoti compiles an AOTInductor package for --device "
                   "first: minutes for R50).")
@click.option("--batch-sizes", default="1,8,32", show_default=True, callback=_ints, help="Model-only sweep.")
@click.option("--precision", "precisions", default=None, callback=_words,
              help=f"Comma-separated, of {', '.join(BENCH_PRECISIONS)} [default: fp32 and the device's native reduced "
                   "precision: fp16 on CUDA, bf16 on a CPU with AVX512-BF16 or AMX]. ONNX Runtime rows skip bf16.")
@device_option("Where the model runs (auto: the GPU if torch sees one).")
@click.option("--concurrency", default="1,8", show_default=True, callback=_ints,
              help="Requests in flight to Triton, and threads of its in-process reference.")
@click.option("--triton-batch", default=8, show_default=True, type=click.IntRange(min=1), help="Clips per request.")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(min=1),
              help="The served model's instances (`repo --instances`; per GPU on a GPU).")
@click.option("--iters", default=10, show_default=True, type=click.IntRange(min=1),
              help="Timed calls per row (at least).")
@click.option("--min-time", "min_time_s", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds each row times calls for at least: fast calls are timed long enough for a stable "
                   "figure.")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0), help="Untimed calls first.")
@click.option("--e2e-videos", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--videos", type=click.Path(file_okay=False, path_type=Path),
              help="Videos for the end-to-end run [default: synthetic].")
@click.option("--workers", type=click.IntRange(min=1), help="Decode processes [default: one per CPU core].")
@click.option("--trace", is_flag=True, help="Profile the model and record where the time goes.")
@click.option("--note", default="", help="Recorded with the run, e.g. 'the 2 cores were shared with other jobs'.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="The record JSON (+ .md, .png) [default: benchmarks/results/<device>-<date>.json].")
def bench(full: bool, work_dir: Path | None, stages: tuple[str, ...], resume: bool, export_dir: Path | None,
          backends: tuple[str, ...], batch_sizes: tuple[int, ...], precisions: tuple[str, ...] | None, device: Device,
          concurrency: tuple[int, ...], triton_batch: int, instances: int, iters: int, min_time_s: float, warmup: int,
          e2e_videos: int, videos: Path | None, workers: int | None, trace: bool, note: str, out: Path | None) -> None:
    """Measure clips/s and latency of MMAction2 (the baseline), eager PyTorch, TorchScript, ONNX
    Runtime, the ExportedProgram, the AOTInductor package and the Triton-served model (what `sfdeploy
    repo` serves by default: chosen from this run's model rows), and videos/s end to end beside the
    decode-only ceiling.

    Each row is added to the record (--out) the moment it is measured, and the .md table and .png
    plot are remade from the rows there; a stopped run continues with --resume. The default (small)
    profile finishes in minutes on 2 CPU cores. Each row records how much CPU other work on the
    machine took while it was measured; rows measured on a busy machine are marked and reported.
    """
    from sfdeploy.bench.run import BenchOptions, run_bench

    results, files = run_bench(BenchOptions(
        profile="full" if full else "small", work_dir=work_dir, backends=backends or (), batch_sizes=batch_sizes,
        precisions=precisions, device=device, concurrency=concurrency, triton_batch=triton_batch, instances=instances,
        warmup=warmup, iters=iters, min_time_s=min_time_s, e2e_videos=e2e_videos, videos=videos, workers=workers,
        trace=trace, out=out, stages=stages or (), resume=resume, export=export_dir, note=note))
    click.echo(files[1].read_text(), err=True)
    click.echo(json.dumps({"results": [str(f) for f in files]}))
