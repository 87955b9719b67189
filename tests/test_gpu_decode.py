"""The NVDEC path on a GPU (`pytest -m gpu`), for each GPU decoder that can run here (the others are
skipped with their reason): clips decoded on the GPU stay there and are what the CPU path gives to
within the colour conversion, per-stream fallback with the reason (mjpeg, a size below NVDEC's
minimum, a corrupt file), a stream whose frames grow past the pixel limit after its header refused
on the GPU path too, `infer --device cuda --decode gpu` classifying like the CPU path, the
fidelity harness against the CPU path writing the gate `--decode auto` then follows, and the bench's
GPU decode-only row. Skipped at collection where torch sees no GPU (tests/conftest.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from sfdeploy.decode.gpu.select import GPU_BACKENDS, plan_decoding, probe_backend

from badvideos import encoded_video, good_video, growing_stream, truncated
from conftest import run_cli

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch sees none")]


def _usable(name: str) -> object:
    status = probe_backend(name) if torch.cuda.is_available() else None
    why = status.detail if status else "needs a CUDA GPU"
    return pytest.param(name, marks=pytest.mark.skipif(not (status and status.available), reason=why))


BACKENDS = [_usable(name) for name in GPU_BACKENDS]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nvdec")
    made = {"mpeg4": good_video(root / "mpeg4.mp4", frames=48, size=96),
            "h264": encoded_video(root / "h264.mp4", 320, 240, frames=48, pix_fmt="yuv420p"),
            "h264_vfr": encoded_video(root / "vfr.mp4", 320, 240, frames=48, pix_fmt="yuv420p", vfr=True),
            "hevc": encoded_video(root / "hevc.mp4", 320, 240, frames=48, codec="libx265", pix_fmt="yuv420p"),
            "mjpeg": encoded_video(root / "mjpeg.avi", 320, 240, frames=48, codec="mjpeg", pix_fmt="yuvj420p"),
            "narrow": encoded_video(root / "narrow.mp4", 40, 64, frames=48, pix_fmt="yuv420p")}
    made["corrupt"] = truncated(root / "corrupt.mp4", good_video(root / "long.mp4", frames=200))
    return made


@pytest.mark.parametrize("backend", BACKENDS)
def test_nvdec_clips_stay_on_the_gpu_and_fall_back_per_stream_with_the_reason(backend: str, videos: dict[str, Path],
                                                                             tiny_export: Path) -> None:
    from sfdeploy.artifacts import Manifest
    from sfdeploy.decode.clips import load_video
    from sfdeploy.decode.pool import DecodePool

    spec = Manifest.read(tiny_export).clip_spec
    plan = plan_decoding(backend, device="cuda:0", statuses=[probe_backend(backend)])
    names = list(videos)
    with DecodePool(spec, plan=plan, workers=2) as pool:
        got = {names[i]: (clip, how) for i, clip, how in pool.decode([videos[n] for n in names])}
    for name in ("mpeg4", "h264", "h264_vfr", "hevc"):
        clip, how = got[name]
        assert how.decoder == f"nvdec:{backend}", (name, how)
        assert clip.is_cuda and clip.dtype == torch.uint8 and tuple(clip.shape) == spec.input_shape
        cpu = load_video(str(videos[name]), spec)
        diff = np.abs(clip.cpu().numpy().astype(np.int16) - cpu.astype(np.int16))
        assert diff.mean() < 3.0, (name, diff.mean(), diff.max())  # colour conversion, not other frames
    assert got["mjpeg"][1].decoder == "pyav" and "NVDEC has no mjpeg decoder" in got["mjpeg"][1].reason
    assert got["narrow"][1].decoder == "pyav" and "below NVDEC's h264 minimum" in got["narrow"][1].reason
    assert got["corrupt"][1].decoder == "" and "cannot decode" in got["corrupt"][0].error


@pytest.mark.parametrize("backend", BACKENDS)
def test_infer_on_cuda_with_gpu_decoding_classifies_like_the_cpu_path(backend: str, tiny_export: Path,
                                                                      synth_root: Path, tmp_path: Path) -> None:
    rows = {}
    for decode in ("cpu", backend):
        out = tmp_path / f"{decode}.csv"
        run_cli("infer", str(synth_root), "--backend", "torchscript", "--export", str(tiny_export), "--device", "cuda",
                "--decode", decode, "--out", str(out))
        rows[decode] = {r["path"]: r for r in csv.DictReader(out.open())}
    assert {r["decoder"] for r in rows[backend].values()} == {f"nvdec:{backend}"}
    assert {r["decoder"] for r in rows["cpu"].values()} == {"pyav"}
    agree = sum(rows["cpu"][p]["label"] == rows[backend][p]["label"] for p in rows["cpu"])
    assert agree / len(rows["cpu"]) >= 0.98, agree


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_fidelity_gate_on_the_gpu_and_auto_following_it(backend: str, tiny_export: Path, tmp_path: Path) -> None:
    import shutil

    from sfdeploy.bench.fidelity import FidelityOptions, run_fidelity
    from sfdeploy.decode.gpu.gate import read_gates

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    record, out = run_fidelity(FidelityOptions(export=export, candidate=backend, per_size=1, frames=24,
                                               codecs=("h264", "hevc", "mpeg4", "vp9", "mjpeg"),
                                               out=tmp_path / "fidelity.json"))
    assert out.is_file() and record["backend"] == backend and record["device_info"]["gpu"]
    compared = [v for v in record["videos"] if v["status"] == "compared"]
    assert compared and sum(v["agree"] for v in compared) / len(compared) >= 0.9
    assert record["codecs"]["mjpeg"]["refused"] and not record["codecs"]["mjpeg"]["passed"]
    gates = read_gates(export)[backend]
    plan = plan_decoding("auto", device="cuda:0", statuses=[probe_backend(backend)], gates={backend: gates})
    assert plan.backend == backend
    passed = {codec for codec, (ok, _) in gates.items() if ok}
    print(f"{backend}: codecs passing the gate on this sweep: {sorted(passed)}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_bench_gpu_decode_only_row(backend: str, synth_root: Path, tiny_export: Path) -> None:
    from sfdeploy.artifacts import Manifest
    from sfdeploy.bench import suites

    paths = sorted(synth_root.rglob("*.mp4"))[:16]
    plan = plan_decoding(backend, device="cuda:0", statuses=[probe_backend(backend)])
    row = suites.gpu_decode_only_row(f"gpu-decode-only:{backend}", Manifest.read(tiny_export).clip_spec, paths,
                                     plan, workers=2)
    assert row["status"] == "ok" and row["ok_videos"] == 16 and row["videos_per_s"] > 0
    assert row["decoded_by"] == {f"nvdec:{backend}": 16}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stream_that_grows_past_the_limit_after_its_header_is_refused_on_the_gpu_path(
        backend: str, tiny_export: Path, tmp_path: Path) -> None:
    """NVDEC cannot be capped before it allocates: the frames it returns are checked, and a stream
    it cannot take goes back to PyAV, which refuses it. Either way the row says `frame_too_large`,
    no decoder is credited, and the GPU memory this took is printed for the record (pytest -rA)."""
    import subprocess

    from sfdeploy.artifacts import Manifest
    from sfdeploy.decode.clips import DecodeFailure
    from sfdeploy.decode.pool import DecodePool

    def gpu_used_mb() -> int:
        answer = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                capture_output=True, text=True)
        return int(answer.stdout.split()[0]) if answer.returncode == 0 else -1

    spec = Manifest.read(tiny_export).clip_spec
    plan = plan_decoding(backend, device="cuda:0", statuses=[probe_backend(backend)])
    cases = {"64 -> 8192 px (past the limit and NVDEC's h264 maximum)": (growing_stream(tmp_path / "8192.ts"),
                                                                       4096 * 2160),
             "256 -> 1920 px (within NVDEC's, past a 640x480 limit)": (
                 growing_stream(tmp_path / "1080.ts", small=(256, 256), large=(1920, 1080)), 640 * 480)}
    for name, (path, limit) in cases.items():
        before = gpu_used_mb()
        with DecodePool(spec, plan=plan, workers=1, max_pixels=limit, gpu_threads=1) as pool:
            [(_, result, how)] = list(pool.decode([str(path)]))
        print(f"{backend} {name}: {how.reason!r}; GPU memory {gpu_used_mb() - before:+d} MB after")
        assert isinstance(result, DecodeFailure) and "over the limit" in result.error, (name, result)
        assert how.decoder == "", (name, how)
