"""`sfdeploy bench`: a run killed half-way resumes to every row exactly once; the record's rules;
honest targets; bf16 where it cannot run. The record's structure, not its speed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sfdeploy.bench.load import BUSY_SHARE
from sfdeploy.bench.record import Record
from sfdeploy.bench.rows import ROW_KEY, row_key
from sfdeploy.bench.run import BenchOptions, check_options
from sfdeploy.bench.targets import targets
from sfdeploy.errors import EnvironmentProblem, InputError

from conftest import REPO, run_cli

TINY = ["--batch-sizes", "1,2", "--iters", "2", "--min-time", "0.1", "--warmup", "1", "--concurrency", "1,2",
        "--triton-batch", "2", "--e2e-videos", "8", "--trace", "--device", "cpu", "--precision", "fp32"]


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def test_bench_killed_half_way_resumes_to_every_row_once(tmp_path: Path) -> None:
    out = tmp_path / "results" / "run.json"
    # 1. Start a run and SIGKILL it once the TorchScript rows (hence the export) are recorded.
    proc = subprocess.Popen([sys.executable, "-m", "sfdeploy", "bench", *TINY, "--out", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while sum(r["backend"] == "torchscript" for r in _rows(out)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "bench ended before it could be killed"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _rows(out)
    assert 3 <= len(before) < 14 and {r["stage"] for r in before} == {"model"}
    exported = out.with_suffix(".work") / "export" / "model.pt"
    exported_at = exported.stat().st_mtime_ns

    # 2. The table and plot are remade from the partial record.
    from sfdeploy.bench.report import write_report

    out.with_suffix(".md").unlink()
    out.with_suffix(".png").unlink()
    write_report(out)
    table = out.with_suffix(".md").read_text()
    assert "Stages recorded: model (" in table and "| triton |" not in table
    for row in before:
        assert f"| {row['stage']} | {row['backend']} | {row['precision']} | {row['batch']} |" in table
    assert "needs the model stage (baseline) and the triton stage | missing" in table
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # 3. Without --resume the record is not overwritten; with it, only the missing rows are measured.
    refused = run_cli("bench", *TINY, "--out", str(out), check=False)
    assert refused.returncode != 0 and "--resume" in refused.stderr and _rows(out) == before
    result = run_cli("bench", *TINY, "--out", str(out), "--resume")
    assert f"stage model: {len(before)} of 14 rows recorded" in result.stderr
    record = json.loads(out.read_text())
    rows = record["rows"]
    keys = [row_key(r) for r in rows]
    assert len(keys) == len(set(keys)) == 32
    # GPU decoding (4 rows: decode-only and end to end per GPU decoder; 1: on the server's NVDEC) is
    # measured on CUDA only
    gpu_decoding = [r for r in rows if "gpu decode" in r["backend"].replace("-", " ") or "nvdec" in r["backend"]]
    assert len(gpu_decoding) == 5 and all(r["status"] == "skipped" and "--device cuda" in r["note"]
                                          for r in gpu_decoding)
    rows = [r for r in rows if r not in gpu_decoding]
    by_key = {row_key(r): r for r in rows}
    assert all(by_key[row_key(r)] == r for r in before)  # kept as measured, not measured again
    assert exported.stat().st_mtime_ns == exported_at  # the export was reused

    assert record["device_info"]["device"] in ("cpu", "cuda") and record["device_info"]["cpu_cores"] >= 1
    assert {"torch", "onnxruntime", "mmaction2"} <= set(record["device_info"]["packages"])
    assert record["clip_spec"]["crop_size"] == 64 and record["settings"]["batch_sizes"] == [1, 2]
    stage_of = {}
    for row in rows:
        assert row["status"] == "ok", row
        stage_of.setdefault(row["stage"], set()).add(row["backend"])
        if row["kind"] == "clips":
            assert row["clips_per_s"] > 0 and row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    # the served runtime: what `repo --runtime auto` would serve, chosen from the model rows above
    served_runtime = record["served_choice"]["runtime"]
    mean_ms = {b: sum(1000 / r["clips_per_s"] for r in rows if r["stage"] == "model" and r["backend"] == b) / 2
               for b in ("torchscript", "onnxruntime", "torch_export")}
    assert served_runtime == min(mean_ms, key=mean_ms.get) and record["served_choice"]["precision"] == "fp32"
    assert stage_of == {"model": {"mmaction2", "eager", "eager-rewrites", "torchscript", "torchscript-plain",
                                  "onnxruntime", "torch_export", "eager-profile"},
                        "triton": {served_runtime, "triton-http", "triton-grpc", "triton-shm"},
                        "e2e": {"decode-only", "sfdeploy:triton-grpc", "mmaction2:inference_recognizer",
                                "triton-video:grpc", "sfdeploy:triton-grpc (1 video per request)"}}
    profile = next(r for r in rows if r["kind"] == "ops")
    assert profile["ops"] and all(0 <= op["share"] <= 1 for op in profile["ops"])
    e2e = {r["backend"]: r for r in rows if r["stage"] == "e2e"}
    assert e2e["decode-only"]["videos"] == e2e["sfdeploy:triton-grpc"]["videos"] == 8
    # Server-side decoding: the same videos at the same concurrency, far fewer bytes than uint8 clips.
    server, client = e2e["triton-video:grpc"], e2e["sfdeploy:triton-grpc (1 video per request)"]
    assert server["videos"] == client["videos"] == 8 and server["concurrency"] == client["concurrency"] == 2
    assert client["bytes_per_video"] == 16 * 64 * 64 * 3
    videos = sorted((out.with_suffix(".work") / "videos").rglob("*.mp4"))[:8]
    assert server["bytes_per_video"] == round(sum(p.stat().st_size + 4 for p in videos) / 8, 1)

    # 4. Like for like: every Triton figure against in-process at its batch and concurrency.
    served = [t for t in record["targets"] if t["target"].startswith("Triton (")]
    assert len(served) == 6
    for target in served:
        row, reference = target["row"], target["reference"]
        assert reference["stage"] == "triton" and reference["backend"] == served_runtime
        assert (reference["precision"], reference["batch"], reference["concurrency"]) == \
            (row["precision"], row["batch"], row["concurrency"])
    headline = record["targets"][0]
    assert f"python backend running {served_runtime} fp32" in headline["target"]
    assert headline["row"]["backend"].startswith("triton-") and headline["reference"]["backend"] == "mmaction2"
    table = out.with_suffix(".md").read_text()
    assert "Stages recorded: model, triton, e2e (27 rows measured, 0 failed, 5 skipped" in table
    assert "| decode-only |" in table
    # Triton's own account of each served row's requests, beside the client's
    for row in (r for r in rows if r["backend"].startswith("triton-") and r["stage"] == "triton"):
        stats = row["server"]
        assert stats["requests"] >= 3 * row["concurrency"] and stats["inferences"] >= stats["requests"] * row["batch"]
        assert 0 < stats["compute_infer_ms"] <= stats["request_ms"] and stats["server_clips_per_s"] > 0
    assert "Where a served request's time goes (Triton's own statistics" in table
    assert "| triton-video:grpc |" in table and "bytes sent per video" in table

    # 5. The machine's load: what other processes took while each row was measured, said in the table.
    assert record["settings"]["min_time"] == 0.1 and record["load_at_start"]["others_cores"] >= 0
    for row in rows:
        assert row["others_cores"] >= 0 and len(row["load_average"]) == 3
        assert row["busy"] == (row["others_cores"] > BUSY_SHARE * os.cpu_count())
    assert "Load: other work took up to " in table and "| others |" in table
    busy = [r for r in rows if r["busy"]]
    assert ("BUSY during" in table) == bool(busy)


def _header(**settings: object) -> dict:
    return {"date": "2026-11-24", "profile": "small", "model": "m", "clip_spec": {"crop_size": 64},
            "served": {"runtime": "torchscript", "precision": "fp32"},
            "device_info": {"device": "cpu", "cpu_cores": 2, "packages": {}}, "settings": {"iters": 2, **settings}}


def _row(backend: str, concurrency: int, clips_per_s: float, stage: str = "triton", status: str = "ok") -> dict:
    return {"stage": stage, "backend": backend, "precision": "fp32", "batch": 8, "concurrency": concurrency,
            "kind": "clips", "status": status, "clips_per_s": clips_per_s}


def test_record_keeps_rows_refuses_other_settings_and_retries_failures(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    record = Record.open(path, _header(), resume=False)
    record.add(_row("triton-grpc", 8, 0.0, status="failed"))
    assert not record.done(row_key(_row("triton-grpc", 8, 0.0)))
    record.add(_row("triton-grpc", 8, 100.0))
    with pytest.raises(InputError, match="--resume"):
        Record.open(path, _header(), resume=False)
    with pytest.raises(InputError, match=r"--iters: record 2, now 3"):
        Record.open(path, _header(iters=3), resume=True)
    again = Record.open(path, _header(), resume=True)
    assert [r["clips_per_s"] for r in again.rows] == [100.0] and again.done(row_key(_row("triton-grpc", 8, 0)))
    assert set(ROW_KEY) <= set(again.rows[0])


def test_a_resumed_record_accepts_an_added_package_but_not_a_changed_one(tmp_path: Path) -> None:
    """A GPU host installed in two steps (the server after the model stage) continues its record;
    a different version of anything it measured with does not."""
    path = tmp_path / "r.json"
    first = _header()
    first["device_info"]["packages"] = {"torch": "2.11.0"}
    Record.open(path, first, resume=False).add(_row("mmaction2", 1, 50.0, stage="model"))
    later = _header()
    later["device_info"]["packages"] = {"torch": "2.11.0", "nvidia-pytriton": "0.7.0"}
    again = Record.open(path, later, resume=True)
    assert again.data["device_info"]["packages"] == {"torch": "2.11.0", "nvidia-pytriton": "0.7.0"}
    assert again.data["packages_added_on_resume"][0]["packages"] == {"nvidia-pytriton": "0.7.0"}
    again.save()
    changed = _header()
    changed["device_info"]["packages"] = {"torch": "2.12.0", "nvidia-pytriton": "0.7.0"}
    with pytest.raises(InputError, match="machine packages: torch record '2.11.0', now '2.12.0'"):
        Record.open(path, changed, resume=True)


def test_triton_is_compared_at_its_own_concurrency_only() -> None:
    """The committed CPU record compared Triton at 8 requests in flight with in-process at 1."""
    record = {**_header(), "rows": [_row("mmaction2", 1, 50.0, stage="model"), _row("torchscript", 1, 130.0),
                                    _row("triton-grpc", 1, 110.0), _row("triton-grpc", 8, 150.0)]}
    found = {t["target"]: t for t in targets(record)}
    at_one = found["Triton (grpc) >= 90% of in-process at batch 8, concurrency 1"]
    assert at_one["status"] == "not met" and at_one["measured"].startswith("85%")
    assert found["Triton (grpc) >= 90% of in-process at batch 8, concurrency 8"]["status"] == "missing"
    record["rows"].append(_row("torchscript", 8, 140.0))
    at_eight = {t["target"]: t for t in targets(record)}["Triton (grpc) >= 90% of in-process at batch 8, concurrency 8"]
    assert at_eight["status"] == "met" and at_eight["reference"]["concurrency"] == 8


def test_bf16_where_it_cannot_run_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sfdeploy import precision
    from sfdeploy.bench.stages import Context, plan_model

    assert check_options(BenchOptions(precisions=("fp16", "bf16")), "cuda") == ("fp16", "bf16")
    monkeypatch.setattr(precision, "cpu_bf16", lambda: precision.CpuBf16(False, "this CPU has neither"))
    with pytest.raises(EnvironmentProblem, match="bf16 on the CPU needs AVX512-BF16 or AMX"):
        check_options(BenchOptions(precisions=("fp32", "bf16")), "cpu")
    assert check_options(BenchOptions(), "cpu") == ("fp32",)  # auto: fp32 only on such a CPU
    monkeypatch.setattr(precision, "cpu_bf16", lambda: precision.CpuBf16(True, "AVX512-BF16"))
    assert check_options(BenchOptions(), "cpu") == ("fp32", "bf16")
    opts = BenchOptions(precisions=("fp32", "bf16"), batch_sizes=(1,), backends=("onnxruntime", "torch_export"))
    planned = {(t.backend, t.precision) for t in plan_model(Context(opts, None, "cpu", tmp_path, tmp_path))}
    assert planned == {("onnxruntime", "fp32"), ("torch_export", "fp32"), ("torch_export", "bf16")}  # no bf16 ONNX


def test_a_record_from_before_min_time_resumes_with_what_it_was_measured_with(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    Record.open(path, _header(), resume=False).add(_row("mmaction2", 1, 50.0, stage="model"))
    Record.open(path, _header(min_time=0.0), resume=True)  # its rows were timed without a minimum
    with pytest.raises(InputError, match=r"--min-time: record 0.0, now 1.0"):
        Record.open(path, _header(min_time=1.0), resume=True)


def test_a_figure_from_a_busy_machine_says_so_in_its_target() -> None:
    quiet = _row("torchscript", 1, 130.0) | {"others_cores": 0.02, "busy": False}
    busy = _row("triton-grpc", 1, 20.0) | {"others_cores": 1.4, "busy": True}
    record = {**_header(), "rows": [_row("mmaction2", 1, 50.0, stage="model"), quiet, busy]}
    found = {t["target"]: t for t in targets(record)}
    served = found["Triton (grpc) >= 90% of in-process at batch 8, concurrency 1"]
    assert served["measured"].startswith("15%") and "took 1.40 cores (busy: the figure is low)" in served["measured"]
    assert "busy" not in found["Best model-only throughput (the runtimes in process)"]["measured"]


def test_only_measured_rows_make_a_record_busy() -> None:
    from sfdeploy.bench.load import describe

    quiet = _row("torchscript", 1, 130.0) | {"others_cores": 0.02, "busy": False}
    skipped = _row("gpu-decode", 1, 0.0) | {"status": "skipped", "others_cores": 1.9, "busy": True}
    assert "quiet" in describe([quiet, skipped], 2) and "BUSY" not in describe([quiet, skipped], 2)
    busy = quiet | {"others_cores": 1.2, "busy": True}
    assert "BUSY during 1 of 2 rows" in describe([busy, quiet, skipped], 2)
    from sfdeploy.demo import bench_load  # the demo's summary says the same

    load = bench_load({"device_info": {"cpu_cores": 2}, "rows": [quiet, skipped]})
    assert not load["busy"] and load["rows"] == 1 and load["others_cores_max"] == 0.02


def test_rows_of_fast_calls_are_timed_for_the_minimum_time() -> None:
    from sfdeploy.bench.measure import time_calls, time_concurrent

    sequential = time_calls(lambda: time.sleep(0.005), clips_per_call=2, warmup=0, iters=3, min_time_s=0.3)
    assert sequential.wall_s >= 0.3 and sequential.calls > 3 and sequential.clips == 2 * sequential.calls
    assert time_calls(lambda: None, clips_per_call=1, warmup=0, iters=3).calls == 3  # no minimum: iters
    concurrent = time_concurrent(lambda: time.sleep(0.005), clips_per_call=1, concurrency=2, warmup=0, iters=3,
                                 min_time_s=0.3)
    assert concurrent.wall_s >= 0.3 and concurrent.calls > 6


_BURN = "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\n"


def test_the_load_counts_other_processes_and_not_the_benchmarks_own(tmp_path: Path) -> None:
    """CPU burnt by a child of this process is the benchmark's own; CPU burnt by a process outside
    its tree (a detached one, as another user's job) is other work."""
    from sfdeploy.bench.load import LoadMeter

    ticks = os.sysconf("SC_CLK_TCK")
    with LoadMeter() as own:
        subprocess.run([sys.executable, "-c", _BURN.format(s=0.6)], check=True)  # a child: ours
    assert own.own / ticks >= 0.5
    done = tmp_path / "done"
    with LoadMeter() as other:
        # sh starts the burner in the background and exits: the burner is nobody's child of ours
        subprocess.run(["sh", "-c", f"{sys.executable} -c '{_BURN.format(s=0.6)}' && touch {done} &"], check=True)
        deadline = time.monotonic() + 30
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    wall = other.end[0] - other.start[0]
    assert done.exists() and other.result()["others_cores"] * wall >= 0.5  # the burner's 0.6 s of CPU
    # the child's 0.6 s of CPU are in the machine's busy time, and are not counted as other work
    machine_busy_s = (own.end[1] - own.start[1]) / ticks
    assert machine_busy_s - own.result()["others_cores"] * (own.end[0] - own.start[0]) >= 0.5
    assert 0 <= other.result()["others_cores"] <= os.cpu_count()  # never more than the machine has


def test_workers_orphaned_during_a_row_stay_the_benchmarks_own(tmp_path: Path) -> None:
    """A server's workers outlive it when it stops (they leave this process's tree, not the
    machine): what they burn is still the benchmark's, never 'other work' (a row once read 3.99
    of 2 cores)."""
    from sfdeploy.bench.load import LoadMeter

    started, go = tmp_path / "started", tmp_path / "go"
    # the middle process starts the burner, then exits when told: the burner is orphaned mid-row
    middle = subprocess.Popen([sys.executable, "-c",
                               "import os, subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, '-c', sys.argv[1]]); "
                               "open(sys.argv[2], 'w').close()\n"
                               "while not os.path.exists(sys.argv[3]): time.sleep(0.01)",
                               _BURN.format(s=1.0), str(started), str(go)])
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    with LoadMeter() as meter:  # the burner is in the tree at the start of the row
        go.touch()
        middle.wait()
        time.sleep(1.2)
    result = meter.result()
    assert 0 <= result["others_cores"] <= os.cpu_count()
    assert meter.own / os.sysconf("SC_CLK_TCK") >= 0.5


def test_the_served_model_is_chosen_from_the_model_rows_and_kept_on_resume(tmp_path: Path) -> None:
    """What `repo --runtime auto` would serve: the lowest mean time per clip over the model rows,
    recorded once, so that a resumed run serves the same."""
    from sfdeploy.bench.stages import Context, plan_model

    path = tmp_path / "r.json"
    header = {**_header(), "served": {"backend": "python", "runtime": "auto", "precision": "auto"}}
    record = Record.open(path, header, resume=False)
    for backend, batch, clips_per_s in (("torchscript", 1, 100.0), ("torchscript", 8, 200.0),
                                        ("onnxruntime", 1, 150.0), ("onnxruntime", 8, 150.0)):
        record.add({**_row(backend, 1, clips_per_s, stage="model"), "batch": batch})
    opts = BenchOptions(precisions=("fp32",), backends=("torchscript", "onnxruntime", "triton-grpc"))
    context = Context(opts, None, "cpu", tmp_path, tmp_path, record)
    assert (context.served_runtime, context.served_precision) == ("onnxruntime", "fp32")  # 6.7 vs 7.5 ms per clip
    assert "the fastest of 2 measured on cpu by this run's model stage" in context.choice.why
    again = Record.open(path, header, resume=True)
    again.add({**_row("torchscript", 1, 900.0, stage="model"), "batch": 8})  # faster now: the choice stands
    assert Context(opts, None, "cpu", tmp_path, tmp_path, again).served_runtime == "onnxruntime"
    assert "python backend running onnxruntime fp32" in targets(again.data)[0]["target"]
    # on CUDA the torch runtimes are also measured without their CUDA graphs, at the smallest batch
    gpu = BenchOptions(precisions=("fp16",), batch_sizes=(1, 32), backends=("aoti", "torch_export", "onnxruntime"))
    planned = {(t.backend, t.batch) for t in plan_model(Context(gpu, None, "cuda", tmp_path, tmp_path))}
    assert {("aoti-nographs", 1), ("torch_export-nographs", 1)} <= planned
    assert not any(b.endswith("-nographs") for b, _ in {(t.backend, t.batch) for t in plan_model(
        Context(gpu, None, "cpu", tmp_path, tmp_path))})
