"""`sfdeploy bench` end to end on a tiny setting: the record's structure, not its speed."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli


def test_tiny_bench_writes_a_complete_record(tmp_path: Path) -> None:
    out = tmp_path / "results" / "run.json"
    result = run_cli("bench", "--batch-sizes", "1,2", "--iters", "2", "--warmup", "1", "--concurrency", "1,2",
                     "--triton-batch", "2", "--e2e-videos", "8", "--trace", "--out", str(out))
    assert json.loads(result.stdout.strip().splitlines()[-1])["results"] == [
        str(out), str(out.with_suffix(".md")), str(out.with_suffix(".png"))]
    record = json.loads(out.read_text())
    assert record["device_info"]["device"] == "cpu" and record["device_info"]["cpu_cores"] >= 1
    assert {"torch", "onnxruntime", "mmaction2"} <= set(record["device_info"]["packages"])
    assert record["clip_spec"]["crop_size"] == 64 and record["settings"]["batch_sizes"] == [1, 2]

    rows = record["model_only"]
    baseline = [r for r in rows if r["backend"] == "mmaction2"]
    assert len(baseline) == 1 and baseline[0]["batch"] == 1 and baseline[0]["speedup_vs_mmaction2"] == 1.0
    for backend in ("eager", "torchscript", "onnxruntime"):
        assert sorted(r["batch"] for r in rows if r["backend"] == backend) == [1, 2]
    for backend in ("triton-http", "triton-grpc"):
        assert sorted(r["concurrency"] for r in rows if r["backend"] == backend) == [1, 2]
    for row in rows:
        assert row["clips_per_s"] > 0 and row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        expected = row["clips_per_s"] / baseline[0]["clips_per_s"]
        assert abs(row["speedup_vs_mmaction2"] - expected) < 0.01 + 0.01 * expected

    e2e = record["end_to_end"]
    assert e2e["videos"] == 8 and e2e["backend"] == "triton-grpc:slowfast"
    assert e2e["decode_only_videos_per_s"] > 0 and e2e["sfdeploy_videos_per_s"] > 0
    assert abs(e2e["efficiency"] - e2e["sfdeploy_videos_per_s"] / e2e["decode_only_videos_per_s"]) < 0.01
    assert record["ops"] and all(0 <= op["share"] <= 1 for op in record["ops"])
    assert any(t["target"].startswith("Triton (grpc)") for t in record["targets"])

    video = record["triton_video"]  # server-side vs client-side decoding, same 8 videos, concurrency 2
    assert video["videos"] == 8 and video["concurrency"] == 2 and video["errors"] == 0
    assert video["server_decode_videos_per_s"] > 0 and video["client_decode_videos_per_s"] > 0
    assert video["client_decode_bytes_per_video"] == 16 * 64 * 64 * 3  # one view of 16 frames at 64 px
    assert 1000 < video["server_decode_bytes_per_video"] < video["client_decode_bytes_per_video"]  # small mp4s

    table = out.with_suffix(".md").read_text()
    assert "| mmaction2 | fp32 | 1 |" in table and "decode only (ceiling)" in table
    assert "## Server-side decoding (triton-video)" in table
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
