"""``sfdeploy bench``: build the model, export it, serve it, measure everything, write the record.

The artifacts are exported from the very module the eager rows time (no parity gate here: that
is ``export``'s job, on trained weights); the Triton rows run a real tritonserver on free ports
on 127.0.0.1. Every speed-up is a ratio against the MMAction2 baseline of the same run.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch

from sfdeploy.artifacts import resolve_device
from sfdeploy.bench import BACKENDS, suites
from sfdeploy.bench.measure import device_info, device_slug
from sfdeploy.bench.model import build_bench_model
from sfdeploy.errors import InputError

log = logging.getLogger("sfdeploy")


@dataclass
class BenchOptions:
    profile: str = "small"  # small: slowfast_tiny at 64 px; full: R50 4x16 at 224 px
    work_dir: Path | None = None  # benchmark a trained model instead
    backends: tuple[str, ...] = BACKENDS
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    precisions: tuple[str, ...] | None = None  # default: fp32 on CPU, fp32 + fp16 on CUDA
    device: str = "auto"
    concurrency: tuple[int, ...] = (1, 8)
    triton_batch: int = 8
    warmup: int = 3
    iters: int = 10
    e2e: bool = True
    e2e_videos: int = 64
    videos: Path | None = None
    workers: int | None = None
    mmaction2_videos: int = 16
    trace: bool = False
    out: Path | None = None
    scratch: Path | None = None


def _export(model: Any, precisions: list[str], device: str, out: Path) -> None:
    """TorchScript + ONNX of the bench module, and a manifest the runtimes read them through."""
    from sfdeploy.artifacts import Artifact, Manifest, artifact_file, artifact_key
    from sfdeploy.export.onnx_export import export_onnx
    from sfdeploy.export.torchscript import export_torchscript

    out.mkdir(parents=True, exist_ok=True)
    artifacts = {}
    for precision in precisions:
        where = device if precision != "fp32" else "cpu"
        module = suites.deploy_module(model, precision, where)
        example = torch.from_numpy(suites.random_clips(model.spec, 2)).to(where)
        for fmt, exporter in (("torchscript", export_torchscript), ("onnx", export_onnx)):
            path = out / artifact_file(fmt, precision)
            log.info("bench: exporting %s %s", fmt, precision)
            exporter(module, example, path, model.spec.to_json(), precision)
            artifacts[artifact_key(fmt, precision)] = Artifact.of(fmt, precision, path)
    Manifest(clip_spec=model.spec, artifacts=artifacts, source={"benchmark": model.name},
             parity={"skipped": "benchmark artifacts: exported from the module the eager rows time"}).write(out)


def _targets(rows: list[dict], e2e: dict | None, device: str, profile: str) -> list[dict[str, str]]:
    """Where the run stands against the issue's targets (GPU targets on the full profile)."""
    def best(backend_prefix: str, precision: str | None = None, batch: int | None = None) -> dict | None:
        pool = [r for r in rows if r["backend"].startswith(backend_prefix) and r["clips_per_s"] > 0
                and (precision is None or r["precision"] == precision) and (batch is None or r["batch"] == batch)]
        return max(pool, key=lambda r: r["clips_per_s"], default=None)

    targets = []
    local = [r for r in rows if r["backend"] not in ("mmaction2",) and not r["backend"].startswith("triton")]
    top = max(local, key=lambda r: r["clips_per_s"], default=None)
    if top:
        target = ">= 4,000 clips/s (R50 4x16 224, fp16, H100)" if profile == "full" and device != "cpu" else \
            "best model-only throughput"
        ok = top["clips_per_s"] >= 4000 if profile == "full" and device != "cpu" else None
        targets.append({"target": target, "measured": f"{top['clips_per_s']:.1f} clips/s ({top['backend']} "
                        f"{top['precision']}, batch {top['batch']})", "status": _status(ok)})
        targets.append({"target": ">= 30x the MMAction2 batch-1 baseline" if profile == "full" else
                        "speed-up over the MMAction2 batch-1 baseline",
                        "measured": f"{top['speedup_vs_mmaction2']:.1f}x",
                        "status": _status(top["speedup_vs_mmaction2"] >= 30 if profile == "full" else None)})
    for protocol in ("grpc", "http"):
        served = best(f"triton-{protocol}")
        if served:
            here = best("torchscript", served["precision"], served["batch"])  # what the server runs
            if here:
                ratio = served["clips_per_s"] / here["clips_per_s"]
                targets.append({"target": f"Triton ({protocol}) >= 95% of in-process at batch {served['batch']}",
                                "measured": f"{ratio:.0%} ({served['clips_per_s']:.1f} vs {here['clips_per_s']:.1f} "
                                            f"clips/s {here['backend']}, concurrency {served['concurrency']})",
                                "status": _status(ratio >= 0.95)})
    if e2e:
        targets.append({"target": "end-to-end >= 90% of decode-only", "measured": f"{e2e['efficiency']:.0%}",
                        "status": _status(e2e["efficiency"] >= 0.9)})
    for batch in sorted({r["batch"] for r in rows}):
        ort, eager = best("onnxruntime", "fp32", batch), best("eager", "fp32", batch)
        if ort and eager and device == "cpu":
            targets.append({"target": f"CPU: ONNX Runtime / eager at batch {batch}",
                            "measured": f"{ort['clips_per_s'] / eager['clips_per_s']:.2f}x", "status": "reported"})
    return targets


def _status(ok: bool | None) -> str:
    return "reported" if ok is None else ("met" if ok else "not met")


def run_bench(opts: BenchOptions) -> tuple[dict[str, Any], list[Path]]:
    from sfdeploy.bench.report import write_results
    from sfdeploy.compat import ensure_mmaction

    device = resolve_device(opts.device)
    unknown = set(opts.backends) - set(BACKENDS)
    if unknown:
        raise InputError(f"unknown backend(s): {', '.join(sorted(unknown))}", fix=f"use: {', '.join(BACKENDS)}")
    precisions = list(opts.precisions or (["fp32", "fp16"] if device.startswith("cuda") else ["fp32"]))
    ensure_mmaction()
    model = build_bench_model(opts.profile, opts.work_dir)
    info = device_info(device)
    batches = sorted(set(opts.batch_sizes))
    scratch_ctx = tempfile.TemporaryDirectory(prefix="sfdeploy-bench-") if opts.scratch is None else None
    scratch = Path(scratch_ctx.name) if scratch_ctx else Path(opts.scratch)
    rows: list[suites.Row] = []
    e2e = ops = video = None
    try:
        export_dir = scratch / "export"
        _export(model, precisions, device, export_dir)
        log.info("bench: mmaction2 baseline")
        baseline = suites.mmaction2_baseline(model, device, opts.warmup, opts.iters)
        rows.append(baseline)
        if "eager" in opts.backends:
            log.info("bench: eager")
            rows += suites.eager_rows(model, precisions, batches, device, opts.warmup, opts.iters)
        from sfdeploy.runtime import open_local
        from sfdeploy.runtime.ort import ort_device

        for backend in ("torchscript", "onnxruntime"):
            if backend in opts.backends:
                log.info("bench: %s", backend)
                run_on = device if backend == "torchscript" else ort_device(device)
                rows += suites.predictor_rows(backend, lambda p, b=backend, d=run_on: open_local(
                    b, export_dir, precision=p, device=d), model.spec, precisions, batches, run_on,
                    opts.warmup, opts.iters)
        e2e, ops, video = _served_and_end_to_end(opts, model, export_dir, scratch, precisions, batches, device,
                                                 rows)
    finally:
        if scratch_ctx:
            scratch_ctx.cleanup()
    model_only = [dict(r.to_dict(), speedup_vs_mmaction2=round(r.clips_per_s / baseline.clips_per_s, 2))
                  for r in rows]
    results = {
        "schema": 1,
        "date": date.today().isoformat(),
        "profile": "trained" if opts.work_dir else opts.profile,
        "model": model.name,
        "clip_spec": model.spec.to_dict(),
        "device_info": info,
        "settings": {"warmup": opts.warmup, "iters": opts.iters, "batch_sizes": batches, "precisions": precisions,
                     "concurrency": list(opts.concurrency), "triton_batch": opts.triton_batch},
        "model_only": model_only,
        "end_to_end": e2e.to_dict() if e2e else None,
        "triton_video": video.to_dict() if video else None,
        "ops": ops,
    }
    results["targets"] = _targets(model_only, results["end_to_end"], device, opts.profile)
    out = opts.out or Path("benchmarks/results") / f"{device_slug(info)}.json"
    return results, write_results(results, out)


def _served_and_end_to_end(opts: BenchOptions, model: Any, export_dir: Path, scratch: Path, precisions: list[str],
                           batches: list[int], device: str, rows: list) -> tuple[Any, Any, Any]:
    from sfdeploy.client import Classifier
    from sfdeploy.runtime import open_local
    from sfdeploy.serving.repo import RepoOptions, write_repository
    from sfdeploy.serving.server import TritonServer, free_port

    served = [b for b in ("triton-http", "triton-grpc") if b in opts.backends]
    video_row = "triton-video" in opts.backends
    # The served model runs what `sfdeploy repo` serves by default: TorchScript.
    precision = "fp16" if device.startswith("cuda") and "fp16" in precisions else "fp32"
    server = None
    if served or opts.e2e or video_row:
        repo = scratch / "repo"
        write_repository(export_dir, RepoOptions(repo=repo, max_batch=max([*batches, opts.triton_batch]),
                                                 runtime="torchscript", precision=precision,
                                                 device=device, native=False, video=video_row,
                                                 require_parity=False))
        server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()).start()
    try:
        paths = _videos(opts, model, scratch) if opts.e2e or video_row else []
        for backend in served:
            log.info("bench: %s", backend)
            protocol = backend.split("-")[1]
            url = server.http_url if protocol == "http" else server.grpc_url
            rows += suites.triton_rows(url, protocol, "slowfast", model.spec, precision, opts.triton_batch,
                                       list(opts.concurrency), opts.warmup, opts.iters)
        e2e = None
        if opts.e2e:
            log.info("bench: end to end")
            if server is not None:
                classifier = Classifier.from_triton(server.grpc_url, "slowfast", protocol="grpc")
            else:
                classifier = Classifier(open_local("onnxruntime", export_dir))
            with classifier:
                e2e = suites.end_to_end(model, paths, classifier, workers=opts.workers or os.cpu_count() or 1,
                                        batch=opts.triton_batch, concurrency=max(opts.concurrency),
                                        mmaction2_videos=opts.mmaction2_videos, device=device)
        video = None
        if video_row:  # server-side vs client-side decoding, same videos, same concurrency
            from sfdeploy.bench.video import triton_video_row

            video = triton_video_row(server.grpc_url, "grpc", "slowfast", paths, concurrency=max(opts.concurrency),
                                     workers=opts.workers or os.cpu_count() or 1)
    finally:
        if server is not None:
            server.stop()
    ops = None
    if opts.trace:
        module = suites.deploy_module(model, precision, device)
        frames = torch.from_numpy(suites.random_clips(model.spec, max(batches))).to(device)
        ops = suites.profile_ops(module, frames, device)
    return e2e, ops, video


def _videos(opts: BenchOptions, model: Any, scratch: Path) -> list[Path]:
    from sfdeploy.data.probe import VIDEO_EXTENSIONS

    if opts.videos:
        paths = sorted(p for p in Path(opts.videos).rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
        if not paths:
            raise InputError("no videos in --videos", path=opts.videos, fix="pass a folder of videos")
        return paths[: opts.e2e_videos]
    from sfdeploy.data.synth import SynthOptions, synthesize

    spec = model.spec
    size = max(96, spec.short_side + spec.short_side // 4)  # a little larger than the resize target
    size += size % 2
    frames = max(48, spec.min_frames)
    per_class = max(1, opts.e2e_videos // 4)
    synthesize(scratch / "videos", SynthOptions(classes=4, per_class=per_class, frames=frames, size=size),
               show_progress=False)
    return sorted((scratch / "videos").rglob("*.mp4"))[: opts.e2e_videos]
