"""GPU decoding (sfdeploy.decode.gpu), the parts that run without a GPU: the decision rules on plain
values, the real "not installed" situation of this machine, the resize and crop the GPU runs
(here on CPU tensors, against OpenCV's), the routed decoding with its per-video decoder and reason,
the fidelity harness on decord against the CPU path's PyAV, the gate file, `infer --decode`, the output columns,
and the bench's GPU-decoding rows and targets. The NVDEC path itself: tests/test_gpu_decode.py."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from sfdeploy.clipspec import ClipSpec
from sfdeploy.decode.gpu.select import (
    GPU_BACKENDS,
    IMPORT_NAMES,
    INSTALL_FIX,
    BackendStatus,
    StreamInfo,
    nvdec_refusal,
    plan_decoding,
    probe_backends,
)
from sfdeploy.errors import EnvironmentProblem, InputError

from badvideos import encoded_video, good_video, truncated
from conftest import run_cli

SPEC = ClipSpec(clip_len=8, frame_interval=2, num_clips=1, crop_mode="center", short_side=64, crop_size=56,
                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), class_names=("a", "b"))
NVC = BackendStatus("pynvvideocodec", True, "pynvvideocodec 2.2.4")
TC = BackendStatus("torchcodec", True, "torchcodec 0.17.0")
NONE = [BackendStatus(n, False, f"{n} is not installed") for n in GPU_BACKENDS]
H264 = StreamInfo("h264", 320, 240, "yuv420p", 48)
NOT_INSTALLED = all(importlib.util.find_spec(IMPORT_NAMES[n]) is None for n in GPU_BACKENDS)


@pytest.mark.skipif(not NOT_INSTALLED, reason="a GPU decoder is installed here")
def test_without_a_gpu_decoder_gpu_is_an_error_with_the_fix_and_auto_says_why() -> None:
    statuses = probe_backends()  # the real probe: nothing installed on this machine
    assert [s.name for s in statuses] == list(GPU_BACKENDS)
    assert all(not s.available and s.detail == f"{s.name} is not installed" for s in statuses)
    with pytest.raises(EnvironmentProblem) as error:
        plan_decoding("gpu", device="cuda:0", statuses=statuses)
    assert "pynvvideocodec is not installed" in error.value.message and error.value.fix == INSTALL_FIX
    assert "pip install 'sfdeploy[nvdec]'" in INSTALL_FIX
    with pytest.raises(EnvironmentProblem, match="torchcodec: torchcodec is not installed"):
        plan_decoding("torchcodec", device="cuda:0", statuses=statuses)
    plan = plan_decoding("auto", device="cuda:0", statuses=statuses)
    assert plan.backend is None and "no GPU video decoder here" in plan.why
    assert plan.route(H264, 10**8) == (False, plan.why)


def test_the_decoding_plan_follows_its_rules() -> None:
    assert plan_decoding("cpu", device="cuda:0", statuses=[NVC]).why == "--decode cpu"
    for mode in ("gpu", "torchcodec"):  # clips decoded on the GPU are for a model on the GPU
        with pytest.raises(InputError, match="the model runs on cpu") as error:
            plan_decoding(mode, device="cpu", statuses=[NVC, TC])
        assert "--device cuda" in error.value.fix and "--decode cpu" in error.value.fix
    assert plan_decoding("auto", device="remote", statuses=[NVC]).why.startswith("the model is served by Triton")
    assert plan_decoding("auto", device="cpu", statuses=[NVC]).backend is None
    # by name: that one, or an error naming why it cannot run
    with pytest.raises(EnvironmentProblem, match="torchcodec 0.17.0 finds no FFmpeg"):
        plan_decoding("torchcodec", device="cuda:0",
                      statuses=[NVC, BackendStatus("torchcodec", False, "torchcodec 0.17.0 finds no FFmpeg shared")])
    assert plan_decoding("torchcodec", device="cuda:0", statuses=[NVC, TC]).backend == "torchcodec"
    # gpu: the first available in order of preference; without a fidelity record it says so per stream
    plan = plan_decoding("gpu", device="cuda:1", statuses=[NONE[0], TC])
    assert (plan.backend, plan.device) == ("torchcodec", "cuda:1")
    assert plan.route(H264, 10**8) == (True, "--decode gpu; fidelity not measured for this export")
    # auto needs the export's fidelity record for the decoder it would use ...
    plan = plan_decoding("auto", device="cuda:0", statuses=[NVC, TC])
    assert plan.backend is None and "no fidelity record" in plan.why
    # ... and then decodes on the GPU the codecs that passed, on the CPU the others
    gates = {"pynvvideocodec": {"h264": (True, "h264: 100.0% ..."), "hevc": (False, "hevc: 98.2% ...")}}
    plan = plan_decoding("auto", device="cuda:0", statuses=[NVC, TC], gates=gates)
    assert plan.backend == "pynvvideocodec"
    assert plan.route(H264, 10**8) == (True, "fidelity gate passed: h264: 100.0% ...")
    assert plan.route(StreamInfo("hevc", 320, 240, "yuv420p", 48), 10**8) == (False, "fidelity gate not passed: "
                                                                                     "hevc: 98.2% ...")
    assert plan.route(StreamInfo("vp9", 320, 240, "yuv420p", 48), 10**8)[0] is False
    # a stream NVDEC cannot decode goes to the CPU before the gate is asked
    assert plan.route(StreamInfo("mjpeg", 320, 240, "yuvj420p", 48), 10**8) == (
        False, nvdec_refusal(StreamInfo("mjpeg", 320, 240, "yuvj420p", 48), "pynvvideocodec", 10**8))
    with pytest.raises(InputError, match="unknown --decode"):
        plan_decoding("nvdec", device="cuda:0", statuses=[NVC])


@pytest.mark.parametrize(("info", "backend", "reason"), [
    (StreamInfo("mjpeg", 320, 240, "yuvj420p", 48), "torchcodec", "NVDEC has no mjpeg decoder"),
    (StreamInfo("h264", 40, 40, "yuv420p", 48), "torchcodec", "40x40 is below NVDEC's h264 minimum of 48x16"),
    (StreamInfo("hevc", 128, 128, "yuv420p", 48), "torchcodec", "below NVDEC's hevc minimum of 144x144"),
    (StreamInfo("vp9", 96, 96, "yuv420p", 48), "torchcodec", "below NVDEC's vp9 minimum of 128x128"),
    (StreamInfo("h264", 4098, 2000, "yuv420p", 48), "torchcodec", "above NVDEC's h264 maximum of 4096x4096"),
    (StreamInfo("hevc", 7680, 4320, "yuv420p", 48), "torchcodec", "over the limit of 8,847,360 pixels"),
    (StreamInfo("h264", 97, 131, "yuv444p", 48), "torchcodec", "pixel format yuv444p"),
    (StreamInfo("av1", 320, 240, "yuv420p", 48), "torchcodec", "NVDEC has no av1 decoder"),
    (StreamInfo("hevc", 1920, 1080, "yuv420p", 48), "pynvvideocodec", None),
    (StreamInfo("mpeg4", 320, 240, "yuv420p", 48), "pynvvideocodec", None),
])
def test_nvdec_refuses_what_it_cannot_decode_with_the_reason(info: StreamInfo, backend: str,
                                                             reason: str | None) -> None:
    got = nvdec_refusal(info, backend, 4096 * 2160)
    assert got is None if reason is None else reason in got


@pytest.mark.parametrize("size", [(97, 131), (320, 240), (50, 40)])
@pytest.mark.parametrize("crop_mode", ["center", "three"])
def test_the_gpu_resize_and_crop_give_the_cpu_path_s_pixels(size: tuple[int, int], crop_mode: str) -> None:
    """gpu_clip_views is the code the GPU runs; on CPU tensors it must match clip_views (OpenCV,
    fixed point) within one grey level, with the same sampled order and crops. Random noise is the
    worst case for rounding: ~12% of its values land one level apart."""
    import torch

    from sfdeploy.decode.gpu.backends import gpu_clip_views
    from sfdeploy.preprocess import clip_views, sample_indices

    spec = SPEC if crop_mode == "center" else ClipSpec(**{**SPEC.__dict__, "crop_mode": "three", "crop_size": 64,
                                                          "num_clips": 2})
    width, height = size
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, size=(30, height, width, 3), dtype=np.uint8)
    indices = sample_indices(len(video), spec).reshape(-1)  # repeats included (a short video loops)
    unique, order = np.unique(indices, return_inverse=True)
    want = clip_views(video[indices], spec)
    got = gpu_clip_views(torch.from_numpy(video[unique]), order, spec).numpy()
    assert got.shape == want.shape == spec.input_shape and got.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1 and diff.mean() < 0.15


def test_routed_decoding_on_the_cpu_says_which_decoder_read_each_video(tmp_path: Path) -> None:
    from sfdeploy.decode.clips import load_video
    from sfdeploy.decode.pool import DecodePool

    videos = [good_video(tmp_path / "ok.mp4"), encoded_video(tmp_path / "w16.mp4", 16, 64, pix_fmt="yuv420p"),
              truncated(tmp_path / "cut.mp4", good_video(tmp_path / "src.mp4", frames=200))]
    plan = plan_decoding("auto", device="cpu", statuses=[])
    with DecodePool(SPEC, plan=plan, workers=1) as pool:
        results = {i: (clip, how) for i, clip, how in pool.decode(videos)}
    assert [results[i][1].decoder for i in range(3)] == ["pyav", "pyav", ""]  # every CPU decode: PyAV
    assert results[0][1].reason == "the model runs on cpu"
    for i in (0, 1):
        assert np.array_equal(results[i][0], load_video(str(videos[i]), SPEC))
    assert "cannot decode" in results[2][0].error and results[2][0].path == str(videos[2])


class _StandInGpu:
    """A GPU decoder on the CPU: the CPU path's pixels at the indices the worker sampled; it fails
    on a file whose name says so, and refuses one named "grown" as frames over the limit."""

    def __init__(self, backend: str, device: str, spec: ClipSpec, max_pixels: int = 0) -> None:
        self.spec = spec

    def clip(self, source: str | bytes, info: StreamInfo, indices: tuple[int, ...]) -> np.ndarray:
        from sfdeploy.decode import DecodeError, open_video
        from sfdeploy.decode.gpu.backends import GpuDecodeFailed
        from sfdeploy.preprocess import clip_views

        if "fail" in str(source):
            raise GpuDecodeFailed("the stand-in refuses it")
        if "grown" in str(source):  # what GpuClipMaker raises for a GPU frame over the pixel limit
            raise DecodeError("frames of 8192x8192 are over the limit", reason="frame_too_large", path=str(source))
        with open_video(source) as video:
            return clip_views(video.frames(list(indices)), self.spec)


def test_routed_decoding_hands_streams_to_the_gpu_decoder_and_back(tmp_path: Path, monkeypatch) -> None:
    """The pool's GPU routing on a stand-in decoder: what the plan gives the GPU comes back from
    it, a stream NVDEC cannot take and one the GPU decoder fails on are read on the CPU with the
    reason, a corrupt video is its error row, and so is a GPU-decoded one refused for its frames' size."""
    from sfdeploy.decode.clips import DecodedBy, load_video
    from sfdeploy.decode.gpu import backends
    from sfdeploy.decode.pool import DecodePool

    monkeypatch.setattr(backends, "GpuClipMaker", _StandInGpu)
    videos = [good_video(tmp_path / "ok.mp4"), good_video(tmp_path / "fail.mp4", seed=1),
              encoded_video(tmp_path / "w16.mp4", 16, 64, pix_fmt="yuv420p"),
              truncated(tmp_path / "cut.mp4", good_video(tmp_path / "src.mp4", frames=200)),
              good_video(tmp_path / "grown.mp4", seed=2)]
    plan = plan_decoding("torchcodec", device="cuda:0", statuses=[TC])
    with DecodePool(SPEC, plan=plan, workers=1, gpu_threads=1) as pool:
        results = {i: (clip, how) for i, clip, how in pool.decode(videos)}
    assert results[0][1] == DecodedBy("nvdec:torchcodec", "--decode torchcodec; fidelity not measured for this export")
    assert results[1][1] == DecodedBy("pyav", "torchcodec failed on it (the stand-in refuses it)")
    assert results[2][1].decoder == "pyav" and "below NVDEC's h264 minimum" in results[2][1].reason
    for i in (0, 1, 2):
        assert np.array_equal(results[i][0], load_video(videos[i], SPEC))
    assert results[3][1] == DecodedBy("", "") and "cannot decode" in results[3][0].error
    assert results[4][1] == DecodedBy("", results[0][1].reason) and "over the limit" in results[4][0].error


def _sweep(tmp_path: Path) -> list[Path]:
    from sfdeploy.bench.sweep import SweepVideo, make_sweep

    # even sizes: where decord and PyAV give byte-identical frames (odd 4:2:0 VP9 differs: FFmpeg versions)
    videos = [SweepVideo("h264", 96, 96), SweepVideo("mpeg4", 160, 120, motion="move_left"),
              SweepVideo("vp9", 128, 96, motion="move_up"), SweepVideo("mjpeg", 96, 96, "yuvj420p"),
              SweepVideo("hevc", 160, 120, vfr=True), SweepVideo("h264", 97, 131, "yuv444p")]
    paths, skipped = make_sweep(tmp_path / "sweep", videos, frames=16)
    assert not skipped and len(paths) == len(videos), skipped
    return paths


def test_the_fidelity_harness_on_decord_against_pyav(tiny_export: Path, tmp_path: Path) -> None:
    """The CPU stand-in: byte-identical decoders agree on every video, with no difference at all."""
    from sfdeploy.artifacts import Manifest
    from sfdeploy.bench.fidelity import cpu_decoder, decord_decoder, measure_fidelity
    from sfdeploy.decode import open_video
    from sfdeploy.decode.gpu.gate import write_gate
    from sfdeploy.runtime import open_local

    paths = _sweep(tmp_path)
    with open_video(str(paths[4])) as video:
        assert (video.codec, video.pix_fmt) == ("hevc", "yuv420p")
    spec = Manifest.read(tiny_export).clip_spec
    predictor = open_local("torchscript", tiny_export, device="cpu", threads=1)
    record = measure_fidelity(paths, cpu_decoder(spec), decord_decoder(spec), predictor.predict)
    assert (record["reference"], record["candidate"], record["backend"]) == ("cpu", "cpu:decord", None)
    assert [v["status"] for v in record["videos"]] == ["compared"] * len(paths)
    assert all(v["agree"] and v["max_prob_diff"] == 0.0 and v["max_pixel_diff"] == 0 for v in record["videos"])
    assert set(record["codecs"]) == {"h264", "mpeg4", "vp9", "mjpeg", "hevc"}
    assert all(s["passed"] and s["agreement"] == 1.0 and s["worst_prob_diff"] == 0.0 for s in record["codecs"].values())
    with pytest.raises(InputError, match="only a GPU decoder's record gates GPU decoding"):
        write_gate(tmp_path, record)


def test_the_gate_file_round_trips_into_the_plan(tmp_path: Path) -> None:
    from sfdeploy.decode.gpu.gate import GATE_FILE, read_gates, summarize, write_gate

    entries = [{"codec": "h264", "status": "compared", "agree": True, "max_prob_diff": 0.01, "max_pixel_diff": 9}] * 3
    entries += [{"codec": "vp9", "status": "compared", "agree": a, "max_prob_diff": 0.2, "max_pixel_diff": 30}
                for a in (True, False)]
    entries += [{"codec": "mjpeg", "status": "refused", "reason": "NVDEC has no mjpeg decoder"}]
    record = {"schema": 1, "backend": "torchcodec", "candidate": "nvdec:torchcodec", "reference": "cpu",
              "threshold": 0.995, "date": "2026-12-05T10:00:00", "codecs": summarize(entries), "videos": entries}
    assert read_gates(tmp_path) == {} and read_gates(None) == {}
    path = write_gate(tmp_path, record)
    assert path == tmp_path / GATE_FILE and "videos" not in json.loads(path.read_text())["backends"]["torchcodec"]
    gate = read_gates(tmp_path)["torchcodec"]
    assert gate["h264"] == (True, "h264: 100.0% top-1 agreement on 3 videos (needs 99.5%), worst probability "
                                  "difference 0.0100 (nvdec:torchcodec vs cpu, 2026-12-05)")
    assert gate["vp9"][0] is False and "50.0%" in gate["vp9"][1]
    assert gate["mjpeg"] == (False, "mjpeg: no video compared (1 refused, 0 failed)")
    plan = plan_decoding("auto", device="cuda:0", statuses=[NONE[0], TC], gates=read_gates(tmp_path))
    assert plan.backend == "torchcodec" and plan.route(H264, 10**8)[0] is True
    path.write_text("{not json")
    with pytest.raises(InputError, match="fidelity record cannot be read"):
        read_gates(tmp_path)


def test_infer_decode_option(tiny_export: Path, synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu.csv"
    result = run_cli("infer", str(synth_root / "move_left"), "--backend", "torchscript", "--export",
                     str(tiny_export), "--decode", "gpu", "--out", str(out), check=False)
    assert result.returncode == 1 and not out.exists()  # refused before anything is written
    assert "--decode gpu leaves the decoded clips on the GPU for the model, but the model runs on cpu" in result.stderr
    assert "fix: run the exported model on the GPU here" in result.stderr
    result = run_cli("infer", str(synth_root / "move_left"), "--engine", "ray", "--decode", "torchcodec",
                     "--out", str(out), check=False)
    assert result.returncode == 2 and "--engine ray decodes in CPU tasks" in result.stderr
    out = tmp_path / "auto.csv"
    result = run_cli("infer", str(synth_root / "move_left"), str(tmp_path / "missing.mp4"), "--backend",
                     "torchscript", "--export", str(tiny_export), "--out", str(out), "--workers", "1", check=False)
    assert result.returncode == 1  # the missing file
    assert result.stderr.count("decoding on the CPU: the model runs on cpu") == 1
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "status", "label", "score", "top_k", "error", "decoder", "decoder_reason"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 16 and {(r["decoder"], r["decoder_reason"]) for r in ok} == {("pyav", "the model runs on cpu")}
    assert [(r["decoder"], r["decoder_reason"]) for r in rows if r["status"] == "error"] == [("", "")]


def test_the_decoder_columns_in_every_format_and_an_older_csv_continued(tmp_path: Path) -> None:
    from sfdeploy.decode.clips import DecodedBy
    from sfdeploy.predictions import Prediction, PredictionWriter

    row = Prediction.from_probs("b.mp4", np.array([0.2, 0.8], dtype=np.float32), ["x", "y"], 1,
                                DecodedBy("nvdec:torchcodec", "fidelity gate passed: ..."))
    assert (row.decoder, row.decoder_reason) == ("nvdec:torchcodec", "fidelity gate passed: ...")
    assert Prediction.from_arrow_row(row.to_arrow_row()) == row
    for suffix in (".jsonl", ".parquet"):
        writer = PredictionWriter(tmp_path / f"p{suffix}")
        writer.write(row)
        writer.close()
    assert json.loads((tmp_path / "p.jsonl").read_text())["decoder"] == "nvdec:torchcodec"
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "p.parquet").column("decoder_reason").to_pylist() == ["fidelity gate passed: ..."]
    old = tmp_path / "old.csv"  # written by an sfdeploy without the decoder columns
    old.write_text("path,status,label,score,top_k,error\na.mp4,ok,x,0.9,,\n")
    writer = PredictionWriter(old, resume=True)
    assert writer.done == {"a.mp4"}
    writer.write(row)
    writer.close()
    rows = list(csv.DictReader(old.open()))
    assert [r["path"] for r in rows] == ["a.mp4", "b.mp4"] and list(rows[1]) == ["path", "status", "label", "score",
                                                                                   "top_k", "error"]
    assert rows[1]["label"] == "y" and None not in rows[1]


def test_the_bench_plans_gpu_decoding_rows_and_skips_them_with_the_reason(tmp_path: Path) -> None:
    from sfdeploy.bench.run import BenchOptions
    from sfdeploy.bench.stages import Context, plan_e2e

    ctx = Context(BenchOptions(backends=("torchscript",)), None, "cpu", tmp_path, tmp_path / "export")
    rows = {t.backend: t for t in plan_e2e(ctx)}
    for backend in GPU_BACKENDS:
        for name in (f"gpu-decode-only:{backend}", f"sfdeploy:torchscript (gpu decode: {backend})"):
            row = rows[name].measure(ctx)  # nothing is exported, decoded or started to say why not
            assert row["status"] == "skipped" and row["kind"] == "videos"
            assert row["note"] == "GPU decoding is measured with --device cuda (this run: cpu)", row
    assert rows["sfdeploy:torchscript"].key == ("e2e", "sfdeploy:torchscript", "fp32", 8, 8)
    from sfdeploy.bench.stages import _gpu_decode

    if not NOT_INSTALLED:
        return
    # on CUDA (a device name only: nothing runs there) the reason is the decoder's own
    cuda = Context(BenchOptions(backends=("torchscript",)), None, "cuda:0", tmp_path, tmp_path / "export")
    row = _gpu_decode("torchcodec", "torchscript", None, 1, 1).measure(cuda)
    assert row["status"] == "skipped" and row["note"].startswith("--decode torchcodec: no GPU video decoder here")


def test_the_gpu_decoding_targets_of_a_record() -> None:
    from sfdeploy.bench.targets import targets

    def videos(backend: str, per_s: float) -> dict:
        return {"stage": "e2e", "backend": backend, "precision": "-", "batch": 1, "concurrency": 1, "kind": "videos",
                "status": "ok", "videos_per_s": per_s}

    record = {"profile": "full", "device_info": {"device": "cuda:0"}, "served": {}, "rows": [
        videos("decode-only", 64.0), videos("sfdeploy:torchscript", 60.0),
        videos("gpu-decode-only:pynvvideocodec", 400.0),
        videos("sfdeploy:torchscript (gpu decode: pynvvideocodec)", 380.0),
        videos("gpu-decode-only:torchcodec", 300.0)]}
    got = {t["target"]: t for t in targets(record)}
    assert got["GPU decode-only (pynvvideocodec) >= 5x the CPU decode-only ceiling"]["status"] == "met"
    assert got["GPU decode-only (torchcodec) >= 5x the CPU decode-only ceiling"]["status"] == "not met"
    assert got["End to end with GPU decoding (pynvvideocodec) >= 90% of GPU decode-only"]["measured"].startswith("95%")
    assert got["End to end with GPU decoding (torchcodec) >= 90% of GPU decode-only"]["status"] == "missing"
    assert got["End to end >= 90% of decode-only"]["measured"].startswith("94% (sfdeploy:torchscript:")
    record["rows"] = record["rows"][:2]
    assert {t["target"]: t["status"] for t in targets(record)}[
        "GPU decode-only >= 5x the CPU decode-only ceiling"] == "missing"


def test_the_fidelity_script_on_the_cpu_stand_in(tiny_export: Path, tmp_path: Path) -> None:
    """benchmarks/gpu_fidelity.py end to end (sweep 96 px to 1080p, record); a CPU candidate writes no gate."""
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "fidelity.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_fidelity.py"), "--export", str(tiny_export),
                             "--candidate", "decord", "--device", "cpu", "--codecs", "mpeg4", "--per-size", "1",
                             "--frames", "8", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {"record": str(out), "gate": None, "passed": ["mpeg4"]}
    record = json.loads(out.read_text())
    assert record["sweep"]["videos"] == 7 and {v["size"] for v in record["videos"]} >= {"96x96", "1920x1080"}
    assert record["codecs"]["mpeg4"]["agreement"] == 1.0 and not (tiny_export / "decode_fidelity.json").exists()
