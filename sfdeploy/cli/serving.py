"""``sfdeploy repo`` and ``sfdeploy serve``."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import click

from sfdeploy.artifacts import LOCAL_BACKENDS
from sfdeploy.cli.options import DeviceType, GreedyOption, max_video_pixels_option
from sfdeploy.decode.gpu.select import SERVER_DECODE_MODES
from sfdeploy.precision import SERVE_PRECISIONS
from sfdeploy.serving.repo import GPU_DECODE_INSTANCES, RepoOptions
from sfdeploy.serving.server import TritonServer
from sfdeploy.shmkey import key_file as shm_key_file

REPO = RepoOptions(repo=Path("model_repository"))  # the defaults of `repo`, and of `serve` below
SERVE = TritonServer(REPO.repo)


@click.command()
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--repo", "repo_dir", default=REPO.repo, show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="The Triton model repository to write into.")
@click.option("--name", default=REPO.name, show_default=True,
              help="Model name (native variants add _onnx, _torchscript).")
@click.option("--max-batch", default=REPO.max_batch, show_default=True, type=click.IntRange(min=1),
              help="max_batch_size.")
@click.option("--instances", default=REPO.instances, show_default=True, type=click.IntRange(min=1),
              help="<name>'s model instances: per GPU on KIND_GPU (Triton's count is per GPU), else on the CPU.")
@click.option("--version", "version", default=REPO.version, show_default=True, type=click.IntRange(min=1),
              help="Version folder to write (a new number keeps the older versions).")
@click.option("--runtime", default=REPO.runtime, show_default=True,
              type=click.Choice(["auto", *LOCAL_BACKENDS]),
              help="What the python-backend model runs. auto: the fastest the export measured on this instance "
                   "kind (`sfdeploy export` times every artifact that passes its gate); without a measurement for "
                   "it, torchscript. The choice and its reason are logged and written into config.pbtxt.")
@click.option("--precision", default=REPO.precision, show_default=True, type=click.Choice(SERVE_PRECISIONS),
              help="Which precision of the export to serve: auto chooses with --runtime (without a measurement: "
                   "fp16 on a GPU if the export has it and it passed the gate, else fp32).")
@click.option("--device", default=REPO.device, show_default=True, type=DeviceType(),
              help="Instance kind: cuda = KIND_GPU (the server's GPUs; none needed here), cpu = KIND_CPU; auto = "
                   "the GPU if torch sees one here. (gpu: the same as cuda.)")
@click.option("--queue-delay-us", default=REPO.queue_delay_us, show_default=True, type=click.IntRange(min=0),
              help="How long the dynamic batcher waits to fill a batch.")
@click.option("--tensorrt", is_flag=True, help="Add the TensorRT fp16 accelerator to <name>_onnx (NVIDIA's container).")
@click.option("--native/--no-native", default=True, show_default=True,
              help="Also write <name>_onnx and <name>_torchscript for NVIDIA's Triton container.")
@click.option("--video/--no-video", default=True, show_default=True,
              help="Also write <name>_video: send encoded video files, decoded on the server.")
@click.option("--decode", default=REPO.decode, show_default=True, type=click.Choice(SERVER_DECODE_MODES),
              help="Where <name>_video decodes. auto: NVDEC on the GPU instances (--device cuda) when the server has "
                   "a GPU decoder (pynvvideocodec, torchcodec) and the export's fidelity record passed the stream's "
                   "codec, else the CPU; gpu: NVDEC without a fidelity record (needs --device cuda); cpu. A stream "
                   "NVDEC cannot take is decoded on the CPU; each answer says which decoder read the video and why.")
@click.option("--decode-instances", type=click.IntRange(min=1),
              help="<name>_video instances, each decoding one video at a time [default: the CPU count; decoding on "
                   f"the GPU: {GPU_DECODE_INSTANCES} per GPU].")
@click.option("--max-video-mb", default=REPO.max_video_mb, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="<name>_video refuses larger videos before decoding them; `serve` refuses larger requests to it "
                   "before reading them.")
@max_video_pixels_option("<name>_video")
@click.option("--decode-queue-timeout", default=REPO.decode_queue_timeout_s, show_default=True,
              type=click.FloatRange(min=0),
              help="<name>_video: a request waiting longer for a decode instance is refused (HTTP 503, gRPC "
                   "UNAVAILABLE: retry later) instead of waiting on; 0: no limit.")
@click.option("--decode-max-queue", default=REPO.decode_max_queue, show_default=True, type=click.IntRange(min=0),
              help="<name>_video: requests arriving when this many wait are refused at once (503); each waiting "
                   "request holds its upload in memory; 0: no limit.")
def repo(export_dir: Path, repo_dir: Path, name: str, max_batch: int, instances: int, version: int, runtime: str,
         precision: str, device: str, queue_delay_us: int, tensorrt: bool, native: bool, video: bool, decode: str,
         decode_instances: int | None, max_video_mb: float, max_pixels: int, decode_queue_timeout: float,
         decode_max_queue: int) -> None:
    """Write a Triton model repository for EXPORT (an `sfdeploy export` folder).

    <name> runs the artifact in Triton's python backend (what `sfdeploy serve` serves here);
    <name>_onnx and <name>_torchscript use Triton's onnxruntime and pytorch backends. Each has
    dynamic batching, instance groups, labels.txt and the clip spec in its parameters.
    <name>_video takes the bytes of encoded video files (any client, any language), decodes them
    with sfdeploy's preprocessing on the server and runs the clips through <name>. Safe to
    re-run: unchanged files are left alone.
    """
    from sfdeploy.serving.repo import write_repository

    folders = write_repository(export_dir, RepoOptions(
        repo=repo_dir, name=name, max_batch=max_batch, instances=instances, version=version, runtime=runtime,
        precision=precision, device=device, queue_delay_us=queue_delay_us, tensorrt=tensorrt, native=native,
        video=video, decode=decode, decode_instances=decode_instances, max_video_mb=max_video_mb,
        max_video_pixels=max_pixels, decode_queue_timeout_s=decode_queue_timeout, decode_max_queue=decode_max_queue))
    click.echo(json.dumps({"repo": str(repo_dir), "models": [f.name for f in folders], "version": version}))


@click.command()
@click.option("--repo", "repo_dir", default=REPO.repo, show_default=True,
              type=click.Path(path_type=Path), help="The model repository to serve.")
@click.option("--host", default=SERVE.host, show_default=True,
              help="Address to bind; 0.0.0.0 exposes the server to the network.")
@click.option("--http-port", default=SERVE.http_port, show_default=True, type=click.IntRange(1, 65535))
@click.option("--grpc-port", default=SERVE.grpc_port, show_default=True, type=click.IntRange(1, 65535))
@click.option("--metrics-port", default=SERVE.metrics_port, show_default=True, type=click.IntRange(1, 65535))
@click.option("--models", cls=GreedyOption, multiple=True, metavar="NAME ...",
              help="Models to load [default: every python-backend model of the repository].")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), help="Server log [default: a temp file].")
@click.option("--startup-timeout", default=int(SERVE.startup_timeout_s), show_default=True, type=click.IntRange(min=1),
              help="Seconds to wait for the models to be ready.")
@click.option("--allow-model-control", is_flag=True,
              help="Let clients list, load and unload the repository's models (closed by default).")
@click.option("--allow-remote-shm", is_flag=True,
              help="Let clients on non-loopback connections register shared memory (still only with the server's "
                   "key, which `serve` writes for this user on this machine); by default only loopback clients may.")
@click.option("--idle-timeout", default=SERVE.idle_timeout_s, show_default=True, type=click.FloatRange(min=1),
              help="Seconds a client connection may stay open with no request in flight.")
@click.option("--max-connections", default=SERVE.max_connections, show_default=True, type=click.IntRange(min=1),
              help="Client connections at once (HTTP and gRPC together); more are refused.")
@click.option("--memory-budget-mb", default=SERVE.memory_budget_mb, show_default=True, type=click.IntRange(min=0),
              help="Memory the requests in flight may cost at once (a request costs ~2x its size for a clip model, "
                   "~4x for <name>_video); one that does not fit is answered 503 / UNAVAILABLE, retry later. "
                   "A request alone always fits; 0: no budget.")
def serve(repo_dir: Path, host: str, http_port: int, grpc_port: int, metrics_port: int, models: tuple[str, ...],
          log_file: Path | None, startup_timeout: int, allow_model_control: bool, idle_timeout: float,
          max_connections: int, memory_budget_mb: int, allow_remote_shm: bool) -> None:
    """Run the tritonserver shipped in nvidia-pytriton on a model repository until Ctrl-C.

    Binds 127.0.0.1 unless --host says otherwise, waits until the models are ready, prints the
    endpoints, and shuts the server down cleanly on Ctrl-C or SIGTERM. Requests larger than their
    model accepts (its largest clip batch; for <name>_video, `repo --max-video-mb`) are refused
    before they are read, idle connections are closed, model control is closed unless asked for,
    and when the server dies or is killed nothing of it is left running.
    """
    server = TritonServer(repo_dir, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          models=list(models) or None, log_file=log_file, startup_timeout_s=startup_timeout,
                          allow_model_control=allow_model_control, idle_timeout_s=idle_timeout,
                          max_connections=max_connections, memory_budget_mb=memory_budget_mb,
                          allow_remote_shm=allow_remote_shm)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    try:
        click.echo(f"ready: http {server.http_url}  grpc {server.grpc_url}  metrics {host}:{metrics_port}", err=True)
        click.echo(f"models: {', '.join(server.loaded)}", err=True)
        click.echo("request limits: " + ", ".join(f"{m} {size / 2**20:.1f} MB" for m, size in server.limits.items())
                   + f"; memory budget {memory_budget_mb} MB; idle connections closed after {idle_timeout:g} s; "
                   "model control "
                   + ("open" if allow_model_control else "closed"), err=True)
        for name, why in server.skipped.items():
            click.echo(f"not loaded: {name} ({why})", err=True)
        click.echo(f"log: {server.log_file}", err=True)
        click.echo(f"shared-memory key (for this user's `infer --shm`): {shm_key_file(http_port)}", err=True)
        click.echo(json.dumps({"http": server.http_url, "grpc": server.grpc_url, "models": server.loaded,
                               "pid": server.process.pid}))
        sys.stdout.flush()
        while not stop.wait(0.5):
            if (ended := server.running()) is not None:
                raise click.ClickException(f"{ended} unexpectedly; see {server.log_file}")
        click.echo("stopping tritonserver", err=True)
    finally:
        server.stop()
