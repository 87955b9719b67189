"""``sfdeploy demo``: the whole toolchain on a synthetic dataset, on CPU, in minutes.

synth -> prepare -> finetune (slowfast_tiny) -> export (with the parity gate) -> repo -> serve
-> infer (the val videos, through the served model) -> a short benchmark -> a summary.

Every stage writes into ``WORKDIR`` and is skipped on a re-run when its result is complete, so
an interrupted demo continues where it stopped (an interrupted training resumes).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("sfdeploy")

PRESET = "slowfast_tiny"
STAGES = 8


def _stage(number: int, text: str) -> None:
    log.info("[%d/%d] %s", number, STAGES, text)


def run_demo(workdir: Path, *, bench: bool = True) -> dict[str, Any]:
    from sfdeploy.artifacts import MANIFEST_FILE, Manifest
    from sfdeploy.data.layout import DATASET_JSON, PreparedData
    from sfdeploy.data.prepare import prepare
    from sfdeploy.data.synth import HINTS_JSON, SynthOptions, synthesize
    from sfdeploy.export.run import ExportOptions, export_work
    from sfdeploy.train.config import FinetuneOptions
    from sfdeploy.train.hooks import SUMMARY_FILE
    from sfdeploy.train.presets import clip_frames
    from sfdeploy.train.run import finetune

    workdir = Path(workdir).resolve()
    videos, data_dir, work, export_dir = (workdir / n for n in ("videos", "data", "work", "export"))
    repo, predictions = workdir / "model_repository", workdir / "predictions.csv"
    started = time.monotonic()

    _stage(1, f"synthetic videos -> {videos}")
    if not (videos / HINTS_JSON).is_file():
        synthesize(videos, SynthOptions())
    _stage(2, f"prepare -> {data_dir}")
    if not (data_dir / DATASET_JSON).is_file():
        prepare(videos, data_dir, clip_frames=clip_frames(PRESET))
    data = PreparedData.from_dir(data_dir)

    _stage(3, f"finetune {PRESET} -> {work}")
    if (work / SUMMARY_FILE).is_file():
        summary = json.loads((work / SUMMARY_FILE).read_text())
    else:
        resume = (work / "last_checkpoint").is_file()
        summary = finetune(None if resume else data, FinetuneOptions(work_dir=work, preset=PRESET, resume=resume))

    _stage(4, f"export (TorchScript, ONNX, fp16) with the parity gate -> {export_dir}")
    manifest = Manifest.read(export_dir) if (export_dir / MANIFEST_FILE).is_file() else None
    if manifest is None or not manifest.parity_passed:
        manifest = export_work(work, ExportOptions(out=export_dir, fp16=True))

    _stage(5, f"Triton model repository -> {repo}")
    from sfdeploy.serving.repo import RepoOptions, write_repository

    write_repository(export_dir, RepoOptions(repo=repo, device="cpu"))

    _stage(6, "serve: tritonserver on 127.0.0.1")
    from sfdeploy.client import Classifier, infer
    from sfdeploy.serving.server import TritonServer, free_port

    truth = {str(path): data.classes[label] for path, label in data.val_videos()}
    with TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()) as server:
        _stage(7, f"infer the {len(truth)} val videos through the served model -> {predictions}")
        predictions.unlink(missing_ok=True)
        with Classifier.from_triton(server.grpc_url, protocol="grpc") as classifier:
            infer(sorted(truth), predictions, classifier, batch_size=4, concurrency=4)
    rows = list(csv.DictReader(predictions.open()))
    served_top1 = sum(row["label"] == truth[row["path"]] for row in rows) / len(rows)

    bench_files: list[Path] = []
    bench_rows: list[dict[str, Any]] = []
    if bench:
        _stage(8, "short benchmark of the trained model")
        from sfdeploy.bench.report import baseline_clips_per_s
        from sfdeploy.bench.run import BenchOptions, run_bench

        # resume: a second demo keeps the rows the first one measured
        results, bench_files = run_bench(BenchOptions(
            work_dir=work, batch_sizes=(1, 8), concurrency=(1, 4), triton_batch=8, warmup=2, iters=5,
            e2e_videos=32, mmaction2_videos=8, out=workdir / "bench" / "results.json", resume=True))
        baseline = baseline_clips_per_s(results)
        bench_rows = [dict(r, speedup_vs_mmaction2=round(r["clips_per_s"] / baseline, 2) if baseline else None)
                      for r in results["rows"] if r["kind"] == "clips" and r["status"] == "ok"]
    return {
        "workdir": str(workdir),
        "val_top1": summary["best_top1"],
        "training_s": summary["wall_time_s"],
        "parity": {k: {"max_abs_diff": r["max_abs_diff"], "top1_agreement": r["top1_agreement"],
                       "passed": r["passed"]} for k, r in manifest.parity["artifacts"].items()},
        "served_top1": served_top1,
        "served_videos": len(rows),
        "throughput": [{k: r[k] for k in ("backend", "precision", "batch", "concurrency", "clips_per_s",
                                          "speedup_vs_mmaction2")} for r in bench_rows],
        "artifacts": {
            "config": str(work / "config.py"),
            "checkpoint": summary["best_checkpoint"],
            "export": {key: str(export_dir / a.file) for key, a in manifest.artifacts.items()},
            "manifest": str(export_dir / MANIFEST_FILE),
            "model_repository": str(repo),
            "predictions": str(predictions),
            "bench": [str(f) for f in bench_files],
        },
        "wall_time_s": round(time.monotonic() - started, 1),
    }
