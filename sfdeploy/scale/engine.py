"""``sfdeploy infer --engine ray``: the same rows as the local engine, computed on a Ray cluster.

::

    from sfdeploy.scale.engine import RayOptions, infer_ray

    options = RayOptions(ModelTarget(export_dir="EXPORT"), InferOptions(batch_size=8, concurrency=2))
    summary = infer_ray(["videos/"], "p.parquet", options)

The pipeline is Ray Data, nothing of our own to schedule::

    paths (blocks of N) -> decode tasks (1 CPU, an isolated decoder process each)
                        -> model actors (--concurrency of them; 1 GPU each with --device cuda,
                           or Triton clients spread over --url A --url B)
                        -> rows, streamed back to this process and written as they arrive

Only paths travel to the decode tasks (not frames: ``ray.data.read_videos`` would emit every
frame); decoded clips travel from decode tasks to model actors through the object store, bounded
by :func:`sfdeploy.scale.cluster.size_object_store`; small rows come back. Rows are written by
:func:`sfdeploy.output.write_predictions`, the writer of the local engine: same files, same
``--resume``, same summary, same options (:class:`~sfdeploy.infer_options.InferOptions`), plus
where the work ran (:mod:`sfdeploy.scale.placement`). Ray retries the work of a killed worker (a
path may then arrive twice: it is written once); a file that crashes its decoder is its own error
row; a run that cannot go on (a lost node, and no room left to redo its work) stops with a clear
error (:mod:`sfdeploy.scale.stall`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sfdeploy.clipspec import ClipSpec
from sfdeploy.errors import OptionError, ServingError, SfdeployError
from sfdeploy.infer_options import InferOptions
from sfdeploy.output import InferSummary, write_predictions
from sfdeploy.predictions import Prediction
from sfdeploy.progress import bar
from sfdeploy.scale.cluster import (
    STALL_TIMEOUT_S,
    MiB,
    Sizing,
    check_placement,
    connect,
    disconnect,
    preflight,
    quiet_loggers,
    shm_note,
    size_object_store,
)
from sfdeploy.scale.console import without_harmless_ray_line
from sfdeploy.scale.placement import Placement, node_names
from sfdeploy.target import ModelTarget

log = logging.getLogger("sfdeploy")

MAX_VIDEOS_PER_TASK = 256  # a killed decode task redoes at most this many videos
TASKS_PER_SLOT = 2  # decode tasks per decode slot: spreads the tail of the run over the cluster
# Ray Data's per-run notices (progress bars off, execution finished) stay off the user's terminal.
RAY_DATA_NOTICES = {"ray.data._internal.progress": logging.ERROR,
                    "ray.data._internal.execution.streaming_executor": logging.WARNING}


@dataclass
class RayOptions:
    """How ``--engine ray`` runs: the model and the options (as for the local engine), and the
    cluster's share."""

    # the model, as for the local engine; a local backend's export_dir must be at the same path on
    # every node; device cuda: one GPU per model actor, auto: one where the cluster has GPUs; triton:
    # batches are spread over target.urls (shm only for servers on the actors' machines)
    target: ModelTarget = field(default_factory=ModelTarget)
    # as for the local engine; here concurrency is the model actors [RAY_ACTORS] and workers the
    # decode tasks at once [as many as the CPUs allow]
    infer: InferOptions = field(default_factory=InferOptions)
    actor_cpus: float | None = None  # CPUs (threads) per model actor [see model_cpus]
    address: str | None = None  # --ray-address; None starts Ray on this machine (or uses the one this process runs)
    # no row for this long while Ray cannot place the run's work: stop (0: never)
    stall_timeout_s: float = STALL_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.infer.decode not in ("auto", "cpu"):
            raise OptionError(f"--decode {self.infer.decode} decodes here, into the GPU of a local model; "
                              "--engine ray decodes in CPU tasks", option="--decode", fix="use --decode cpu or auto")
        if self.target.server_decode:
            raise OptionError("--engine ray decodes in its own CPU tasks, not on the server", option="--server-decode",
                              fix="use --engine local with --server-decode, or drop --server-decode")

    @property
    def actors(self) -> int:
        """Model actors (``--concurrency``)."""
        return self.infer.model_actors()

    def model_cpus(self) -> float:
        """CPUs reserved per model actor: a fraction of one for a Triton client, else one (or
        ``--actor-cpus``)."""
        if self.actor_cpus is not None:
            return self.actor_cpus
        return 1.0 if self.target.local else 0.25

    def model_threads(self) -> int:
        """Inference threads of a model actor: ``--actor-cpus`` when given, else two. Two threads
        on the one reserved CPU share the cores with the decode tasks as the local engine's
        model shares them with its decode workers (ONNX Runtime's threads do not spin while they
        wait): on 2 cores 1,920 videos took 35-36 s against 38-42 s with one thread. On a GPU the
        thread count hardly matters. Scale a CPU model further with more actors (--concurrency)."""
        if self.actor_cpus is not None:
            return max(1, int(self.actor_cpus))
        return 2


@dataclass
class RaySummary(InferSummary):
    """The summary of :func:`sfdeploy.client.infer`, and where the work ran."""

    decoded_by_node: dict[str, int] = field(default_factory=dict)  # node id -> videos decoded (and written)
    batches_by_actor: dict[str, dict[str, int]] = field(default_factory=dict)  # actor id -> node id -> batches
    nodes: dict[str, str] = field(default_factory=dict)  # node id -> "host, ip[, lost]"


def infer_ray(inputs: Sequence[str | Path], out: str | Path, options: RayOptions | None = None, *,
              resume: bool = False, show_progress: bool = True) -> RaySummary:
    """Classify ``inputs`` into ``out`` on Ray: the rows, ``--resume`` and summary of
    :func:`sfdeploy.client.infer`, and where the work ran (also logged at the end of the run)."""
    options = options or RayOptions()
    placement = Placement()
    # What would fail at once fails before --out is created: a bad --export or --url, a head that
    # does not answer or wants a token (so the same command runs again once it is fixed).
    spec = options.target.read_spec()
    preflight(options.address)
    # Ray prints its raylet's notices (a task retried, a worker died) to stdout; ours carries the
    # summary that scripts parse, so notices go to stderr while the run lasts.
    with contextlib.redirect_stdout(sys.stderr):
        summary = write_predictions(inputs, out, lambda todo: classify_ray(
            todo, options, show_progress=show_progress, placement=placement, spec=spec), resume=resume)
    return RaySummary(**vars(summary), decoded_by_node=dict(placement.decoded),
                      batches_by_actor=placement.batch_counts(), nodes=placement.nodes)


def classify_ray(paths: Sequence[str], options: RayOptions, *, show_progress: bool = False,
                 placement: Placement | None = None, spec: ClipSpec | None = None) -> Iterator[Prediction]:
    """One :class:`Prediction` per video file of ``paths`` (expanded already:
    :func:`sfdeploy.inputs.collect_inputs`), in completion order (a retried one may come twice).

    Raises :class:`ServingError` (or the error a stage raised) if the run cannot finish; the
    predictions yielded before stay valid. ``placement`` counts where the work ran; ``spec`` is
    :meth:`~sfdeploy.target.ModelTarget.read_spec`'s, when the caller has read it.
    """
    placement = placement if placement is not None else Placement()
    paths = list(paths)
    if not paths:
        return
    spec = spec or options.target.read_spec()
    decode_slots = options.infer.workers or os.cpu_count() or 1
    # Started here, Ray gets a CPU per decode slot beside the model actors' CPUs: one machine then
    # runs what the local engine runs (a decode process per core, and the model).
    cluster = connect(options.address, num_cpus=decode_slots + math.ceil(options.actors * options.model_cpus()))
    seen: set[str] = set()
    try:
        dataset = _pipeline(paths, spec, options, cluster)
        shown = bar(len(paths), desc=f"infer ray:{options.target.backend}", unit="video", enabled=show_progress)
        try:
            with quiet_loggers(RAY_DATA_NOTICES), without_harmless_ray_line():
                for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                    for row in table.to_pylist():
                        first = row["path"] not in seen
                        prediction = Prediction.from_arrow_row(placement.take(row, written=first))
                        if first:
                            seen.add(prediction.path)
                            shown.update(1)
                        yield prediction
        except Exception as exc:  # Ray wraps a stage's error: raise the sfdeploy error inside it
            raise _unwrap(exc) from exc
        finally:
            shown.close()
            placement.nodes = node_names()
            for line in placement.describe():
                log.info("ray: %s", line)
    finally:
        disconnect(cluster)
    missing = len(set(paths) - seen)
    if missing:
        raise ServingError(f"the Ray run ended without a row for {missing} of {len(set(paths))} videos",
                           fix="run the same command with --resume to classify them")


@dataclass(frozen=True)
class _Shares:
    """What each stage of one run gets of the cluster."""

    model_cpus: float  # CPUs per model actor
    gpus: int  # GPUs per model actor
    decode_slots: int  # decode tasks at once
    per_task: int  # videos per decode task
    decode_memory: int  # bytes reserved per decode task
    sizing: Sizing  # the object store's budget for decoded clips


def _share(paths: list[str], spec: ClipSpec, options: RayOptions, cluster: Any) -> _Shares:
    """Divide ``cluster`` between the decode tasks and the model actors, or fail at once where the
    actors cannot be placed; the division is logged."""
    import numpy as np

    model_cpus = options.model_cpus()
    # One GPU per model actor for --device cuda, and for auto where the cluster has GPUs (the actor
    # then resolves auto itself: onnxruntime without its CUDA provider runs on the actor's CPU).
    target = options.target
    wants_gpu = target.device.is_cuda or (target.device.is_auto and cluster.gpus >= 1)
    gpus = 1 if wants_gpu and target.local else 0
    check_placement(cluster, actors=options.actors, actor_cpus=model_cpus, actor_gpus=gpus)
    decode_slots = max(1, int(cluster.cpus - options.actors * model_cpus))
    if options.infer.workers:
        decode_slots = min(decode_slots, options.infer.workers)
    batch_size = options.infer.batch_size
    per_task = min(MAX_VIDEOS_PER_TASK, max(batch_size, math.ceil(len(paths) / (TASKS_PER_SLOT * decode_slots))))
    clip_bytes = int(np.prod(spec.input_shape))
    sizing = size_object_store(clip_bytes, batch_size, options.actors, decode_slots, cluster.object_store_bytes)
    # A decode task holds a batch being filled and one being handed over; reserving that memory
    # lets Ray place tasks by memory too (and keeps decode and model stages separate operators).
    decode_memory = 2 * sizing.batch_bytes + 256 * MiB

    log.info("ray: %s: %.0f CPUs, %.0f GPUs, object store %.1f GiB (%s)",
             "started on this machine" if cluster.started_here else f"cluster {cluster.address}",
             cluster.cpus, cluster.gpus, cluster.object_store_bytes / 2**30, shm_note())
    log.info("ray: %s", sizing.describe())
    log.info("ray: decode: %d videos per task, up to %d tasks at once (1 CPU, %.0f MiB each); model: %d actor(s) "
             "x %g CPU (%d threads), %d GPU, %s, batch %d", per_task, decode_slots, decode_memory / MiB, options.actors,
             model_cpus, options.model_threads(), gpus, target.describe(), batch_size)
    return _Shares(model_cpus, gpus, decode_slots, per_task, decode_memory, sizing)


def _data_settings(context: Any, shares: _Shares, options: RayOptions) -> dict[str, Any]:
    """The Ray Data settings of the run: its object-store budget, one block per decoded batch, the
    stall watch, and Ray's own progress output off."""
    from sfdeploy.scale.stall import StageNeed, StallRule, watch_settings

    sizing = shares.sizing
    execution = copy.copy(context.execution_options)
    execution.resource_limits = execution.resource_limits.copy(object_store_memory=sizing.budget_bytes)
    settings = {
        "execution_options": execution,
        # Each batch a decode task yields is its own block, so model actors start on it at once
        # (Ray Data would otherwise merge a task's output up to 128 MiB before passing it on).
        "target_max_block_size": min(context.target_max_block_size or sizing.batch_bytes, sizing.batch_bytes),
        "raise_original_map_exception": True,  # a stage's SfdeployError reaches the user as itself
        "enable_progress_bars": False,  # sfdeploy's own bar counts videos
        "print_on_execution_start": False,
    }
    # What a task or actor of each stage asks Ray for: a lost one waits for this much to be free.
    model_need = (("CPU", shares.model_cpus), *((("GPU", float(shares.gpus)),) if shares.gpus else ()))
    needs = (StageNeed("decode task", (("CPU", 1.0), ("memory", float(shares.decode_memory)))),
             StageNeed("model actor", model_need))
    settings.update(watch_settings(context, StallRule(options.stall_timeout_s, needs)))
    return settings


def _pipeline(paths: list[str], spec: ClipSpec, options: RayOptions, cluster: Any) -> Any:
    """The Ray Data dataset: path blocks -> decode tasks -> model actors -> rows (lazy)."""
    import ray

    from sfdeploy.scale.stages import PredictStage, decode_videos

    shares = _share(paths, spec, options, cluster)
    context = ray.data.DataContext.get_current()
    settings = _data_settings(context, shares, options)
    # One block of paths per decode task, built here (from_arrow would run a Ray task per block
    # just to read its schema). Workers get absolute paths: they may not share our directory.
    items = [{"path": path, "file": os.path.abspath(path)} for path in paths]
    target = options.target
    if target.local:  # the workers may not share this process's directory
        target = replace(target, export_dir=target.export_dir.resolve())
    infer = options.infer
    stage = {"target": target, "spec_json": spec.to_json(), "threads": options.model_threads(), "topk": infer.topk}
    with _data_context(context, settings):  # the dataset keeps a copy; the caller's context is left as it was
        return (ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / shares.per_task))
                .map_batches(decode_videos, batch_size=None, batch_format="pyarrow", num_cpus=1,
                             memory=shares.decode_memory, compute=ray.data.TaskPoolStrategy(size=shares.decode_slots),
                             fn_kwargs={"spec_json": spec.to_json(), "batch_size": infer.batch_size,
                                        "max_pixels": infer.max_pixels})
                .map_batches(PredictStage, batch_size=infer.batch_size, batch_format="pyarrow",
                             fn_constructor_kwargs=stage, num_cpus=shares.model_cpus, num_gpus=shares.gpus,
                             compute=ray.data.ActorPoolStrategy(size=options.actors)))


@contextlib.contextmanager
def _data_context(context: Any, settings: dict[str, Any]) -> Iterator[None]:
    saved = {name: getattr(context, name) for name in settings}
    for name, value in settings.items():
        setattr(context, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(context, name, value)


def _unwrap(exc: BaseException) -> BaseException:
    """The sfdeploy error behind Ray's wrappers, else a :class:`ServingError` with Ray's message.

    A stage's exception comes back as the ``cause`` of a ``RayTaskError`` (Ray Data is told to
    raise the original); an actor that failed in ``__init__`` leaves only its traceback text.
    """
    import sfdeploy.errors

    if isinstance(exc, SfdeployError):  # raised in this process (the stall watch)
        return exc
    node: BaseException | None = exc
    for _ in range(8):
        cause = getattr(node, "cause", None)
        if isinstance(cause, SfdeployError):
            return cause
        trace = getattr(node, "error_msg", None)
        if isinstance(trace, str) and "sfdeploy.errors." in trace:
            name, _, text = trace[trace.rindex("sfdeploy.errors.") + len("sfdeploy.errors."):].partition(": ")
            kind = getattr(sfdeploy.errors, name, None)
            message, _, fix = text.partition("\n  fix: ")
            if isinstance(kind, type) and issubclass(kind, SfdeployError):
                return kind(f"{message.strip()} (on a Ray worker)", fix=fix.strip() or None)
        node = cause if isinstance(cause, BaseException) else node.__cause__ if node is not None else None
        if node is None:
            break
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ServingError(f"the Ray run failed ({type(exc).__name__}: {first_line})",
                        fix="read the Ray worker's error above; fix it, then run the same command with --resume "
                            "(finished rows are kept)")
