"""`sfdeploy doctor`: every check passes in the environment the README installs, and a failure
is shown with its fix and a non-zero exit code."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from sfdeploy import doctor
from sfdeploy.cli import cli


def test_all_checks_pass_in_the_installed_environment() -> None:
    results = doctor.run_checks()
    assert [c.name for c in results if c.status == doctor.FAIL] == []
    names = {c.name for c in results}
    assert {"torch", "decoders", "tritonserver", "mmaction2 stack", "onnxruntime", "ray"} <= names
    decoders = next(c for c in results if c.name == "decoders")
    assert "decord 0.6.0" in decoders.detail and "PyAV 17.0.1" in decoders.detail
    assert "72 px -> pyav (8/8 frames)" in decoders.detail  # a width decord itself mis-decodes


def test_a_failing_check_prints_its_fix_and_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> doctor.Check:
        return doctor.Check("numpy", doctor.FAIL, "2.1.0", "pip install numpy==1.26.4")

    def crashing() -> doctor.Check:
        raise RuntimeError("boom")

    monkeypatch.setattr(doctor, "CHECKS", [doctor.check_python, broken, crashing])
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 1
    assert "FAIL  numpy" in result.output and "fix: pip install numpy==1.26.4" in result.output
    assert "check crashed" in result.output
    assert "2 check(s) failed" in result.output


def test_numpy_2_is_a_warning_that_says_what_breaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy 2 runs everything but the BYTES tensors of nvidia-pytriton's python backend stub."""
    installed = doctor._version

    def numpy_check(version: str) -> doctor.Check:
        monkeypatch.setattr(doctor, "_version", lambda dist: version if dist == "numpy" else installed(dist))
        return doctor.check_numpy()

    assert numpy_check("1.26.4") == doctor.Check("numpy", doctor.OK, "1.26.4")
    check = numpy_check("2.5.2")
    assert check.status == doctor.WARN and check.detail.startswith("2.5.2: ")
    assert "<name>_video" in check.detail and "refuse to load" in check.detail
    assert "numpy==1.26.4" in check.fix and "--no-video" in check.fix


def test_numpy_2_warning_without_nvidia_pytriton_names_no_none_version(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = doctor._version
    monkeypatch.setattr(doctor, "_version", lambda dist: {"numpy": "2.5.2", "nvidia-pytriton": None}.get(
        dist, installed(dist)) if dist in ("numpy", "nvidia-pytriton") else installed(dist))
    check = doctor.check_numpy()
    assert check.status == doctor.WARN
    assert "None" not in check.detail and "nvidia-pytriton, not installed" in check.detail


def test_mmaction2_stack_says_the_multimodal_models_are_off_beside_transformers_5() -> None:
    """The test environment has the real transformers 5 (the [dev] extra), as GPU images do."""
    from importlib import metadata

    if int(metadata.version("transformers").split(".")[0]) < 5:
        pytest.skip("needs transformers >= 5 (installed by sfdeploy[dev])")
    check = doctor.check_openmmlab()
    assert check.status == doctor.OK, check
    assert "multimodal models off: transformers 5" in check.detail


def test_an_import_failure_names_the_missing_module_in_its_fix() -> None:
    fix = doctor._import_fix(ModuleNotFoundError("No module named 'timm'", name="timm"))
    assert "pip install timm" in fix and "pip uninstall timm" in fix


def test_opencv_row_names_the_packages_installed_never_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU image has opencv-python-headless (cv2 5) and neither of sfdeploy's pinned pair."""
    installed = doctor._version
    image = {"opencv-python": None, "opencv-contrib-python": None, "opencv-python-headless": "5.0.0",
             "opencv-contrib-python-headless": None}
    monkeypatch.setattr(doctor, "_version", lambda dist: image[dist] if dist in image else installed(dist))
    check = doctor.check_opencv()
    assert check.status == doctor.OK and "None" not in check.detail
    assert check.detail.startswith("opencv-python-headless 5.0.0, cv2 ")


def test_gpu_video_decoding_is_optional_and_says_what_is_here() -> None:
    import torch

    from sfdeploy.doctor import OK, WARN, check_gpu_decoders

    check = check_gpu_decoders()
    assert check.name == "GPU video decoding" and "pynvvideocodec" in check.detail and "torchcodec" in check.detail
    if not torch.cuda.is_available():  # this machine: optional, not a failure
        assert check.status == OK and "(optional: NVDEC on a GPU host)" in check.detail
    else:
        assert check.status in (OK, WARN)


def test_the_new_formats_and_precisions_rows_say_what_this_machine_can_do(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from sfdeploy import precision

    names = {c.name: c for c in doctor.run_checks()}
    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    assert (names["AOTInductor"].status == doctor.OK) == bool(compiler)
    assert names["CPU bf16"].status == doctor.OK and names["CPU bf16"].detail.startswith(precision.cpu_bf16().how)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no C++ compiler on the PATH
    check = doctor.check_aoti_compiler()
    assert check.status == doctor.WARN and "a C++ compiler" in check.detail and "g++" in check.fix
    monkeypatch.setattr(precision, "cpu_bf16", lambda: precision.CpuBf16(False, "this CPU has neither"))
    assert doctor.check_cpu_bf16().detail.startswith("this CPU has neither; fp32 on the CPU")
