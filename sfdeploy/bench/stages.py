"""Which rows each stage of ``sfdeploy bench`` measures, and the resources they share.

A stage is a planner: ``plan(ctx) -> list[Task]``, registered in :data:`sfdeploy.bench.plan.PLANNERS`.
Planning is cheap (no model is exported, no server started): a :class:`Task` only names its row (the record's
key) and how to measure it. The runner measures the tasks the record lacks, one at a time, and
the measurement asks the :class:`sfdeploy.bench.context.Context` for what it needs (the bench
export, a predictor, the server, the videos, the served choice), each made on first use.

To add a row kind: a measuring function in :mod:`sfdeploy.bench.suites` that returns the row dict,
and a Task for it in a planner. To add a stage: a planner (here, or in its own module, as training
speed has), its name in :data:`sfdeploy.bench.STAGES` and in :data:`sfdeploy.bench.plan.PLANNERS`, and (if it
needs one) a lazily made resource on the Context.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sfdeploy.artifacts import backend_format
from sfdeploy.bench import suites
from sfdeploy.bench.context import Context
from sfdeploy.bench.rows import SKIPPED, Key
from sfdeploy.endpoints import DEFAULT_MODEL as SERVED_MODEL
from sfdeploy.errors import EnvironmentProblem
from sfdeploy.precision import native_reduced, supported
from sfdeploy.target import SERVED

log = logging.getLogger("sfdeploy")



@dataclass(frozen=True)
class Task:
    """One row to measure: what it is (its :attr:`key` in the record) and how (``measure``)."""

    stage: str
    backend: str
    precision: str
    batch: int
    concurrency: int
    measure: Callable[[Context], dict[str, Any]]

    @property
    def key(self) -> Key:
        """The row's identity in the record: what ``--resume`` looks up to skip it."""
        return (self.stage, self.backend, self.precision, self.batch, self.concurrency)


# -- stages ---------------------------------------------------------------------------------------

#: the suffix of a row made with the plain graph (no rewrites), beside the served, rewritten one
PLAIN_SUFFIX = "-plain"


def _eager(stage: str, variant: str, precision: str, batch: int, warmup: int) -> Task:
    rewrites = suites.REWRITTEN if variant == "eager-rewrites" else suites.PLAIN

    def measure(c: Context) -> dict[str, Any]:
        module = c.hold(("eager", variant, precision), lambda: suites.variant_module(
            suites.deploy_module(c.model, precision, c.device, rewrites), variant))
        frames = torch.from_numpy(suites.random_clips(c.model.spec, batch)).to(c.device)
        return suites.sequential_row(stage, variant, precision, batch, suites.module_call(module, frames), c.device,
                                     warmup, c.opts.iters, note="input already on the device",
                                     min_time_s=c.opts.min_time_s)
    return Task(stage, variant, precision, batch, 1, measure)


#: the suffix of a torch runtime's row without its CUDA graphs, beside the row with them (on CUDA)
NO_GRAPHS_SUFFIX = "-nographs"


def _local(backend: str, precision: str, batch: int, plain: bool = False, graphs: bool = True) -> Task:
    """``backend`` on the export `sfdeploy export` makes (rewrites for this device), or, ``plain``,
    on the plain graph (row ``<backend>-plain``): the two side by side show what the rewrites give;
    without ``graphs`` (row ``<backend>-nographs``), what its CUDA graphs give."""
    name = backend + (PLAIN_SUFFIX if plain else "") + ("" if graphs else NO_GRAPHS_SUFFIX)
    note = ("; plain graph run as loaded (no rewrites, CUDA graphs or CPU optimisation)" if plain else
            "" if graphs else "; without CUDA graphs")

    def measure(c: Context) -> dict[str, Any]:
        device, why = c.ort_device() if backend == "onnxruntime" else (c.device, "")
        if not device:
            return suites.unmeasured_row("model", name, precision, batch, 1, SKIPPED, why)
        predictor = c.local(backend, precision, device, suites.PLAIN if plain else suites.REWRITTEN, graphs)
        frames = suites.random_clips(c.model.spec, batch)
        return suites.sequential_row("model", name, precision, batch, lambda: predictor.predict(frames), device,
                                     c.opts.warmup, c.opts.iters, note="numpy uint8 in, numpy out" + note,
                                     min_time_s=c.opts.min_time_s)
    return Task("model", name, precision, batch, 1, measure)


def _mmaction2(c: Context) -> dict[str, Any]:
    call = c.hold(("mmaction2",), lambda: suites.mmaction2_call(c.model, c.device))
    return suites.sequential_row("model", "mmaction2", "fp32", 1, call, c.device, c.opts.warmup, c.opts.iters,
                                 note="test_step, as inference_recognizer: the baseline", min_time_s=c.opts.min_time_s)


def profile_precision(c: Context) -> str:
    """The precision the operator profile looks at: the device's native reduced one when measured."""
    reduced = native_reduced(c.device)
    return reduced if reduced in c.opts.precisions else c.opts.precisions[0]


def _profile(c: Context) -> dict[str, Any]:
    precision = profile_precision(c)
    module = c.hold(("eager", "eager-rewrites", precision),  # the exported graph's operators
                    lambda: suites.deploy_module(c.model, precision, c.device, suites.REWRITTEN))
    frames = torch.from_numpy(suites.random_clips(c.model.spec, max(c.opts.batch_sizes))).to(c.device)
    return suites.profile_row(module, frames, precision, c.device)


def plan_model(c: Context) -> list[Task]:
    """MMAction2's batch-1 baseline; TorchScript (as exported, then the plain graph beside it),
    the operator profile of the exported graph with --trace, eager (plain and rewritten), ONNX
    Runtime, the ExportedProgram and the AOTInductor package, at every batch size and precision
    their format holds (on CUDA, the last two also without CUDA graphs at the smallest batch). In
    that order: a run cut short has measured what the targets are about first. The served runtime
    is then chosen from these rows (:attr:`Context.choice`)."""
    opts, tasks = c.opts, []
    if "mmaction2" in opts.backends:
        tasks.append(Task("model", "mmaction2", "fp32", 1, 1, _mmaction2))
    if "torchscript" in opts.backends:  # what the rewrites and the runtime's optimisations give it
        tasks += [_local("torchscript", p, b) for p in opts.precisions for b in opts.batch_sizes]
        tasks += [_local("torchscript", p, b, plain=True) for p in opts.precisions for b in opts.batch_sizes]
    if opts.trace:
        tasks.append(Task("model", "eager-profile", profile_precision(c), max(opts.batch_sizes), 1, _profile))
    if "eager" in opts.backends:
        tasks += [_eager("model", v, p, b, opts.warmup) for p in opts.precisions for v in ("eager", "eager-rewrites")
                  for b in opts.batch_sizes]
    for runtime in ("onnxruntime", "torch_export", "aoti"):
        if runtime in opts.backends:
            precisions = [p for p in opts.precisions if supported(backend_format(runtime), p)]
            tasks += [_local(runtime, p, b) for p in precisions for b in opts.batch_sizes]
            if runtime != "onnxruntime" and c.device.is_cuda:  # do CUDA graphs still pay (fused kernels)?
                tasks += [_local(runtime, p, min(opts.batch_sizes), graphs=False) for p in precisions]
    return tasks


def _in_process(runtime: str, precision: str, batch: int, concurrency: int) -> Task:
    def measure(c: Context) -> dict[str, Any]:
        predictor = c.local(runtime, precision, c.device)
        frames = suites.random_clips(c.model.spec, batch)
        return suites.concurrent_row("triton", runtime, precision, batch, concurrency,
                                     lambda: predictor.predict(frames), c.device, c.opts.warmup, c.opts.iters,
                                     note=f"in-process reference: {concurrency} thread(s), one predictor",
                                     min_time_s=c.opts.min_time_s)
    return Task("triton", runtime, precision, batch, concurrency, measure)


#: how each served row reaches the server: (protocol, how the input travels: a sfdeploy.transport.SharedMemory name)
SERVED_TRANSPORTS = {"triton-http": ("http", "none"), "triton-grpc": ("grpc", "none"),
                     "triton-shm": ("grpc", "system"), "triton-cuda-shm": ("grpc", "cuda")}


def _served(backend: str, precision: str, batch: int, concurrency: int) -> Task:
    def measure(c: Context) -> dict[str, Any]:
        import time

        from sfdeploy.runtime.shm_regions import cuda_shared_memory
        from sfdeploy.transport import SharedMemory

        protocol, shm = SERVED_TRANSPORTS[backend]
        shm = SharedMemory(shm)
        if shm is SharedMemory.CUDA:  # a row of its own where it can run, else skipped saying why
            try:
                if not c.device.is_cuda:
                    raise EnvironmentProblem(f"CUDA shared memory is measured on --device cuda (this run: {c.device})")
                cuda_shared_memory(c.device.index or 0)
            except EnvironmentProblem as exc:
                return suites.unmeasured_row("triton", backend, precision, batch, concurrency, SKIPPED, exc.message)
        predictor = c.hold((backend,), c.served_target(protocol, shm=shm).open, lambda p: p.close())
        frames = suites.random_clips(c.model.spec, batch)
        if shm is SharedMemory.CUDA:  # on the GPU, as a GPU decoder hands it over: sent device to device
            frames = torch.from_numpy(frames).to(c.device)
        before, started = predictor.statistics(), time.perf_counter()
        row = suites.concurrent_row("triton", backend, precision, batch, concurrency,
                                    lambda: predictor.predict(frames), c.device, c.opts.warmup, c.opts.iters,
                                    note=f"python backend, {c.served_runtime}; "
                                         f"{f'{shm.describe()}, ' if shm else ''}server memory not counted",
                                    min_time_s=c.opts.min_time_s)
        if row.get("status") == "ok":  # Triton's own account of the same requests
            row["server"] = suites.server_stats_delta(before, predictor.statistics(), time.perf_counter() - started)
        return row
    return Task("triton", backend, precision, batch, concurrency, measure)


def plan_triton(c: Context) -> list[Task]:
    """The served model (HTTP, gRPC, gRPC with the input in system or CUDA shared memory) and, at each of
    its concurrencies, the same runtime in this process with as many threads: like for like,
    measured side by side; each served row carries Triton's own statistics for its requests."""
    opts = c.opts
    served = [b for b in SERVED_TRANSPORTS if b in opts.backends]
    if not served:
        return []
    precision, batch, tasks = c.served_precision, opts.triton_batch, []
    for concurrency in opts.concurrency:
        tasks.append(_in_process(c.served_runtime, precision, batch, concurrency))
        tasks += [_served(b, precision, batch, concurrency) for b in served]
    return tasks


def plan_e2e(c: Context) -> list[Task]:
    """Videos -> predictions: decode only (the ceiling), sfdeploy (through the served model when
    Triton is benchmarked, else in process), MMAction2's inference_recognizer one video at a time;
    then, for each GPU decoder, decode-only and end to end with GPU decoding (the served runtime in
    process on the GPU: the measured comparison of the decoders), each recorded as skipped, with
    the reason, where that decoder cannot run."""
    opts = c.opts
    via = next((b for b in ("triton-grpc", "triton-http") if b in opts.backends), c.served_runtime)
    batch, concurrency = opts.triton_batch, max(opts.concurrency)

    def decode_only(c: Context) -> dict[str, Any]:
        return suites.decode_only_row(c.model.spec, c.videos(), c.workers)

    def sfdeploy(c: Context) -> dict[str, Any]:
        from sfdeploy.client import Classifier

        paths = c.videos()
        if via.startswith(SERVED):
            target = c.served_target(via.split("-")[1])
        else:
            c.release()
            target = c.local_target(via, c.served_precision, c.device)
        with Classifier.open(target) as classifier:
            return suites.sfdeploy_row(f"sfdeploy:{via}", classifier, c.served_precision, paths, workers=c.workers,
                                       batch=batch, concurrency=concurrency)

    def mmaction2(c: Context) -> dict[str, Any]:
        c.release()
        return suites.mmaction2_videos_row(c.model, c.videos()[: opts.mmaction2_videos], c.device)

    tasks = [Task("e2e", "decode-only", "-", 1, 1, decode_only),
             Task("e2e", f"sfdeploy:{via}", c.served_precision, batch, concurrency, sfdeploy)]
    if "triton-video" in opts.backends:  # decoding on the server (CPU, GPU) vs on the client, like for like
        tasks += [_decode_where(where, c.served_precision, concurrency) for where in ("cpu", "gpu", None)]
    if "mmaction2" in opts.backends:
        tasks.append(Task("e2e", "mmaction2:inference_recognizer", "fp32", 1, 1, mmaction2))
    from sfdeploy.decode.gpu.select import GPU_BACKENDS

    for backend in GPU_BACKENDS:
        tasks += [_gpu_decode(backend, c.served_runtime, None, 1, 1),
                  _gpu_decode(backend, c.served_runtime, c.served_precision, batch, concurrency)]
    return tasks


#: the names of the GPU-decoding rows of the e2e stage
GPU_DECODE_ONLY = "gpu-decode-only:{}"
GPU_DECODE_E2E = "sfdeploy:{} (gpu decode: {})"


def _gpu_decode(backend: str, runtime: str, precision: str | None, batch: int, concurrency: int) -> Task:
    """GPU decoding with ``backend``: decode only (``precision`` None) or end to end through the
    served runtime in process on the bench's GPU (Triton takes host clips here)."""
    def measure(c: Context) -> dict[str, Any]:
        from sfdeploy.decode.gpu.select import plan_decoding, probe_backend
        from sfdeploy.errors import SfdeployError

        try:
            if not c.device.is_cuda:
                raise EnvironmentProblem(f"GPU decoding is measured with --device cuda (this run: {c.device})")
            plan = plan_decoding(backend, device=c.device, statuses=[probe_backend(backend)])
        except SfdeployError as exc:
            return suites.unmeasured_row("e2e", name, precision or "-", batch, concurrency, SKIPPED, exc.message,
                                         kind="videos")
        c.release()
        if precision is None:
            return suites.gpu_decode_only_row(name, c.model.spec, c.videos(), plan, c.workers)
        from sfdeploy.client import Classifier

        classifier = Classifier.from_export(c.export((backend_format(runtime), precision)), runtime, precision,
                                            c.device)
        with classifier:
            return suites.sfdeploy_row(name, classifier, precision, c.videos(), workers=c.workers, batch=batch,
                                       concurrency=concurrency, decode=backend)

    name = GPU_DECODE_ONLY.format(backend) if precision is None else GPU_DECODE_E2E.format(runtime, backend)
    return Task("e2e", name, precision or "-", batch, concurrency, measure)


def _decode_where(server_decode: str | None, precision: str, concurrency: int) -> Task:
    """A ``triton-video`` row: decoding on the server's ``cpu`` or ``gpu``, or (None) on the client."""
    from sfdeploy.bench import video

    def measure(c: Context) -> dict[str, Any]:
        from sfdeploy.artifacts import video_model_name

        c.release()
        why_not = c.server_gpu_decoding()[1] if server_decode == "gpu" else ""
        server = None if why_not else c.server()
        if server is not None:  # numpy 2: the stub cannot pass BYTES tensors, <name>_video is not served
            why_not = server.skipped.get(video_model_name(SERVED_MODEL), "")
        if why_not:
            return suites.unmeasured_row("e2e", name, precision, 1, concurrency, SKIPPED, why_not, kind="videos")
        return video.decode_row(server.grpc_url, SERVED_MODEL, precision, c.videos(),
                                server_decode=server_decode, concurrency=concurrency, workers=c.workers)
    name = video.row_name(server_decode)
    return Task("e2e", name, precision, 1, concurrency, measure)


def plan_compile(c: Context) -> list[Task]:
    """Variants sfdeploy does not serve, listed apart: torch.compile (inductor) at the largest batch
    (fusion, for throughput) and, on CUDA, CUDA graphs (``reduce-overhead``) at the smallest (launch
    overhead, for latency). Compiling R50 takes a minute or more per row, in the untimed warm-up."""
    opts = c.opts
    if "eager" not in opts.backends:
        return []
    variants = [("eager-compile", max(opts.batch_sizes))]
    if c.device.is_cuda:
        variants.append(("eager-cudagraphs", min(opts.batch_sizes)))
    warmup = max(opts.warmup, 3)  # the first calls compile (and record the graphs): never timed
    return [_eager("compile", v, p, b, warmup) for p in opts.precisions for v, b in variants]


#: the inference stages' planners; :mod:`sfdeploy.bench.plan` adds those of the training and distillation stages
PLANNERS: dict[str, Callable[[Context], list[Task]]] = {
    "model": plan_model, "triton": plan_triton, "e2e": plan_e2e, "compile": plan_compile}
