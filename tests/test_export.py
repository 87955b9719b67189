"""`sfdeploy export` and `sfdeploy eval`: artifacts that behave exactly like the trained model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sfdeploy.artifacts import Manifest, sha256
from sfdeploy.clipspec import SPEC_KEY, ClipSpec
from sfdeploy.data.layout import PreparedData
from sfdeploy.decode.clips import load_video

from conftest import Shifted, run_cli

# Runs in a clean interpreter: plain torch / onnxruntime, no sfdeploy import.
PLAIN_LOAD = r"""
import json, sys, numpy as np, torch, onnxruntime as ort
export, batch_file, out_file = sys.argv[1:4]
frames = np.load(batch_file)
extra = {"sfdeploy_clip_spec.json": ""}
ts = torch.jit.load(export + "/model.pt", _extra_files=extra)
session = ort.InferenceSession(export + "/model.onnx", providers=["CPUExecutionProvider"])
result = {"ts_spec": extra["sfdeploy_clip_spec.json"].decode(),
          "onnx_spec": session.get_modelmeta().custom_metadata_map["sfdeploy_clip_spec"],
          "onnx_input": [session.get_inputs()[0].name, session.get_inputs()[0].type, session.get_inputs()[0].shape]}
outputs = {}
for n in (1, 3):
    with torch.no_grad():
        outputs[f"ts{n}"] = ts(torch.from_numpy(frames[:n])).numpy()
    outputs[f"onnx{n}"] = session.run(None, {"frames": frames[:n]})[0]
np.savez(out_file, **outputs)
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def manifest(tiny_export: Path) -> Manifest:
    return Manifest.read(tiny_export)


@pytest.fixture(scope="module")
def val_clips(manifest: Manifest, prepared: Path) -> np.ndarray:
    data = PreparedData.from_dir(prepared)
    paths = [data.media_root / line.split()[0] for line in data.val.path.read_text().splitlines()]
    return np.stack([load_video(str(p), manifest.clip_spec) for p in paths[:3]])


def test_manifest_describes_the_export(manifest: Manifest, tiny_export: Path, tiny_run: Path,
                                       tiny_summary: dict) -> None:
    from sfdeploy.precision import cpu_bf16

    bf16 = {"torchscript_bf16", "torch_export_bf16"} if cpu_bf16().supported else set()
    assert set(manifest.artifacts) == {"torchscript", "onnx", "torch_export", "torchscript_fp16", "onnx_fp16",
                                       "torch_export_fp16"} | bf16
    for artifact in manifest.artifacts.values():
        assert sha256(tiny_export / artifact.file) == artifact.sha256
    spec = manifest.clip_spec
    assert spec.class_names == tuple(tiny_summary["classes"])
    assert (spec.clip_len, spec.frame_interval, spec.views, spec.crop_size) == (16, 2, 1, 64)
    assert manifest.source["checkpoint"] == tiny_summary["best_checkpoint"]
    assert manifest.to_dict()["input"]["shape"] == [-1, 1, 16, 64, 64, 3]


def test_parity_gate_passed_on_every_val_video(manifest: Manifest, prepared: Path) -> None:
    parity = manifest.parity
    assert parity["preprocess_max_pixel_diff"] == 0
    assert len(parity["videos"]) == 12  # every val video: 3 of each of the 4 classes
    assert len(set(parity["reference_top1"])) == 4
    for key, result in parity["artifacts"].items():
        assert result["passed"], (key, result)
        if result["precision"] == "fp32":
            assert result["max_abs_diff"] <= 1e-4
        else:
            assert result["top1_agreement"] >= 0.99 and result["max_abs_diff"] <= 0.1


def test_artifacts_load_without_sfdeploy_and_match_eager(tiny_export: Path, val_clips: np.ndarray,
                                                         tiny_run: Path, tmp_path: Path) -> None:
    batch_file, out_file = tmp_path / "batch.npy", tmp_path / "out.npz"
    np.save(batch_file, val_clips)
    env_code = "import sys; sys.modules['sfdeploy'] = None\n" + PLAIN_LOAD  # importing sfdeploy would fail
    result = subprocess.run([sys.executable, "-c", env_code, str(tiny_export), str(batch_file), str(out_file)],
                            capture_output=True, text=True, check=True)
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert ClipSpec.from_json(info["ts_spec"]) == ClipSpec.from_json(info["onnx_spec"])
    assert info["onnx_input"][1] == "tensor(uint8)" and info["onnx_input"][2][1:] == [1, 16, 64, 64, 3]
    assert isinstance(info["onnx_input"][2][0], str)  # dynamic batch axis

    from sfdeploy.export.deploy import SlowFastDeploy
    from sfdeploy.train.trained import load_trained

    trained = load_trained(tiny_run)
    spec = ClipSpec.from_json(info["onnx_spec"])
    eager = SlowFastDeploy(trained.recognizer, spec.mean, spec.std).eval()
    with torch.no_grad():
        expected = eager(torch.from_numpy(val_clips)).numpy()
    outputs = np.load(out_file)
    for n in (1, 3):
        for fmt in ("ts", "onnx"):
            got = outputs[f"{fmt}{n}"]
            assert got.shape == (n, 4) and got.dtype == np.float32
            assert np.abs(got - expected[:n]).max() <= 1e-4
    assert np.allclose(expected.sum(1), 1.0, atol=1e-5)  # probabilities
    assert expected.max(1).min() > 0.5  # a trained model, not a flat softmax


def test_onnx_passes_the_checker(tiny_export: Path) -> None:
    import onnx

    for name in ("model.onnx", "model_fp16.onnx"):
        model = onnx.load(str(tiny_export / name))
        onnx.checker.check_model(model, full_check=True)
        assert {p.key for p in model.metadata_props} >= {SPEC_KEY}
        assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
def test_eval_predicts_what_mmaction2_predicts_on_every_val_video(tiny_export: Path, prepared: Path,
                                                                   backend: str, tmp_path: Path) -> None:
    report_file = tmp_path / "report.json"
    run_cli("eval", str(tiny_export), "--data", str(prepared), "--backend", backend, "--out", str(report_file))
    report = json.loads(report_file.read_text())
    assert report["evaluated"] == report["videos"] == 12
    assert report["identical_top1"] == 1.0
    assert all(row["prediction"] == row["mmaction2_prediction"] for row in report["rows"])
    assert report["top1"] == report["mmaction2_top1"] >= 0.9


def test_multi_view_export(tiny_run: Path, tmp_path: Path) -> None:
    """--views 6 = the tiny config's test pipeline: 2 clips x ThreeCrop."""
    out = tmp_path / "E"
    run_cli("export", str(tiny_run), "--out", str(out), "--views", "6", "--formats", "onnx")
    manifest = Manifest.read(out)
    assert (manifest.clip_spec.num_clips, manifest.clip_spec.crop_mode) == (2, "three")
    assert manifest.to_dict()["input"]["shape"][1] == 6
    assert manifest.parity_passed and set(manifest.artifacts) == {"onnx"}


def test_a_failing_gate_fails_the_export_and_keeps_the_numbers(tiny_run: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from sfdeploy.errors import ExportError
    from sfdeploy.export import parity
    from sfdeploy.export.run import ExportOptions, export_work

    monkeypatch.setattr(parity, "FP32_MAX_ABS_DIFF", 0.0)  # no artifact is bit-exact against eager
    with pytest.raises(ExportError, match="parity gate failed"):
        export_work(tiny_run, ExportOptions(out=tmp_path / "E", formats=("onnx",), show_progress=False))
    manifest = Manifest.read(tmp_path / "E")
    assert not manifest.parity_passed
    assert manifest.parity["artifacts"]["onnx"]["max_abs_diff"] > 0


def test_bad_inputs_fail_clearly(tiny_run: Path, tiny_summary: dict, tmp_path: Path) -> None:
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    shutil.copy(tiny_run / "config.py", no_ckpt / "config.py")
    shutil.copy(tiny_run / "class_index.txt", no_ckpt / "class_index.txt")
    state = torch.load(tiny_summary["best_checkpoint"], weights_only=True)
    state["state_dict"]["cls_head.fc_cls.weight"] = torch.zeros(5, 144)
    mismatched = tmp_path / "mismatched.pth"
    torch.save(state, mismatched)
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = [
        ([str(no_ckpt), "--out", str(tmp_path / "a")], 1, "work dir has no checkpoint"),
        ([str(tiny_run), "--out", str(tmp_path / "b"), "--checkpoint", str(mismatched)], 1,
         "checkpoint does not match the model"),
        ([str(tiny_run), "--out", str(tmp_path / "c"), "--formats", "onnx,tflite"], 2, "unknown format"),
        ([str(tiny_run), "--out", str(blocker / "out")], 1, "cannot write the export folder"),
        ([str(tiny_run), "--out", str(tmp_path / "d"), "--views", "4"], 1, "use --views 1 / 2 / 3 / 6"),
        ([str(tmp_path / "nowhere"), "--out", str(tmp_path / "e")], 1, "work dir not found"),
    ]
    for args, code, message in cases:
        result = run_cli("export", *args, check=False)
        assert result.returncode == code, (args, result.stderr[-2000:])
        assert message in result.stderr, (args, result.stderr[-2000:])


def test_eval_refuses_classes_the_model_does_not_know(tiny_export: Path, tmp_path: Path) -> None:
    videos, data = tmp_path / "v", tmp_path / "d"
    run_cli("data", "synth", str(videos), "--classes", "6", "--per-class", "2", "--frames", "40")
    run_cli("data", "prepare", str(videos), "--out", str(data), "--preset", "slowfast_tiny")
    result = run_cli("eval", str(tiny_export), "--data", str(data), check=False)
    assert result.returncode == 1
    assert "val classes unknown to the model: rotate_ccw, rotate_cw" in result.stderr


def test_parity_gate_fails_a_perturbed_artifact_and_bounds_by_measured_device_noise(
        tiny_run: Path, tiny_export: Path) -> None:
    """The gate's logic on the real model, artifact and clips: the exported artifact passes; the
    same artifact fed frames 12 grey levels off (what a normalisation bug does) fails; on a device
    whose own MMAction2 noise is larger, the fp32 bound grows with it (twice), never below 1e-4."""
    from sfdeploy.export.parity import FP32_MAX_ABS_DIFF, fp32_bound, judge, run_gate, val_videos
    from sfdeploy.runtime import open_artifact
    from sfdeploy.train.trained import load_trained

    trained = load_trained(tiny_run)
    exact = open_artifact(tiny_export / "model.pt", "torchscript", tf32=False)

    videos = [p for p, _ in val_videos(trained.cfg, 4)]
    gate = run_gate(trained.recognizer, exact.spec, {"exact": (exact, "fp32"), "shifted": (Shifted(exact, 12), "fp32")},
                    videos, show_progress=False)
    results = gate["artifacts"]
    assert results["exact"]["passed"] and results["exact"]["max_abs_diff"] <= FP32_MAX_ABS_DIFF
    assert not results["shifted"]["passed"] and results["shifted"]["max_abs_diff"] > 1e-3, results["shifted"]
    # the bound follows the measured noise of the reference's device
    assert fp32_bound(0.0) == FP32_MAX_ABS_DIFF and fp32_bound(3e-4) == pytest.approx(6e-4)
    truth = np.array([[0.7, 0.2, 0.1]])
    kwargs = dict(device="cuda:0", runtime="torch", tf32=False)
    assert judge("a", "fp32", truth + [[-4e-4, 4e-4, 0]], truth, 3e-4, **kwargs).passed
    assert not judge("a", "fp32", truth + [[-4e-4, 4e-4, 0]], truth, 1e-5, **kwargs).passed
    assert not judge("a", "fp32", truth + [[-7e-4, 7e-4, 0]], truth, 3e-4, **kwargs).passed
    # noise only counts for a graph that is exact on the CPU: a wrong rewrite fails whatever the device
    assert not judge("a", "fp32", truth + [[-4e-4, 4e-4, 0]], truth, 3e-4, graph_cpu_diff=2e-3, **kwargs).passed


def test_the_trace_bakes_exact_fp32_and_fast_half_precision_convolutions(tiny_export: Path) -> None:
    """torch.jit.trace records cuDNN's flags into every convolution: an fp32 artifact must never
    run them in TF32 (what the parity gate checks at 1e-4, on any GPU), an fp16 one uses cuDNN's
    benchmark mode (its fastest kernels for the fixed served shapes)."""
    from sfdeploy.export.torchscript import conv_flags

    assert conv_flags(torch.jit.load(str(tiny_export / "model.pt"))) == {(False, False)}
    assert {benchmark for benchmark, _ in conv_flags(torch.jit.load(str(tiny_export / "model_fp16.pt")))} == {True}
    assert not torch.backends.cudnn.benchmark  # restored after tracing
