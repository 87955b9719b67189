"""Every path on CUDA (`pytest -m gpu`): export + parity, infer with both local backends, device
tensors, the pinned staging buffer, ONNX Runtime's provider, the Triton python backend on
KIND_GPU, finetune --amp and eval. Skipped, with the reason, where torch sees no GPU."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from sfdeploy.artifacts import Manifest
from sfdeploy.device import is_cuda
from sfdeploy.runtime.placement import ort_cuda_installed

from conftest import run_cli, val_clips

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch sees none")]

ORT_GPU = torch.cuda.is_available() and ort_cuda_installed()
needs_ort_gpu = pytest.mark.skipif(not ORT_GPU, reason="onnxruntime has no CUDA provider here (install "
                                                       "sfdeploy[gpu]; `sfdeploy doctor` fails until then)")
BACKENDS = ["torchscript", pytest.param("onnxruntime", marks=needs_ort_gpu)]


@pytest.fixture(scope="module")
def gpu_export(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`export --device cuda --fp16` of the tiny model: traced, self-checked and gated on the GPU."""
    out = tmp_path_factory.mktemp("gpu") / "EXPORT"
    formats = "torchscript,torch_export,onnx" if ORT_GPU else "torchscript,torch_export"
    run_cli("export", str(tiny_run), "--out", str(out), "--device", "cuda", "--fp16", "--formats", formats)
    return out


@pytest.fixture(scope="module")
def gpu_aoti(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`export --device cuda --formats aoti`: AOTInductor packages compiled for this GPU, fp32 + fp16."""
    out = tmp_path_factory.mktemp("gpuaoti") / "EXPORT"
    run_cli("export", str(tiny_run), "--out", str(out), "--device", "cuda", "--formats", "torchscript,aoti",
            "--parity-videos", "8")
    return out


@pytest.fixture(scope="module")
def clips(gpu_export: Path, prepared: Path) -> np.ndarray:
    return val_clips(gpu_export, prepared)


def test_export_on_cuda_passes_parity_with_tf32_off(gpu_export: Path) -> None:
    parity = Manifest.read(gpu_export).parity
    assert is_cuda(parity["settings"]["reference_device"]) and parity["settings"]["tf32"] is False
    expected = {"torchscript", "torchscript_fp16", "torch_export", "torch_export_fp16"} | (
        {"onnx", "onnx_fp16"} if ORT_GPU else set())
    assert set(parity["artifacts"]) == expected
    settings = parity["settings"]
    assert settings["truth_device"] == "cpu" and settings["cudnn_benchmark"] is False
    # the bound is 2x MMAction2's own GPU-vs-CPU difference on these clips, never below 1e-4
    assert settings["fp32_bound"] == max(1e-4, 2 * settings["device_noise"])
    for key, result in parity["artifacts"].items():
        assert result["passed"], (key, result)
        assert is_cuda(result["device"]) and result["tf32"] is False, (key, result)
        if result["precision"] == "fp32":
            assert result["max_abs_diff"] <= settings["fp32_bound"], (key, result)
        else:
            assert result["top1_agreement"] >= 0.99, (key, result)
        if key.startswith("onnx"):
            assert result["runtime"].endswith("CUDAExecutionProvider"), result
    checks = parity["self_checks"]
    assert is_cuda(checks["torchscript_fp16"]["device"])
    if ORT_GPU:  # fp16 ONNX is checked on the provider it is served with
        assert is_cuda(checks["onnx_fp16"]["device"]) and checks["onnx"]["device"] == "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_predictions_equal_cpu(gpu_export: Path, clips: np.ndarray, backend: str, precision: str) -> None:
    from sfdeploy.runtime import open_artifact, open_local

    cpu = open_local(backend, gpu_export, precision=precision, device="cpu").predict(clips)
    gpu = open_local(backend, gpu_export, precision=precision, device="cuda")
    assert gpu.device == "cuda:0"
    got = gpu.predict(clips)
    assert got.dtype == np.float32 and got.shape == cpu.shape
    assert np.array_equal(got.argmax(1), cpu.argmax(1))
    assert np.abs(got - cpu).max() <= (5e-3 if precision == "fp32" else 2e-2)  # TF32 / fp16 kernels
    if precision == "fp32":  # without TF32, as the parity gate runs
        path = gpu_export / ("model.pt" if backend == "torchscript" else "model.onnx")
        exact = open_artifact(path, "torchscript" if backend == "torchscript" else "onnx", device="cuda", tf32=False)
        assert np.abs(exact.predict(clips) - cpu).max() <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_infer_cli_on_cuda_classifies_like_the_cpu(gpu_export: Path, synth_root: Path, tmp_path: Path,
                                                   backend: str) -> None:
    rows = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.jsonl"
        run_cli("infer", str(synth_root), "--backend", backend, "--export", str(gpu_export), "--device", device,
                "--batch-size", "8", "--concurrency", "2", "--out", str(out))
        rows[device] = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(rows["cuda"]) == len(rows["cpu"]) == 64
    for path, row in rows["cuda"].items():
        assert row["status"] == "ok" and row["label"] == rows["cpu"][path]["label"], path
        assert abs(row["score"] - rows["cpu"][path]["score"]) <= 5e-3, path


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_tensors_go_in_without_a_round_trip(gpu_export: Path, clips: np.ndarray, backend: str) -> None:
    from sfdeploy.runtime import open_local

    predictor = open_local(backend, gpu_export, device="cuda")
    expected = predictor.predict(clips)
    on_device = torch.from_numpy(clips).cuda()
    assert np.allclose(predictor.predict(on_device), expected, atol=1e-6)
    # made by a kernel still queued on the current stream, and not contiguous
    pending = (on_device.to(torch.int16) + 0).to(torch.uint8).transpose(0, 2).contiguous().transpose(0, 2)
    assert not pending.is_contiguous()
    assert np.allclose(predictor.predict(pending), expected, atol=1e-6)
    assert np.allclose(predictor.predict(torch.from_numpy(clips)), expected, atol=1e-6)  # a CPU tensor
    if backend == "onnxruntime":
        import onnxruntime as ort

        value = ort.OrtValue.ortvalue_from_numpy(clips, "cuda", 0)
        assert np.allclose(predictor.predict(value), expected, atol=1e-6)


def test_the_pinned_staging_buffer_is_reused_across_batch_sizes_and_threads(gpu_export: Path,
                                                                            clips: np.ndarray) -> None:
    from sfdeploy.runtime import open_local

    predictor = open_local("torchscript", gpu_export, device="cuda")
    assert predictor.host_buffer() is None
    expected = {n: predictor.predict(clips[:n]) for n in (8, 2, 1)}
    buffer = predictor.host_buffer()
    assert buffer.is_pinned() and buffer.shape[0] == 8
    pointer = buffer.data_ptr()
    for n in (2, 8, 1, 8):
        assert np.allclose(predictor.predict(clips[:n]), expected[n], atol=1e-6), n
        assert predictor.host_buffer().data_ptr() == pointer  # a batch that fits: no new allocation
    predictor.predict(clips)  # 12 clips: grows once
    assert predictor.host_buffer().shape[0] == len(clips)
    main_buffer = predictor.host_buffer().data_ptr()

    starts = range(0, 8, 2)
    reference = {i: predictor.predict(clips[i:i + 4]) for i in starts}
    results: dict[int, list[np.ndarray]] = {}
    buffers: dict[int, int] = {}

    def work(i: int) -> None:  # `infer --concurrency N` calls one predictor from N threads
        results[i] = [predictor.predict(clips[i:i + 4]) for _ in range(3)]
        buffers[i] = predictor.host_buffer().data_ptr()

    threads = [threading.Thread(target=work, args=(i,)) for i in starts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in starts:
        assert all(np.allclose(got, reference[i], atol=1e-6) for got in results[i]), i
    assert main_buffer not in buffers.values()  # each thread stages in its own buffer


@needs_ort_gpu
def test_an_onnxruntime_session_asked_for_cuda_runs_on_cuda(gpu_export: Path) -> None:
    from sfdeploy import doctor
    from sfdeploy.runtime.ort import OrtPredictor

    for tf32, flag in ((True, "1"), (False, "0")):
        predictor = OrtPredictor(gpu_export / "model.onnx", device="cuda", tf32=tf32)
        assert predictor.providers[0] == "CUDAExecutionProvider" and predictor.tf32 is tf32
        options = predictor.session.get_provider_options()["CUDAExecutionProvider"]
        assert options["use_tf32"] == flag and options["device_id"] == "0"
    check = doctor.check_onnxruntime_cuda()
    assert check.status == doctor.OK and "CUDAExecutionProvider" in check.detail


@pytest.fixture(scope="module")
def gpu_triton(gpu_export: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny export served by the real tritonserver from a repository written with --device gpu."""
    from sfdeploy.serving.ports import free_port
    from sfdeploy.serving.server import TritonServer

    repo = tmp_path_factory.mktemp("gpurepo") / "model_repository"
    # fp32, to compare with the fp32 predictor in this process (a GPU repository serves fp16 by default)
    run_cli("repo", str(gpu_export), "--repo", str(repo), "--device", "gpu", "--no-native", "--precision", "fp32")
    if ORT_GPU:
        run_cli("repo", str(gpu_export), "--repo", str(repo), "--device", "gpu", "--no-native", "--precision", "fp32",
                "--name", "slowfast_ort", "--runtime", "onnxruntime")
    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    server.start()
    yield server, repo
    server.stop()


@pytest.mark.parametrize("runtime", ["torchscript", pytest.param("onnxruntime", marks=needs_ort_gpu)])
def test_triton_python_backend_on_kind_gpu(gpu_triton, gpu_export: Path, clips: np.ndarray, runtime: str) -> None:
    from sfdeploy.runtime import open_local
    from sfdeploy.runtime.triton import TritonPredictor
    from sfdeploy.serving.config import parse_config

    server, repo = gpu_triton
    model = "slowfast" if runtime == "torchscript" else "slowfast_ort"
    config = parse_config((repo / model / "config.pbtxt").read_text())
    assert [type(group).Kind.Name(group.kind) for group in config.instance_group] == ["KIND_GPU"]
    # the python backend logs where each instance really runs
    lines = [line for line in server.log_text().splitlines() if f"sfdeploy: {model} instance" in line]
    assert lines and all(" on cuda:" in line for line in lines), lines
    local = open_local(runtime, gpu_export, device="cuda")
    remote = TritonPredictor(server.grpc_url, model=model, protocol="grpc")
    try:
        for n in (1, 5):
            served, here = remote.predict(clips[:n]), local.predict(clips[:n])
            assert np.array_equal(served.argmax(1), here.argmax(1))
            assert np.abs(served - here).max() <= 1e-4
    finally:
        remote.close()


def test_finetune_amp_on_cuda(prepared: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    run_cli("finetune", str(prepared), "--work-dir", str(work), "--preset", "slowfast_tiny", "--epochs", "1",
            "--amp", "--pretrained", "none")
    summary = json.loads((work / "finetune_summary.json").read_text())
    assert summary["epochs_run"] == 1 and summary["best_top1"] is not None
    assert "AmpOptimWrapper" in (work / "config.py").read_text()
    checkpoint = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_on_cuda_predicts_what_mmaction2_predicts(gpu_export: Path, prepared: Path, tmp_path: Path,
                                                       backend: str) -> None:
    report_file = tmp_path / "report.json"
    run_cli("eval", str(gpu_export), "--data", str(prepared), "--backend", backend, "--device", "cuda",
            "--out", str(report_file))
    report = json.loads(report_file.read_text())
    assert report["evaluated"] == report["videos"] == 12
    assert report["identical_top1"] == 1.0 and report["top1"] >= 0.9


def test_export_on_cuda_records_the_gpu_rewrites(gpu_export: Path) -> None:
    manifest = Manifest.read(gpu_export)
    for key, artifact in manifest.artifacts.items():
        assert artifact.rewrites == ["fold_bn", "frame_conv2d", "pad_stem", "channels_last"], (key, artifact)
        assert is_cuda(artifact.optimized_for)
        changed = manifest.parity["self_checks"][key]["rewrites"]
        assert changed["fold_bn"] > 0 and changed["pad_stem"] == 2 and changed["frame_conv2d"] > 0


def test_cuda_graphs_give_what_the_module_gives_at_every_batch_size(gpu_export: Path, clips: np.ndarray) -> None:
    """Replayed graphs (batch buckets 1, 2, 4, 8, 16: a batch of 3 runs in the bucket of 4) equal
    the plain module, from one thread and from several at once."""
    from sfdeploy.runtime.torchscript import TorchScriptPredictor

    graphs = TorchScriptPredictor(gpu_export / "model.pt", device="cuda")
    plain = TorchScriptPredictor(gpu_export / "model.pt", device="cuda", cuda_graphs=False)
    assert graphs.graphs.startswith("CUDA graphs") and plain.graphs == "no CUDA graphs"
    for n in (1, 3, 8, 12, 5, 1):
        assert np.allclose(graphs.predict(clips[:n]), plain.predict(clips[:n]), atol=1e-5), n
    assert graphs._graphs.captured == [1, 4, 8, 16]
    expected = {i: plain.predict(clips[i:i + 3]) for i in range(4)}
    results: dict[int, list[np.ndarray]] = {}

    def work(i: int) -> None:
        results[i] = [graphs.predict(clips[i:i + 3]) for _ in range(5)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(4):
        assert all(np.allclose(got, expected[i], atol=1e-5) for got in results[i]), i


def test_repo_serves_what_the_gpu_measured_fastest_by_default(gpu_export: Path, tmp_path: Path) -> None:
    from sfdeploy.artifacts import BACKEND_FORMAT, artifact_key
    from sfdeploy.serving.config import parse_config

    repo = tmp_path / "repo"
    run_cli("repo", str(gpu_export), "--repo", str(repo), "--device", "gpu", "--no-native", "--no-video")
    params = parse_config((repo / "slowfast" / "config.pbtxt").read_text()).parameters
    timings = Manifest.read(gpu_export).timings
    assert timings["device_kind"] == "cuda" and set(timings["ms_per_clip"]) >= {"torchscript_fp16",
                                                                                "torch_export_fp16"}
    mean = {key: sum(per.values()) / len(per) for key, per in timings["ms_per_clip"].items()}
    chosen = artifact_key(BACKEND_FORMAT[params["runtime"].string_value], params["precision"].string_value)
    assert chosen == min(mean, key=mean.get) and "measured on cuda" in params["chosen_because"].string_value


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_new_formats_on_cuda_predict_what_torchscript_predicts(gpu_export: Path, gpu_aoti: Path,
                                                                   clips: np.ndarray, precision: str) -> None:
    """The ExportedProgram (fp32 traced on the CPU, moved to the GPU) and the AOTInductor package
    compiled for this GPU: through the gate, beside TorchScript, with CUDA graphs replayed."""
    from sfdeploy.runtime import open_local

    manifest = Manifest.read(gpu_aoti)
    assert manifest.parity_passed and manifest.artifacts["aoti"].device_kind == "cuda"
    assert manifest.artifacts["aoti"].info["target"].startswith("compute capability")
    bound = 5e-3 if precision == "fp32" else 2e-2  # TF32 (the runtimes' default, TorchScript's matmuls) / fp16
    reference = open_local("torchscript", gpu_export, precision=precision, device="cuda").predict(clips)
    for backend, export in (("torch_export", gpu_export), ("aoti", gpu_aoti)):
        predictor = open_local(backend, export, precision=precision, device="cuda")
        got = predictor.predict(clips)
        assert np.abs(got - reference).max() <= bound, backend
        assert np.array_equal(got.argmax(1), reference.argmax(1)), backend
        for n in (1, 3, 8):  # replayed graphs (a batch of 3 in the bucket of 4) give what the first call gave
            assert np.allclose(predictor.predict(clips[:n]), got[:n], atol=1e-5), (backend, n)
        assert predictor.graphs.startswith("CUDA graphs"), (backend, predictor.graphs)
        predictor.close()
