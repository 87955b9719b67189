"""``sfdeploy infer``: parse the options into one :class:`~sfdeploy.infer_options.InferOptions`
and run the chosen engine (:func:`sfdeploy.engines.run_infer`); what either engine refuses is a
usage error of the option it names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sfdeploy.cli.options import max_video_pixels_option, target_options
from sfdeploy.decode.gpu.select import DECODE_MODES
from sfdeploy.engines import ENGINES
from sfdeploy.infer_options import LOCAL_CONCURRENCY, RAY_ACTORS, InferOptions
from sfdeploy.scale.cluster import STALL_TIMEOUT_S

if TYPE_CHECKING:
    from sfdeploy.target import ModelTarget

INFER = InferOptions()  # the defaults of `infer`


@click.command()
@click.argument("inputs", nargs=-1, metavar="[VIDEO_OR_DIR]...")
@click.option("--inputs-from", "lists", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A list of inputs: .txt (a path per line), .csv or .parquet (a 'path' column). Repeatable.")
@click.option("--engine", default=ENGINES[0], show_default=True, type=click.Choice(ENGINES),
              help="local: this machine's processes; ray: a Ray cluster (README 'Scale out').")
@click.option("--ray-address", help="Ray cluster to join (auto, HOST:6379, ray://HOST:10001) [default: start one "
                                    "on this machine].")
@target_options(several_urls=True, device_help="Where a local backend runs (auto: the GPU when the backend can use "
                                               "it here; cuda: the GPU or a clear error). With --engine ray: cuda "
                                               "gives each model actor one GPU, auto one where the cluster has GPUs.")
@click.option("--batch-size", default=INFER.batch_size, show_default=True, type=click.IntRange(min=1),
              help="Videos per request.")
@click.option("--concurrency", type=click.IntRange(min=1),
              help=f"Requests in flight [local: {LOCAL_CONCURRENCY}]; with --engine ray, model actors [{RAY_ACTORS}].")
@click.option("--workers", type=click.IntRange(min=1),
              help="Decode processes [default: one per CPU core]; with --engine ray, decode tasks at once.")
@click.option("--actor-cpus", type=click.FloatRange(min=0, min_open=True),
              help="--engine ray: CPUs reserved, and threads, per model actor [1 CPU with 2 threads; triton: 0.25].")
@click.option("--stall-timeout", default=STALL_TIMEOUT_S, show_default=True, type=click.FloatRange(min=0),
              help="--engine ray: stop (rows kept, --resume continues) when no row came for this many seconds while "
                   "Ray cannot place the run's work (a lost node and no room to redo it); 0: wait for ever.")
@click.option("--topk", default=INFER.topk, show_default=True, type=click.IntRange(min=1), help="Classes per row.")
@click.option("--out", default="predictions.csv", show_default=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output: .csv, .jsonl or .parquet, one row per input.")
@click.option("--resume", is_flag=True, help="Skip inputs already in --out and append the rest.")
@max_video_pixels_option("Decoding here")
@click.option("--decode", default=INFER.decode, show_default=True, type=click.Choice(DECODE_MODES),
              help="Where videos are decoded. auto: on the GPU (NVDEC) when the model runs there (--device cuda, "
                   "local backend), a GPU decoder is installed and the export's fidelity record passed the stream's "
                   "codec; else the CPU, saying why once. cpu. gpu: NVDEC where the stream allows (fails with the fix "
                   "when no GPU decoder is here); pynvvideocodec / torchcodec: that decoder. With --server-decode "
                   "it is asked of the server: auto as its repository says (`repo --decode`), cpu, or gpu (NVDEC; a "
                   "server without it refuses). Each row's decoder and decoder_reason say which decoder read the "
                   "video and why.")
def infer(inputs: tuple[str, ...], lists: tuple[Path, ...], engine: str, ray_address: str | None, target: ModelTarget,
          batch_size: int, concurrency: int | None, workers: int | None, actor_cpus: float | None,
          stall_timeout: float, topk: int, out: Path, resume: bool, max_pixels: int, decode: str) -> None:
    """Classify videos (files and folders) with a served or exported model.

    Decoding runs in parallel worker processes (with --server-decode: on the server, and the
    files' bytes are sent); batches go to the backend with --concurrency requests in flight.
    Every input gets one row in --out: a video that fails has its error in its row and the
    others are classified. Exits 1 if any input failed. --engine ray runs the same on a Ray
    cluster (decode tasks, model actors) with the same rows and --resume.
    """
    from sfdeploy.engines import run_infer
    from sfdeploy.errors import OptionError
    from sfdeploy.inputs import read_input_list

    items = [*inputs, *(path for listed in lists for path in read_input_list(listed))]
    if not items:
        raise click.UsageError("no inputs: pass videos or folders, or --inputs-from FILE")
    options = InferOptions(batch_size=batch_size, concurrency=concurrency, workers=workers, topk=topk,
                           max_pixels=max_pixels, decode=decode)
    try:
        summary = run_infer(items, out, target, options, engine=engine, resume=resume, address=ray_address,
                            actor_cpus=actor_cpus, stall_timeout_s=stall_timeout)
    except OptionError as exc:
        raise click.BadParameter(f"{exc.message}; {exc.fix}" if exc.fix else exc.message,
                                 param_hint=exc.option) from exc
    for failure in summary.failures:
        click.echo(f"failed: {failure['path']}: {failure['error']}", err=True)
    click.echo(summary.describe(), err=True)
    click.echo(json.dumps({"out": str(out), "ok": summary.ok, "failed": summary.failed, "skipped": summary.skipped,
                           "wall_time_s": summary.wall_time_s}))
    if summary.failed:
        raise SystemExit(1)
