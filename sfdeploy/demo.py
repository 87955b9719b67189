"""``sfdeploy demo``: the whole toolchain on a synthetic dataset, on CPU, in minutes.

synth -> prepare -> finetune (slowfast_tiny) -> export (with the parity gate) -> repo -> serve
-> infer (the val videos, through the served model) -> a short benchmark -> a summary.

Every stage but the benchmark writes into ``WORKDIR`` and is skipped on a re-run when its result
is complete, so an interrupted demo continues where it stopped (an interrupted training resumes).
The benchmark is measured again on every run: its figures say how fast the model runs on this
machine *now*, with the other work the machine had while they were taken (a busy machine is said
plainly). The summary is returned and written to ``WORKDIR/summary.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The demo's stage lines: shown while the library's own INFO logs are kept quiet (see cli/demo.py).
log = logging.getLogger("sfdeploy.demo")

PRESET = "slowfast_tiny"
STAGES = 8
SUMMARY_JSON = "summary.json"


def _stage(number: int, text: str) -> None:
    log.info("[%d/%d] %s", number, STAGES, text)


@dataclass(frozen=True)
class DemoPaths:
    """Where each stage writes, under the work folder."""

    workdir: Path

    @property
    def videos(self) -> Path:
        """Stage 1's synthetic videos (``data synth``)."""
        return self.workdir / "videos"

    @property
    def data(self) -> Path:
        """DATA: the annotation lists ``data prepare`` writes."""
        return self.workdir / "data"

    @property
    def work(self) -> Path:
        """WORK: the finetune run (config, checkpoints, logs)."""
        return self.workdir / "work"

    @property
    def export(self) -> Path:
        """EXPORT: the deployable artifacts and ``manifest.json``."""
        return self.workdir / "export"

    @property
    def repo(self) -> Path:
        """The Triton model repository ``sfdeploy repo`` writes and the demo serves."""
        return self.workdir / "model_repository"

    @property
    def predictions(self) -> Path:
        """The rows ``infer`` writes for the demo's videos through the served model."""
        return self.workdir / "predictions.csv"

    @property
    def bench(self) -> Path:
        """The short benchmark's record (its ``.md`` table beside it)."""
        return self.workdir / "bench" / "results.json"


def run_demo(workdir: Path, *, bench: bool = True, verbose: bool = False) -> dict[str, Any]:
    """Run (or continue) the demo in ``workdir``; returns the summary (also in ``summary.json``).
    ``verbose``: mmengine's training log on the console too (else only in its file in WORK)."""
    paths = DemoPaths(Path(workdir).resolve())
    started = time.monotonic()
    data = _prepare(paths)
    training = _finetune(paths, data, verbose)
    manifest = _export(paths)
    _repository(paths)
    served = _serve_and_classify(paths, data)
    measured = _benchmark(paths) if bench else None
    summary = _summary(paths, training, manifest, served, measured, time.monotonic() - started)
    (paths.workdir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _prepare(paths: DemoPaths) -> Any:
    from sfdeploy.data.layout import DATASET_JSON, PreparedData
    from sfdeploy.data.prepare import prepare
    from sfdeploy.data.synth import HINTS_JSON, SynthOptions, synthesize
    from sfdeploy.train.presets import clip_frames

    _stage(1, f"synthetic videos -> {paths.videos}")
    if not (paths.videos / HINTS_JSON).is_file():
        synthesize(paths.videos, SynthOptions())
    _stage(2, f"prepare -> {paths.data}")
    if not (paths.data / DATASET_JSON).is_file():
        prepare(paths.videos, paths.data, clip_frames=clip_frames(PRESET), preset=PRESET)
    return PreparedData.from_dir(paths.data)


def _finetune(paths: DemoPaths, data: Any, verbose: bool) -> dict[str, Any]:
    from sfdeploy.train.files import SUMMARY_FILE
    from sfdeploy.train.options import FinetuneOptions
    from sfdeploy.train.run import finetune

    _stage(3, f"finetune {PRESET} -> {paths.work}" + ("" if verbose else " (its log: WORK/<timestamp>/, -v shows it)"))
    if (paths.work / SUMMARY_FILE).is_file():
        return json.loads((paths.work / SUMMARY_FILE).read_text())
    resume = (paths.work / "last_checkpoint").is_file()
    return finetune(None if resume else data, FinetuneOptions(work_dir=paths.work, preset=PRESET, resume=resume),
                    console_log=verbose)


def _export(paths: DemoPaths) -> Any:
    from sfdeploy.artifacts import MANIFEST_FILE, Manifest
    from sfdeploy.export.run import ExportOptions, export_work

    _stage(4, f"export (TorchScript, ONNX, ExportedProgram; fp32, fp16 and the CPU's bf16) with the parity gate -> "
              f"{paths.export}")
    manifest = Manifest.read(paths.export) if (paths.export / MANIFEST_FILE).is_file() else None
    if manifest is None or not manifest.parity_passed:
        manifest = export_work(paths.work, ExportOptions(out=paths.export, fp16=True))
    return manifest


def _repository(paths: DemoPaths) -> None:
    from sfdeploy.serving.repo import RepoOptions, write_repository

    _stage(5, f"Triton model repository -> {paths.repo} (serving the fastest the export measured)")
    write_repository(paths.export, RepoOptions(repo=paths.repo, device="cpu"))


def _serve_and_classify(paths: DemoPaths, data: Any) -> dict[str, Any]:
    """Serve the repository, classify the val videos through it (gRPC), and score the rows."""
    from sfdeploy.client import Classifier, infer
    from sfdeploy.serving.ports import free_port
    from sfdeploy.serving.server import TritonServer

    _stage(6, "serve: tritonserver on 127.0.0.1")
    truth = {str(path): data.classes[label] for path, label in data.val_videos()}
    with TritonServer(paths.repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()) as server:
        _stage(7, f"infer the {len(truth)} val videos through the served model -> {paths.predictions}")
        paths.predictions.unlink(missing_ok=True)
        with Classifier.from_triton(server.grpc_url, protocol="grpc") as classifier:
            infer(sorted(truth), paths.predictions, classifier, batch_size=4, concurrency=4)
    rows = list(csv.DictReader(paths.predictions.open()))
    return {"top1": sum(row["label"] == truth[row["path"]] for row in rows) / len(rows), "videos": len(rows)}


#: what the demo's benchmark measures: the baseline, every runtime `repo` may serve, and the served
#: model (the eager variants and the AOTInductor package are `sfdeploy bench`'s, not the demo's)
BENCH_BACKENDS = ("mmaction2", "torchscript", "onnxruntime", "torch_export", "triton-http", "triton-grpc",
                  "triton-shm", "triton-video")


def _benchmark(paths: DemoPaths) -> tuple[dict[str, Any], list[Path]]:
    """A short benchmark, measured afresh: the previous record is replaced, never reused (the
    bench export beside it is)."""
    from sfdeploy.bench.run import BenchOptions, run_bench

    _stage(8, "short benchmark of the trained model (measured again on every run)")
    for old in (paths.bench, paths.bench.with_suffix(".md"), paths.bench.with_suffix(".png")):
        old.unlink(missing_ok=True)
    return run_bench(BenchOptions(
        work_dir=paths.work, backends=BENCH_BACKENDS, batch_sizes=(1, 8), concurrency=(1, 4), triton_batch=8,
        warmup=2, iters=5, min_time_s=1.0, e2e_videos=32, mmaction2_videos=8, out=paths.bench))


def _summary(paths: DemoPaths, training: dict[str, Any], manifest: Any, served: dict[str, Any],
             measured: tuple[dict[str, Any], list[Path]] | None, wall_s: float) -> dict[str, Any]:
    from sfdeploy.artifacts import MANIFEST_FILE

    record, bench_files = measured or ({}, [])
    return {
        "workdir": str(paths.workdir),
        "val_top1": training["best_top1"],
        "training_s": training["wall_time_s"],
        "parity": {k: {"max_abs_diff": r["max_abs_diff"], "top1_agreement": r["top1_agreement"],
                       "passed": r["passed"]} for k, r in manifest.parity["artifacts"].items()},
        "served_top1": served["top1"],
        "served_videos": served["videos"],
        "throughput": throughput_rows(record) if record else [],
        "load": bench_load(record) if record else None,
        "artifacts": {
            "config": str(paths.work / "config.py"),
            "checkpoint": training["best_checkpoint"],
            "training_log": training.get("log"),
            "export": {key: str(paths.export / a.file) for key, a in manifest.artifacts.items()},
            "manifest": str(paths.export / MANIFEST_FILE),
            "model_repository": str(paths.repo),
            "predictions": str(paths.predictions),
            "bench": [str(f) for f in bench_files],
            "summary": str(paths.workdir / SUMMARY_JSON),
        },
        "wall_time_s": round(wall_s, 1),
    }


#: what each kind of throughput row measured, as the summary names it
MODEL_ONLY, IN_PROCESS, SERVED = "model only", "in process", "served"


def throughput_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The record's clip rows for the summary, each saying what it measured (``what``): the model
    alone (stage ``model``), or, side by side at the same batch and concurrency, the served model
    and the same runtime in this process (stage ``triton``; ``of_in_process``: their ratio)."""
    from sfdeploy.bench.report import baseline_clips_per_s

    baseline = baseline_clips_per_s(record)
    rows = [r for r in record["rows"] if r["kind"] == "clips" and r["status"] == "ok"]
    in_process = {(r["precision"], r["batch"], r["concurrency"]): r for r in rows
                  if r["stage"] == "triton" and not r["backend"].startswith("triton")}
    out = []
    for row in rows:
        what = MODEL_ONLY if row["stage"] == "model" else SERVED if row["backend"].startswith("triton") else IN_PROCESS
        reference = in_process.get((row["precision"], row["batch"], row["concurrency"])) if what == SERVED else None
        out.append({**{k: row[k] for k in ("stage", "backend", "precision", "batch", "concurrency", "clips_per_s")},
                    "what": what,
                    "speedup_vs_mmaction2": round(row["clips_per_s"] / baseline, 2) if baseline else None,
                    "of_in_process": round(row["clips_per_s"] / reference["clips_per_s"], 2) if reference else None,
                    "others_cores": row.get("others_cores"), "busy": bool(row.get("busy"))})
    return out


def bench_load(record: dict[str, Any]) -> dict[str, Any]:
    """The other work on the machine while the benchmark ran: what its figures are worth."""
    from sfdeploy.bench.load import describe, loaded_rows

    cores = record["device_info"]["cpu_cores"]
    measured = loaded_rows(record["rows"])
    return {"cores": cores, "busy": any(r.get("busy") for r in measured),
            "busy_rows": sum(bool(r.get("busy")) for r in measured), "rows": len(measured),
            "others_cores_max": max((r["others_cores"] for r in measured), default=None),
            "at_start": record.get("load_at_start"), "text": describe(measured, cores)}
