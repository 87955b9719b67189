"""`sfdeploy demo`: the main job, from nothing to served predictions and a benchmark."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from conftest import run_cli


def test_demo_runs_the_whole_toolchain(demo: tuple[Path, dict]) -> None:
    workdir, summary = demo
    assert summary["val_top1"] >= 0.9
    assert set(summary["parity"]) >= {"torchscript", "onnx", "torch_export", "torchscript_fp16", "onnx_fp16",
                                      "torch_export_fp16"}  # and bf16 but ONNX, on a CPU that has it
    assert all(result["passed"] for result in summary["parity"].values())
    assert summary["served_videos"] == 12 and summary["served_top1"] >= 0.9
    backends = {row["backend"] for row in summary["throughput"]}
    assert backends >= {"mmaction2", "torchscript", "onnxruntime", "torch_export", "triton-http", "triton-grpc"}
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


def test_the_console_shows_the_stages_and_the_summary_not_the_training_log(demo: tuple[Path, dict]) -> None:
    workdir, summary = demo
    stdout, stderr = ((workdir / f"console.{s}").read_text() for s in ("stdout", "stderr"))
    # progress bars redraw in place (carriage returns): what stays on a terminal is the rest
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert "mmengine - INFO" not in stdout + stderr and "Epoch(train)" not in stdout + stderr
    assert [line.split("]")[0] for line in stderr.splitlines() if "sfdeploy: INFO: [" in line] == \
        [f"sfdeploy: INFO: [{i}/8" for i in range(1, 9)]
    assert len(lines) < 80, "\n".join(lines)
    assert stdout.count("\n") == 1 and len(stdout) < 400  # one short JSON line for scripts
    short = json.loads(stdout)
    assert short["summary"] == str(workdir / "summary.json") and short["val_top1"] == summary["val_top1"]
    log = Path(summary["artifacts"]["training_log"])  # mmengine's log went to its file, in full
    assert log.is_relative_to(workdir / "work") and "Epoch(train)" in log.read_text()
    assert f"training log: {log}" in stderr


def test_the_benchmark_summary_says_what_each_row_measured_and_how_busy_the_machine_was(
        demo: tuple[Path, dict]) -> None:
    workdir, summary = demo
    stderr = (workdir / "console.stderr").read_text()
    rows = summary["throughput"]
    record = json.loads(Path(summary["artifacts"]["bench"][0]).read_text())
    runtime, precision = record["served_choice"]["runtime"], record["served_choice"]["precision"]  # measured
    same = [r for r in rows if (r["backend"], r["precision"], r["batch"], r["concurrency"]) ==
            (runtime, precision, 8, 1)]
    assert sorted(r["what"] for r in same) == ["in process", "model only"]  # told apart, in the JSON ...
    assert f"{runtime} in process {precision} x1" in stderr and "the model alone, one caller:" in stderr  # ... shown
    for row in rows:
        assert (row["of_in_process"] is not None) == (row["what"] == "served")
    load, measured = summary["load"], [r for r in record["rows"] if r["status"] == "ok"]
    assert load["cores"] == os.cpu_count() and load["rows"] == len(measured)
    assert load["busy"] == any(r["busy"] for r in measured)
    assert all(r["others_cores"] is not None and r["calls"] >= 5 for r in record["rows"] if r["kind"] == "clips")
    assert record["settings"]["min_time"] == 1.0
    if load["busy"]:  # (a busy row may be an end-to-end one, which the throughput lines do not show)
        assert "WARNING: the machine was busy while the benchmark ran" in stderr
        assert ("(busy)" in stderr) == any(r["busy"] for r in rows)
    else:
        assert f"benchmark load: other work took up to {load['others_cores_max']:.2f} of" in stderr


def test_a_second_demo_measures_the_benchmark_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record of an earlier run is replaced, never resumed (its figures said how busy the
    machine was then, not now)."""
    from sfdeploy import demo
    from sfdeploy.bench import run

    paths = demo.DemoPaths(tmp_path)
    paths.bench.parent.mkdir(parents=True)
    for old in (paths.bench, paths.bench.with_suffix(".md"), paths.bench.with_suffix(".png")):
        old.write_text("an earlier run")
    asked = []

    def measure(opts: run.BenchOptions) -> tuple[dict, list[Path]]:
        asked.append(opts)
        assert not paths.bench.exists() and not paths.bench.with_suffix(".md").exists()
        return {}, []

    monkeypatch.setattr(run, "run_bench", measure)
    demo._benchmark(paths)
    assert len(asked) == 1 and asked[0].resume is False and asked[0].out == paths.bench
