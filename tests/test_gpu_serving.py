"""GPU-resident serving on a GPU (`pytest -m gpu`; benchmarks/gpu_check.sh phase 5): the served
model on a KIND_GPU instance taking its inputs in GPU memory, and `<name>_video` decoding on the
server's NVDEC, both on the real tritonserver. Skipped at collection where torch sees no GPU
(tests/conftest.py); the decoding test also where no GPU decoder runs, with its reason.

What is asserted: the GPU instance's probabilities equal the same artifact run in this process on
the GPU; every h264 video the server decoded says `nvdec:<backend>` and the mjpeg one the CPU with
the reason; the served NVDEC answers agree with the client's CPU-decoded ones on top-1 for >= 99.5%
of the videos (the fidelity gate's rule), the worst probability difference printed for the record;
a request asking for the CPU gets the CPU decoder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sfdeploy.decode.gpu.gate import AGREEMENT
from sfdeploy.decode.gpu.select import probe_backends

from badvideos import encoded_video
from conftest import run_cli, running_triton

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch sees none")]


def _decoder_here() -> str:
    statuses = probe_backends() if torch.cuda.is_available() else []
    return next((s.name for s in statuses if s.available), "")


@pytest.fixture(scope="module")
def gpu_repo(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo export for GPU instances, `<name>_video` decoding on NVDEC where a GPU decoder runs."""
    repo = tmp_path_factory.mktemp("gpu-repo") / "model_repository"
    decode = "gpu" if _decoder_here() else "cpu"
    run_cli("repo", str(tiny_export), "--repo", str(repo), "--device", "cuda", "--runtime", "torchscript",
            "--precision", "fp32", "--decode", decode, "--decode-instances", "2", "--no-native")
    return repo


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """h264 videos of several sizes (what NVDEC takes) and one mjpeg (what it does not)."""
    root = tmp_path_factory.mktemp("served-nvdec")
    videos = [encoded_video(root / f"h264_{w}x{h}_{seed}.mp4", w, h, frames=48, pix_fmt="yuv420p", seed=seed)
              for seed, (w, h) in enumerate([(320, 240), (640, 360), (176, 144), (1280, 720)] * 3)]
    return [*videos, encoded_video(root / "mjpeg.avi", 320, 240, frames=48, codec="mjpeg", pix_fmt="yuvj420p")]


def test_a_gpu_instance_serves_gpu_inputs_like_in_process(gpu_repo: Path, tiny_export: Path) -> None:
    from sfdeploy.runtime import open_local
    from sfdeploy.runtime.triton import TritonPredictor

    assert 'key: "FORCE_CPU_ONLY_INPUT_TENSORS"' in (gpu_repo / "slowfast/config.pbtxt").read_text()
    local = open_local("torchscript", tiny_export, precision="fp32", device="cuda")
    frames = np.random.default_rng(0).integers(0, 256, (4, *local.spec.input_shape), dtype=np.uint8)
    with running_triton(gpu_repo, models=["slowfast"]) as server:
        served = TritonPredictor(server.grpc_url, model="slowfast", protocol="grpc")
        try:
            got = served.predict(frames)
        finally:
            served.close()
    expected = local.predict(torch.from_numpy(frames).cuda())
    assert np.abs(got - expected).max() <= 1e-4


def test_served_nvdec_agrees_with_client_cpu_decoding(gpu_repo: Path, sweep: list[Path]) -> None:
    decoder = _decoder_here()
    if not decoder:
        pytest.skip("no GPU video decoder runs here: " + "; ".join(f"{s.name}: {s.detail}" for s in probe_backends()))
    from sfdeploy.client import Classifier

    with running_triton(gpu_repo) as server:
        with Classifier.from_triton(server.grpc_url, protocol="grpc", server_decode=True) as served:
            on_gpu = {p.path: p for p in served.classify(sweep, batch_size=1, concurrency=4)}
            asked_cpu = {p.path: p for p in served.classify(sweep[:2], batch_size=1, decode="cpu")}
        with Classifier.from_triton(server.grpc_url, protocol="grpc") as client:
            on_cpu = {p.path: p for p in client.classify(sweep, batch_size=4, decode="cpu")}
    h264 = [str(p) for p in sweep if p.suffix == ".mp4"]
    assert {on_gpu[p].decoder for p in h264} == {f"nvdec:{decoder}"}, {p: on_gpu[p].decoder_reason for p in h264}
    mjpeg = on_gpu[str(sweep[-1])]
    assert mjpeg.decoder == "pyav" and "NVDEC has no mjpeg decoder" in mjpeg.decoder_reason
    assert {p.decoder for p in asked_cpu.values()} == {"pyav"}
    agreed = sum(on_gpu[p].label == on_cpu[p].label for p in on_cpu)
    worst = max(abs(on_gpu[p].score - on_cpu[p].score) for p in on_cpu)
    print(f"served NVDEC ({decoder}) vs client CPU decoding: top-1 {agreed}/{len(on_cpu)}, "
          f"worst top-1 score difference {worst:.4f}")
    assert agreed / len(on_cpu) >= AGREEMENT  # under 200 videos: none may disagree
