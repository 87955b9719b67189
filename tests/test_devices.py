"""Devices, on any host: the one rule for `auto`, CUDA asked of a runtime that cannot give it, what
a predictor accepts, exact fp32 for the parity gate, and what the gate records. (The CUDA paths
themselves are in test_gpu.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sfdeploy import doctor
from sfdeploy.artifacts import Manifest
from sfdeploy.errors import EnvironmentProblem, InputError
from sfdeploy.runtime.cuda import exact_fp32
from sfdeploy.runtime.placement import backend_device, ort_cuda_installed

from conftest import run_cli, val_clips

GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def clips(tiny_export: Path, prepared: Path) -> np.ndarray:
    return val_clips(tiny_export, prepared, limit=5)


def test_auto_is_one_rule_per_backend() -> None:
    ort_gpu = GPU and ort_cuda_installed()
    assert backend_device("torchscript", "auto") == ("cuda" if GPU else "cpu")
    assert backend_device("onnxruntime", "auto") == ("cuda" if ort_gpu else "cpu")
    assert backend_device("onnxruntime", "cpu") == backend_device("torchscript", "cpu") == "cpu"
    with pytest.raises(InputError, match="unknown local backend 'tensorrt'"):
        backend_device("tensorrt", "auto")


@pytest.mark.skipif(ort_cuda_installed(), reason="this onnxruntime has the CUDA provider")
def test_cuda_asked_of_the_cpu_build_of_onnxruntime_fails_clearly(tmp_path: Path) -> None:
    from sfdeploy.runtime.ort import OrtPredictor

    model = tmp_path / "model.onnx"
    model.write_bytes(doctor._probe_model())
    for call in (lambda: OrtPredictor(model, device="cuda"), lambda: OrtPredictor(model, device="cuda:0"),
                 lambda: backend_device("onnxruntime", "cuda")):
        with pytest.raises(EnvironmentProblem) as info:
            call()
        text = str(info.value)
        assert "is the CPU build: it has no CUDAExecutionProvider" in text
        assert "fix: pip uninstall -y onnxruntime && pip install 'sfdeploy[gpu]'" in text


@pytest.mark.skipif(ort_cuda_installed(), reason="this onnxruntime has the CUDA provider")
def test_infer_on_cuda_with_the_cpu_build_exits_1_with_the_fix(tiny_export: Path, synth_root: Path,
                                                               tmp_path: Path) -> None:
    video = next(synth_root.rglob("*.mp4"))
    result = run_cli("infer", str(video), "--backend", "onnxruntime", "--export", str(tiny_export),
                     "--device", "cuda", "--out", str(tmp_path / "p.csv"), check=False)
    assert result.returncode == 1
    assert "CPU build: it has no CUDAExecutionProvider" in result.stderr and "sfdeploy[gpu]" in result.stderr
    assert "Traceback" not in result.stderr


def test_doctor_row_for_onnxruntime_on_cuda() -> None:
    assert doctor.check_onnxruntime_cuda in doctor.CHECKS
    check = doctor.check_onnxruntime_cuda()
    if not ort_cuda_installed():
        assert "CPU build" in check.detail
        # fine on a machine without a GPU; a GPU machine is expected to have sfdeploy[gpu]
        assert check.status == (doctor.FAIL if GPU else doctor.OK)
        assert not GPU or "sfdeploy[gpu]" in check.fix
    elif GPU:  # the same check as a predictor: a real session, asked for CUDA, got it
        assert check.status == doctor.OK and "runs on CUDAExecutionProvider" in check.detail, check
    else:
        assert check.status == doctor.OK and "torch sees no GPU" in check.detail


def _precision_flags() -> tuple[str, str, bool]:
    return (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
            torch.backends.cudnn.benchmark)


def test_exact_fp32_turns_tf32_and_cudnn_benchmark_off_and_restores_the_flags(monkeypatch: pytest.MonkeyPatch
                                                                              ) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # as a finetune in the same process leaves it
    before = _precision_flags()
    with exact_fp32():
        assert _precision_flags() == ("ieee", "ieee", False)
        with exact_fp32():  # nested (a TorchScript predictor inside the gate)
            assert _precision_flags() == ("ieee", "ieee", False)
        assert _precision_flags() == ("ieee", "ieee", False)
    assert _precision_flags() == before
    with pytest.raises(RuntimeError, match="boom"), exact_fp32():
        raise RuntimeError("boom")
    assert _precision_flags() == before
    # torch's legacy getters raise after a half-way mix of its two TF32 APIs: none was left behind
    assert isinstance(torch.backends.cudnn.allow_tf32, bool) and isinstance(torch.backends.cuda.matmul.allow_tf32, bool)


def test_the_parity_gate_records_what_it_ran_with(tiny_export: Path) -> None:
    parity = Manifest.read(tiny_export).parity
    settings = parity["settings"]
    assert settings["tf32"] is False and settings["reference_runtime"] == f"torch {torch.__version__}"
    assert settings["reference_device"] == ("cuda:0" if GPU else "cpu") and settings["truth_device"] == "cpu"
    assert settings["cudnn_benchmark"] is False
    if not GPU:  # one reference, on the CPU: no device noise, the plain 1e-4 bound
        assert settings["device_noise"] == 0.0 and settings["fp32_bound"] == 1e-4
    ort_device = "cuda:0" if GPU and ort_cuda_installed() else "cpu"
    for key, result in parity["artifacts"].items():
        assert result["tf32"] is False, key
        if key.startswith("onnx"):
            assert result["device"] == ort_device
            provider = "CUDAExecutionProvider" if ort_device != "cpu" else "CPUExecutionProvider"
            assert result["runtime"].startswith("onnxruntime") and result["runtime"].endswith(provider)
        else:
            assert result["device"] == settings["reference_device"] and result["runtime"].startswith("torch ")
    checks = parity["self_checks"]
    assert set(checks) == set(parity["artifacts"])
    assert checks["onnx"]["device"] == "cpu"  # fp32: where no TF32 blurs the 1e-5 check
    assert checks["onnx_fp16"]["device"] == ort_device  # fp16: where it will be served, when it can be
    assert all(c["max_abs_diff"] <= c["tolerance"] for c in checks.values())


@pytest.mark.parametrize("backend", ["torchscript", "onnxruntime"])
def test_predictors_take_numpy_and_torch_and_compute_what_the_runtime_does(tiny_export: Path, clips: np.ndarray,
                                                                           backend: str) -> None:
    """On the CPU, bit for bit what the plain runtime computes (TorchScript: frozen and optimised
    for inference, as the predictor loads it); a torch tensor (contiguous or not) gives the same; a
    batch of the wrong type is refused by name."""
    import onnxruntime as ort

    from sfdeploy.runtime import open_local

    predictor = open_local(backend, tiny_export)
    assert predictor.device == "cpu" and predictor.tf32 is False
    if backend == "torchscript":
        assert predictor.optimized == "freeze + optimize_for_inference"
        loaded = torch.jit.load(str(tiny_export / "model.pt"))
        with torch.inference_mode():
            unoptimized = loaded(torch.from_numpy(clips)).numpy()
            plain = torch.jit.optimize_for_inference(torch.jit.freeze(loaded.eval()))(torch.from_numpy(clips)).numpy()
        assert np.abs(plain - unoptimized).max() <= 1e-6  # the CPU optimisation keeps the function
    else:
        plain = ort.InferenceSession(str(tiny_export / "model.onnx"),
                                     providers=["CPUExecutionProvider"]).run(None, {"frames": clips})[0]
    got = predictor.predict(clips)
    assert got.dtype == np.float32 and np.array_equal(got, plain)
    assert np.array_equal(predictor.predict(torch.from_numpy(clips)), plain)
    strided = torch.from_numpy(clips).transpose(0, 2).contiguous().transpose(0, 2)  # same values, other strides
    assert not strided.is_contiguous() and np.array_equal(predictor.predict(strided), plain)
    with pytest.raises(InputError, match=r"input batch float32 \(5,"):
        predictor.predict(torch.from_numpy(clips).float())
    with pytest.raises(InputError, match="a batch must be a numpy array or a torch tensor, not list"):
        predictor.predict(clips.tolist())
    predictor.close()


def test_io_binding_runs_what_run_runs(tiny_export: Path, clips: np.ndarray) -> None:
    """The I/O binding used on CUDA, driven on the CPU provider: a host array, a torch tensor bound
    by its pointer and an OrtValue all give exactly what session.run gives."""
    import onnxruntime as ort

    from sfdeploy.runtime.ort import open_session, run_bound

    session = open_session(tiny_export / "model.onnx", "cpu")
    expected = session.run(None, {"frames": clips})[0]
    inputs = [clips, torch.from_numpy(clips), torch.from_numpy(clips).transpose(0, 2).contiguous().transpose(0, 2),
              ort.OrtValue.ortvalue_from_numpy(clips)]
    for frames in inputs:
        got = run_bound(session, "frames", "probs", frames, "cpu", 0)
        assert np.array_equal(got, expected), type(frames)


def test_triton_predictor_takes_torch_tensors(triton, clips: np.ndarray) -> None:
    from sfdeploy.runtime.triton import TritonPredictor

    remote = TritonPredictor(triton.http_url, model="slowfast")
    try:
        assert remote.device == "remote"
        assert np.array_equal(remote.predict(torch.from_numpy(clips[:2])), remote.predict(clips[:2]))
    finally:
        remote.close()
