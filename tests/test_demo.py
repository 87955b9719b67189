"""`sfdeploy demo`: the main job, from nothing to served predictions and a benchmark."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from conftest import run_cli


def test_demo_runs_the_whole_toolchain(demo: tuple[Path, dict]) -> None:
    workdir, summary = demo
    assert summary["val_top1"] >= 0.9
    assert set(summary["parity"]) == {"torchscript", "onnx", "torchscript_fp16", "onnx_fp16"}
    assert all(result["passed"] for result in summary["parity"].values())
    assert summary["served_videos"] == 12 and summary["served_top1"] >= 0.9
    backends = {row["backend"] for row in summary["throughput"]}
    # (on a GPU the benchmark adds eager variants)
    assert backends >= {"mmaction2", "eager", "torchscript", "onnxruntime", "triton-http", "triton-grpc"}
    artifacts = summary["artifacts"]
    for path in [artifacts["config"], artifacts["checkpoint"], artifacts["manifest"], *artifacts["export"].values(),
                 *artifacts["bench"]]:
        assert Path(path).is_file(), path
    rows = list(csv.DictReader(open(artifacts["predictions"])))
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows)
    bench = json.loads(Path(artifacts["bench"][0]).read_text())
    decode_only = next(r for r in bench["rows"] if r["backend"] == "decode-only")
    assert bench["profile"] == "trained" and decode_only["videos"] == 32


def test_a_second_run_reuses_every_finished_stage(demo: tuple[Path, dict]) -> None:
    workdir, first = demo
    checkpoint = Path(first["artifacts"]["checkpoint"])
    before = checkpoint.stat().st_mtime_ns, (workdir / "export/model.onnx").stat().st_mtime_ns
    result = run_cli("demo", "--workdir", str(workdir), "--no-bench")
    again = json.loads(result.stdout.strip().splitlines()[-1])
    assert (checkpoint.stat().st_mtime_ns, (workdir / "export/model.onnx").stat().st_mtime_ns) == before
    assert again["val_top1"] == first["val_top1"] and again["served_top1"] == first["served_top1"]
