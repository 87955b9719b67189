"""Shared fixtures: the synthetic dataset and one trained slowfast_tiny run, made once per session
through the real CLI (as a user would), and reused by every test that needs a trained model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, check: bool = True, timeout: float = 900, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run ``sfdeploy ARGS`` in a fresh process (the real entry point, isolated global state)."""
    command = [sys.executable, "-m", "sfdeploy", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"sfdeploy {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "videos"
    run_cli("data", "synth", str(root), "--classes", "4", "--per-class", "16", "--seed", "0")
    return root


@pytest.fixture(scope="session")
def prepared(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "DATA"
    run_cli("data", "prepare", str(synth_root), "--out", str(out), "--preset", "slowfast_tiny")
    return out


@pytest.fixture(scope="session")
def tiny_run(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """WORK of `sfdeploy finetune --preset slowfast_tiny` on the synthetic data."""
    work = tmp_path_factory.mktemp("work") / "WORK"
    run_cli("finetune", str(prepared), "--work-dir", str(work), "--preset", "slowfast_tiny", "--seed", "0")
    return work


@pytest.fixture(scope="session")
def tiny_summary(tiny_run: Path) -> dict:
    return json.loads((tiny_run / "finetune_summary.json").read_text())


@pytest.fixture(scope="session")
def tiny_export(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EXPORT of `sfdeploy export WORK --fp16` (TorchScript + ONNX, fp32 + fp16, one view)."""
    out = tmp_path_factory.mktemp("export") / "EXPORT"
    run_cli("export", str(tiny_run), "--out", str(out), "--fp16")
    return out


@pytest.fixture(scope="session")
def tiny_repo(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sfdeploy repo EXPORT --device cpu` (python backend running TorchScript, native configs),
    plus `slowfast_ort`: the python backend running the ONNX model."""
    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    run_cli("repo", str(tiny_export), "--repo", str(repo), "--device", "cpu")
    run_cli("repo", str(tiny_export), "--repo", str(repo), "--device", "cpu", "--name", "slowfast_ort",
            "--runtime", "onnxruntime", "--no-native")
    return repo


@pytest.fixture(scope="session")
def triton(tiny_repo: Path):
    """The real tritonserver on free 127.0.0.1 ports, serving the tiny model."""
    from sfdeploy.serving.server import TritonServer, free_port

    server = TritonServer(tiny_repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    server.start()
    yield server
    server.stop()
