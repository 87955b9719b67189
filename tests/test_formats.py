"""The formats after TorchScript: torch.export's ExportedProgram and AOTInductor packages, through
the same gate, runtimes and served model; bf16 on the CPU; the served runtime chosen from a
measurement; ONNX that old ONNX Runtimes (and Triton containers) load."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from sfdeploy.artifacts import Manifest
from sfdeploy.errors import EnvironmentProblem, InputError
from sfdeploy.precision import cpu_bf16

from conftest import REPO, Shifted, run_cli, running_triton, val_clips


@pytest.fixture(scope="module")
def manifest(tiny_export: Path) -> Manifest:
    return Manifest.read(tiny_export)


@pytest.fixture(scope="module")
def clips(tiny_export: Path, prepared: Path) -> np.ndarray:
    return val_clips(tiny_export, prepared, 6)


@pytest.fixture(scope="module")
def aoti_export(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sfdeploy export --formats torchscript,aoti --precisions fp32`: an AOTInductor package
    compiled for this CPU (tens of seconds), gated and timed beside TorchScript."""
    out = tmp_path_factory.mktemp("aoti") / "EXPORT"
    result = run_cli("export", str(tiny_run), "--out", str(out), "--formats", "torchscript,aoti", "--precisions",
                     "fp32", "--parity-videos", "8")
    assert "compiling the AOTInductor package (cpu, fp32)" in result.stderr  # the progress line
    return out


def test_the_export_holds_the_exported_program_in_every_precision_this_cpu_runs(manifest: Manifest,
                                                                                tiny_export: Path) -> None:
    bf16 = cpu_bf16().supported
    expected = {"torchscript", "onnx", "torch_export", "torchscript_fp16", "onnx_fp16", "torch_export_fp16"}
    expected |= {"torchscript_bf16", "torch_export_bf16"} if bf16 else set()  # ONNX has no bf16
    assert set(manifest.artifacts) == expected
    assert manifest.parity_passed and manifest.host["cpu_bf16"]["supported"] == bf16
    for key, artifact in manifest.artifacts.items():
        assert artifact.info["format"] == artifact.format and artifact.info["precision"] == artifact.precision
        assert artifact.info["producer"]["torch"] == torch.__version__, key
        assert artifact.loads_in, key
    assert manifest.artifacts["torch_export"].file == "model.pt2"
    assert manifest.artifacts["torch_export"].loads_in["torch"].startswith(f">= {torch.__version__.split('+')[0]} (")
    # timed where they were gated: what auto may serve on this CPU (fp32, and bf16 where it runs), never fp16
    timed = manifest.timings["ms_per_clip"]
    assert set(timed) == {k for k in expected if not k.endswith("fp16")}
    assert all(set(per) == {"1", "8"} and min(per.values()) > 0 for per in timed.values())
    assert manifest.timings["device_kind"] == "cpu"


def test_every_torch_artifact_says_which_torch_wrote_it_in_plain_torch(tiny_export: Path) -> None:
    extra = {"sfdeploy_artifact.json": ""}
    torch.jit.load(str(tiny_export / "model.pt"), _extra_files=extra)
    assert json.loads(extra["sfdeploy_artifact.json"])["producer"]["torch"] == torch.__version__
    extra = {"sfdeploy_artifact.json": ""}
    program = torch.export.load(str(tiny_export / "model.pt2"), extra_files=extra)
    assert json.loads(extra["sfdeploy_artifact.json"])["format"] == "torch_export"
    with torch.inference_mode():  # plain torch runs it: no sfdeploy, no model code
        probs = program.module()(torch.zeros((2, 1, 16, 64, 64, 3), dtype=torch.uint8))
    assert probs.shape == (2, 4) and torch.allclose(probs.sum(1), torch.ones(2))


def test_the_exported_program_predicts_what_torchscript_predicts(tiny_export: Path, clips: np.ndarray) -> None:
    from sfdeploy.artifacts import artifact_key
    from sfdeploy.runtime import open_local

    for precision, bound in (("fp32", 1e-5), ("bf16", 2e-2)):
        if artifact_key("torch_export", precision) not in Manifest.read(tiny_export).artifacts:
            continue  # bf16 on a CPU without it
        exported = open_local("torch_export", tiny_export, precision=precision, device="cpu")
        script = open_local("torchscript", tiny_export, precision=precision, device="cpu")
        try:
            got, expected = exported.predict(clips), script.predict(clips)
        finally:
            exported.close()
            script.close()
        assert np.abs(got - expected).max() <= bound, precision
        assert (got.argmax(1) == expected.argmax(1)).all()


def test_an_aoti_package_passes_the_gate_and_records_what_it_runs_on(aoti_export: Path) -> None:
    manifest = Manifest.read(aoti_export)
    assert manifest.parity_passed and set(manifest.artifacts) == {"torchscript", "aoti"}
    result = manifest.parity["artifacts"]["aoti"]
    assert result["max_abs_diff"] <= 1e-4 and result["top1_agreement"] == 1.0
    package = manifest.artifacts["aoti"]
    assert package.file == "model.aoti.pt2" and package.device_kind == "cpu"
    assert package.info["target"] == torch.backends.cpu.get_cpu_capability() and package.info["compile_s"] > 0
    assert package.loads_in["torch"] == f"== {torch.__version__} exactly (the build that compiled it)"
    assert set(manifest.timings["ms_per_clip"]) == {"torchscript", "aoti"}


@pytest.mark.parametrize("fmt", ["torch_export", "aoti"])
def test_the_gate_fails_a_perturbed_new_artifact(fmt: str, tiny_run: Path, request: pytest.FixtureRequest) -> None:
    """The artifact passes; the same artifact fed frames 12 grey levels off fails (the
    fp32 bound of 1e-4, on the real model and val clips)."""
    from sfdeploy.export.parity import FP32_MAX_ABS_DIFF, run_gate, val_videos
    from sfdeploy.runtime import open_local
    from sfdeploy.train.trained import load_trained

    export = request.getfixturevalue("aoti_export" if fmt == "aoti" else "tiny_export")
    trained = load_trained(tiny_run)
    exact = open_local(fmt, export, device="cpu")

    videos = [p for p, _ in val_videos(trained.cfg, 4)]
    results = run_gate(trained.recognizer, exact.spec, {"exact": (exact, "fp32"), "shifted": (Shifted(exact, 12),
                       "fp32")}, videos, show_progress=False)["artifacts"]
    assert results["exact"]["passed"] and results["exact"]["max_abs_diff"] <= FP32_MAX_ABS_DIFF
    assert not results["shifted"]["passed"] and results["shifted"]["max_abs_diff"] > 1e-3


def test_a_package_for_another_machine_is_refused_before_its_library_loads(aoti_export: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from sfdeploy.runtime import aoti, open_local

    path = aoti_export / "model.aoti.pt2"
    facts = aoti.read_package_facts(path)
    info = json.loads(facts["sfdeploy_artifact"])
    assert facts["AOTI_DEVICE_KEY"] == "cpu" and info["compiled_for"] == "cpu"
    with pytest.raises(InputError, match="compiled for cuda, not cpu"):
        aoti.check_runs_here({**facts, "AOTI_DEVICE_KEY": "cuda"}, info, "cpu", path)
    with pytest.raises(EnvironmentProblem, match="compiled by torch 2.99.0"):
        aoti.check_runs_here(facts, {**info, "producer": {"torch": "2.99.0"}}, "cpu", path)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.raises(EnvironmentProblem, match="needs a CPU with AVX512"):
        aoti.check_runs_here({**facts, "AOTI_CPU_ISA": "AVX512"}, info, "cpu", path)
    monkeypatch.undo()
    with pytest.raises(InputError, match="not an AOTInductor package"):
        aoti.read_package_facts(aoti_export / "model.pt")
    predictor = open_local("aoti", aoti_export)  # auto: the device kind it was compiled for
    assert predictor.device == "cpu"
    predictor.close()


def test_served_new_formats_predict_what_torchscript_predicts(aoti_export: Path, triton, prepared: Path,
                                                              tmp_path: Path) -> None:
    """Through Triton's python backend on CPU: the AOTInductor package and the ExportedProgram give
    the predictions TorchScript gives (served beside it), and exactly what they give in process."""
    from sfdeploy.runtime import open_local
    from sfdeploy.runtime.triton import TritonPredictor

    clips = val_clips(aoti_export, prepared, 8)
    repo = tmp_path / "model_repository"
    for name, runtime in (("slowfast_aoti", "aoti"), ("slowfast_script", "torchscript")):
        run_cli("repo", str(aoti_export), "--repo", str(repo), "--device", "cpu", "--name", name, "--runtime", runtime,
                "--precision", "fp32", "--no-native", "--no-video")
    with running_triton(repo) as server:
        served = {}
        for name in ("slowfast_aoti", "slowfast_script"):
            remote = TritonPredictor(server.grpc_url, model=name, protocol="grpc")
            served[name] = remote.predict(clips)
            remote.close()
    local = open_local("aoti", aoti_export, device="cpu")
    assert np.array_equal(served["slowfast_aoti"], local.predict(clips))
    local.close()
    assert np.abs(served["slowfast_aoti"] - served["slowfast_script"]).max() <= 1e-5
    for name in ("slowfast_pt2", "slowfast"):  # the session's server: the ExportedProgram beside TorchScript
        remote = TritonPredictor(triton.http_url, model=name)
        served[name] = remote.predict(clips)
        remote.close()
    assert np.abs(served["slowfast_pt2"] - served["slowfast"]).max() <= 1e-5


def _tamper(source: Path, target: Path, entry_suffix: str, payload: bytes,
            edit: Callable[[dict], dict] | None = None) -> None:
    """A copy of ``source`` whose archive entry ending in ``entry_suffix`` holds ``payload``, with
    ``edit`` applied to its weights table."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith(entry_suffix):
                data = payload
            elif edit and item.filename.endswith("model_weights_config.json"):
                data = json.dumps(edit(json.loads(data))).encode()
            zout.writestr(item, data)


class _OpensAFile:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_an_exported_program_with_pickled_objects_is_refused_unopened(tiny_export: Path, tmp_path: Path) -> None:
    from sfdeploy.runtime.torch_export import ExportedProgramPredictor

    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_OpensAFile(marker))

    def pickled_first_weight(config: dict) -> dict:
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        return config

    weights = tmp_path / "weights.pt2"
    _tamper(tiny_export / "model.pt2", weights, "/weights/weight_0", payload, pickled_first_weight)
    sample = tmp_path / "sample.pt2"
    _tamper(tiny_export / "model.pt2", sample, "/sample_inputs/model.pt", payload)
    for path, why in ((weights, "is a pickled object"), (sample, "does not load as plain tensors")):
        with pytest.raises(InputError, match=why):
            ExportedProgramPredictor(path)
        assert not marker.exists()
    not_zip = tmp_path / "x.pt2"
    not_zip.write_bytes(payload)
    with pytest.raises(InputError, match="not an ExportedProgram"):
        ExportedProgramPredictor(not_zip)


def test_bf16_where_the_cpu_would_only_emulate_it_is_refused(tiny_export: Path, tiny_run: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from sfdeploy import precision
    from sfdeploy.export.run import ExportOptions, export_work

    monkeypatch.setattr(precision, "cpu_bf16", lambda: precision.CpuBf16(False, "this CPU has neither"))
    assert precision.auto_precisions("cpu") == ("fp32",) and precision.auto_precisions("cuda") == ("fp32", "fp16")
    with pytest.raises(EnvironmentProblem, match="needs AVX512-BF16 or AMX: this CPU has neither"):
        export_work(tiny_run, ExportOptions(out=tmp_path / "E", precisions="fp32,bf16", device="cpu"))
    assert not (tmp_path / "E" / "manifest.json").exists()
    if "torchscript_bf16" in Manifest.read(tiny_export).artifacts:  # made here, refused on "another" CPU
        from sfdeploy.runtime import open_local

        with pytest.raises(EnvironmentProblem, match="model_bf16.pt"):
            open_local("torchscript", tiny_export, precision="bf16", device="cpu")
    with pytest.raises(InputError, match="unknown precision"):
        precision.parse_precisions("fp32,int4", "cpu")


@pytest.mark.skipif(not cpu_bf16().supported, reason="this CPU has neither AVX512-BF16 nor AMX")
def test_bf16_passes_the_reduced_precision_rule_where_the_cpu_has_it(manifest: Manifest) -> None:
    for key in ("torchscript_bf16", "torch_export_bf16"):
        result = manifest.parity["artifacts"][key]
        assert result["passed"] and result["criterion"] == "top1_agreement >= 0.99 and max_abs_diff <= 0.1"
        assert 0 < result["max_abs_diff"] <= 0.1 and result["top1_agreement"] >= 0.99
        assert result["device"] == "cpu"


def _with_timings(tiny_export: Path, folder: Path, fastest: str) -> Path:
    """A copy of the export whose recorded measurement makes ``fastest`` the fastest."""
    shutil.copytree(tiny_export, folder, copy_function=shutil.copy)
    data = json.loads((folder / "manifest.json").read_text())
    for key, per in data["timings"]["ms_per_clip"].items():
        for batch in per:
            per[batch] = 1.0 if key == fastest else 50.0
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


def test_repo_serves_what_the_export_measured_fastest_and_says_why(tiny_export: Path, tmp_path: Path) -> None:
    from sfdeploy.serving.config import parse_config

    export = _with_timings(tiny_export, tmp_path / "E", "torch_export")
    repo = tmp_path / "R"
    result = run_cli("repo", str(export), "--repo", str(repo), "--device", "cpu", "--no-video")
    config = parse_config((repo / "slowfast/config.pbtxt").read_text()).parameters
    assert (config["runtime"].string_value, config["precision"].string_value) == ("torch_export", "fp32")
    assert config["artifact"].string_value == "model.pt2"
    why = config["chosen_because"].string_value
    assert why.startswith("the fastest of") and "torch_export fp32 (1.0 ms/clip at batch 1" in why
    assert why in result.stderr  # said, not only written
    # asked for a runtime: its fastest measured precision
    run_cli("repo", str(export), "--repo", str(repo), "--device", "cpu", "--no-video", "--runtime", "onnxruntime")
    config = parse_config((repo / "slowfast/config.pbtxt").read_text()).parameters
    assert (config["runtime"].string_value, config["precision"].string_value) == ("onnxruntime", "fp32")
    # for GPU servers, a CPU measurement says nothing: the rule, and the reason says so
    run_cli("repo", str(export), "--repo", str(repo), "--device", "cuda", "--no-video")
    config = parse_config((repo / "slowfast/config.pbtxt").read_text()).parameters
    assert (config["runtime"].string_value, config["precision"].string_value) == ("torchscript", "fp16")
    assert config["chosen_because"].string_value.startswith("no measurement on gpu")
    failed = run_cli("repo", str(export), "--repo", str(repo), "--runtime", "onnxruntime", "--precision", "bf16",
                     check=False)
    assert failed.returncode == 1 and "no onnxruntime bf16 artifact" in failed.stderr and "fix:" in failed.stderr


def test_the_choice_is_the_lowest_mean_time_and_the_rule_without_a_measurement() -> None:
    from sfdeploy.serving.choice import choose

    candidates = [("onnxruntime", "fp32"), ("torchscript", "bf16"), ("torchscript", "fp32")]
    timings = {("onnxruntime", "fp32"): {"1": 10.0, "8": 9.0}, ("torchscript", "bf16"): {"1": 14.0, "8": 4.0},
               ("torchscript", "fp32"): {"1": 12.0, "8": 8.0}}
    picked = choose(candidates, timings, "cpu", measured_on="cpu at export")
    assert (picked.runtime, picked.precision) == ("torchscript", "bf16")
    assert "the fastest of 3 measured on cpu at export" in picked.why
    rule = choose(candidates + [("torchscript", "fp16")], {}, "gpu")
    assert (rule.runtime, rule.precision) == ("torchscript", "fp16") and "default rule" in rule.why
    assert (choose(candidates, {}, "cpu").runtime, choose(candidates, {}, "cpu").precision) == ("torchscript", "fp32")
    with pytest.raises(InputError, match="nothing the served model could run"):
        choose([], {}, "cpu")


def test_the_onnx_artifact_carries_the_ir_version_and_opset_readme_promises(tiny_export: Path,
                                                                          manifest: Manifest) -> None:
    """The guard: a future exporter that stamps a newer IR version or opset than the README's table
    promises fails here, before users' older Triton containers refuse the file."""
    import onnx

    from sfdeploy.compatibility import ONNX_IR_VERSION, ONNX_OPSET, readme_table
    from sfdeploy.export.onnx_export import opset_of

    for name in ("model.onnx", "model_fp16.onnx"):
        model = onnx.load(str(tiny_export / name))
        assert model.ir_version == ONNX_IR_VERSION and opset_of(model) == ONNX_OPSET, name
    facts = manifest.artifacts["onnx"]
    assert (facts.info["ir_version"], facts.info["opset"]) == (ONNX_IR_VERSION, ONNX_OPSET)
    assert facts.loads_in["onnxruntime"] == ">= 1.14" and facts.loads_in["triton_container"].startswith(">= 23.03")
    assert readme_table() in (REPO / "README.md").read_text()


# Runs in a clean interpreter with an old ONNX Runtime first on the path (no sfdeploy import).
OLD_ORT = r"""
import sys
sys.path.insert(0, sys.argv[1])
sys.modules["sfdeploy"] = None
import numpy as np, onnxruntime as ort
frames = np.load(sys.argv[3])
out = {"version": ort.__version__}
for name in ("model.onnx", "model_fp16.onnx"):
    session = ort.InferenceSession(sys.argv[2] + "/" + name, providers=["CPUExecutionProvider"])
    out[name] = session.run(None, {"frames": frames})[0]
np.savez(sys.argv[4], **{k: v for k, v in out.items() if k != "version"})
print(out["version"])
"""


@pytest.mark.slow
def test_the_onnx_artifact_loads_in_the_onnxruntime_of_triton_24_04(tiny_export: Path, clips: np.ndarray,
                                                                     tmp_path: Path) -> None:
    """ONNX Runtime 1.17.3 (Triton 24.04; <= 1.17 refuses IR version 10), installed for this test
    into a folder of its own: the same probabilities as the ONNX Runtime sfdeploy runs."""
    from sfdeploy.runtime.ort import OrtPredictor

    target = tmp_path / "ort117"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    "onnxruntime==1.17.3"], check=True, capture_output=True, text=True, timeout=600)
    np.save(tmp_path / "clips.npy", clips)
    result = subprocess.run([sys.executable, "-c", OLD_ORT, str(target), str(tiny_export), str(tmp_path / "clips.npy"),
                             str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "1.17.3"
    old = np.load(tmp_path / "out.npz")
    for name in ("model.onnx", "model_fp16.onnx"):
        now = OrtPredictor(tiny_export / name)
        assert np.abs(old[name] - now.predict(clips)).max() <= 1e-5, name
        now.close()
