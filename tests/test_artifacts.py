"""What an export is, and that it is all-or-nothing: hashes checked on open, re-exports atomic."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sfdeploy.artifacts import MANIFEST_FILE, Manifest, artifact_file, artifact_key, sha256
from sfdeploy.device import Device
from sfdeploy.errors import InputError

from conftest import run_cli


def test_artifact_names_are_derived_in_one_place() -> None:
    assert [artifact_key(f, p) for f in ("torchscript", "onnx") for p in ("fp32", "fp16")] == [
        "torchscript", "torchscript_fp16", "onnx", "onnx_fp16"]
    assert [artifact_file(f, p) for f in ("torchscript", "onnx") for p in ("fp32", "fp16")] == [
        "model.pt", "model_fp16.pt", "model.onnx", "model_fp16.onnx"]
    with pytest.raises(InputError, match="no artifact tflite"):
        artifact_key("tflite")


def test_device_names_resolve_to_one_vocabulary() -> None:
    import torch

    assert Device("cpu").resolve() == "cpu"
    assert Device("auto").resolve() == ("cuda" if torch.cuda.is_available() else "cpu")
    # A repository written here for a GPU server elsewhere: no GPU needed to say "gpu".
    assert Device("gpu").resolve(must_exist=False) == "cuda"
    assert Device("cuda:1").resolve(must_exist=False) == "cuda:1"
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        Device("tpu")
    if not torch.cuda.is_available():
        from sfdeploy.errors import EnvironmentProblem

        with pytest.raises(EnvironmentProblem, match="torch sees no CUDA device"):
            Device("cuda").resolve()


@pytest.fixture()
def export_copy(tiny_export: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "EXPORT"
    shutil.copytree(tiny_export, copy)
    return copy


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
def test_an_artifact_changed_after_export_is_refused(export_copy: Path, tmp_path: Path, backend: str) -> None:
    from sfdeploy.runtime import open_local

    path = export_copy / artifact_file("onnx" if backend == "onnxruntime" else "torchscript")
    with open(path, "ab") as handle:
        handle.write(b"\0")  # still loads in its runtime; not the file that passed the parity gate
    with pytest.raises(InputError, match="does not match the sha256 recorded for it") as info:
        open_local(backend, export_copy)
    assert str(path) in str(info.value) and "re-run `sfdeploy export`" in str(info.value)
    for args in (["repo", str(export_copy), "--repo", str(tmp_path / "r"), "--runtime", backend, "--precision", "fp32"],
                 ["infer", str(tmp_path), "--backend", backend, "--export", str(export_copy),
                  "--out", str(tmp_path / "p.csv")]):
        result = run_cli(*args, check=False)
        assert result.returncode == 1 and "does not match the sha256" in result.stderr, result.stderr[-2000:]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"export ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_killed_reexport_leaves_the_old_export_and_a_finished_one_replaces_it(
        export_copy: Path, tiny_run: Path) -> None:
    from sfdeploy.runtime import open_local

    before = (export_copy / MANIFEST_FILE).read_text()
    old = Manifest.read(export_copy)
    assert {"torchscript_fp16", "onnx_fp16"} <= set(old.artifacts)
    # fp32 TorchScript and ONNX only this time: the other files are no longer part of it
    command = [sys.executable, "-m", "sfdeploy", "export", str(tiny_run), "--out", str(export_copy),
               "--parity-videos", "4", "--formats", "torchscript,onnx", "--precisions", "fp32", "--no-measure"]

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(export_copy.glob(".*.partial*")), proc)  # killed while writing the new files
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (export_copy / MANIFEST_FILE).read_text() == before
    for key, artifact in old.artifacts.items():  # the old export, whole and loadable
        assert sha256(export_copy / artifact.file) == artifact.sha256, key
    open_local("onnxruntime", export_copy, precision="fp16").close()

    result = run_cli(*command[3:])
    assert json.loads(result.stdout.strip().splitlines()[-1])["parity_passed"]
    new = Manifest.read(export_copy)
    assert set(new.artifacts) == {"torchscript", "onnx"}
    assert not (export_copy / "model_fp16.onnx").exists() and not (export_copy / "model_fp16.pt").exists()
    assert not (export_copy / "model.pt2").exists()
    assert not list(export_copy.glob(".*.partial*"))
    for backend in ("onnxruntime", "torchscript"):
        open_local(backend, export_copy).close()
