"""Shared fixtures: the synthetic dataset and one trained slowfast_tiny run, made once per session
through the real CLI (as a user would), and reused by every test that needs a trained model."""

from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
KIT_TOOLS = REPO / "benchmarks" / "kit"


def kit_tool(name: str):
    """``benchmarks/kit/NAME.py`` as a module: the release tools (the GPU kit, the wheelhouse) live
    outside the package, run as scripts that import each other from their folder, as this does."""
    if str(KIT_TOOLS) not in sys.path:
        sys.path.insert(0, str(KIT_TOOLS))
    return importlib.import_module(name)


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests are skipped at collection where torch sees no GPU, so that `pytest -m gpu` on
    such a machine skips at once instead of building the fixtures they share first."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch sees none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`sfdeploy demo`, the main job, run once: synth -> prepare -> finetune (slowfast_tiny) ->
    export (+fp16, parity) -> repo -> serve -> infer -> short bench. Its outputs are the trained
    model, export and data the rest of the suite works with. Returns (workdir, summary)."""
    # SFDEPLOY_TEST_DEMO: the workdir of an earlier `sfdeploy demo` on this machine (a GPU check
    # that has just run the demo): demo reuses every finished stage, so the fixture costs seconds.
    given = os.environ.get("SFDEPLOY_TEST_DEMO")
    workdir = Path(given) if given else tmp_path_factory.mktemp("demo") / "demo"
    result = run_cli("demo", "--workdir", str(workdir), timeout=1500)
    for stream in ("stdout", "stderr"):  # what the console showed, for tests of the console (test_demo.py)
        (workdir / f"console.{stream}").write_text(getattr(result, stream))
    short = json.loads(result.stdout.strip().splitlines()[-1])  # the last line of stdout: for scripts
    return workdir, json.loads(Path(short["summary"]).read_text())


@pytest.fixture(scope="session")
def synth_root(demo: tuple[Path, dict]) -> Path:
    """The synthetic videos (4 classes x 16, `sfdeploy data synth` defaults)."""
    return demo[0] / "videos"


@pytest.fixture(scope="session")
def prepared(demo: tuple[Path, dict]) -> Path:
    """DATA prepared from them for slowfast_tiny."""
    return demo[0] / "data"


@pytest.fixture(scope="session")
def tiny_run(demo: tuple[Path, dict]) -> Path:
    """WORK of finetune --preset slowfast_tiny on DATA."""
    return demo[0] / "work"


@pytest.fixture(scope="session")
def tiny_summary(tiny_run: Path) -> dict:
    return json.loads((tiny_run / "finetune_summary.json").read_text())


@pytest.fixture(scope="session")
def tiny_export(demo: tuple[Path, dict]) -> Path:
    """EXPORT of WORK with --fp16: TorchScript, ONNX and ExportedProgram, fp32 + fp16 (+ bf16 but
    ONNX, on a CPU with AVX512-BF16 / AMX), one view, parity passed, timed."""
    return demo[0] / "export"


@pytest.fixture(scope="session")
def tiny_repo(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sfdeploy repo EXPORT --device cpu --runtime torchscript --precision fp32` (python backend
    running TorchScript fp32: named, so that the tests compare one known artifact, whatever this
    machine measured fastest; native configs, `slowfast_video` with the default decode instances
    and size limit), plus `slowfast_ort`: the python backend running the ONNX model, with
    `slowfast_ort_video` (1 decode instance, 1 MB limit), and `slowfast_pt2`: the ExportedProgram."""
    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    run_cli("repo", str(tiny_export), "--repo", str(repo), "--device", "cpu", "--runtime", "torchscript",
            "--precision", "fp32")
    run_cli("repo", str(tiny_export), "--repo", str(repo), "--device", "cpu", "--name", "slowfast_ort",
            "--runtime", "onnxruntime", "--no-native", "--decode-instances", "1", "--max-video-mb", "1")
    run_cli("repo", str(tiny_export), "--repo", str(repo), "--device", "cpu", "--name", "slowfast_pt2",
            "--runtime", "torch_export", "--precision", "fp32", "--no-native", "--no-video")
    return repo


@contextmanager
def running_triton(repo: Path, models: list[str] | None = None) -> Iterator:
    """The real tritonserver on free 127.0.0.1 ports, serving ``models`` of ``repo`` (all by
    default), stopped on exit: also for the tests that kill a server of their own midway."""
    from sfdeploy.serving.ports import free_port
    from sfdeploy.serving.server import TritonServer

    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          models=models).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def triton(tiny_repo: Path):
    """The real tritonserver serving the tiny models, shared by the session."""
    with running_triton(tiny_repo) as server:
        yield server


def val_clips(export: Path, prepared: Path, limit: int | None = None) -> np.ndarray:
    """The first ``limit`` (all) val videos of DATA, decoded for EXPORT's clip spec: a batch
    ``[N, V, T, H, W, 3]`` of real clips for the predictors."""
    from sfdeploy.artifacts import Manifest
    from sfdeploy.data.layout import PreparedData
    from sfdeploy.decode.clips import load_video

    data = PreparedData.from_dir(prepared)
    paths = [data.media_root / line.split()[0] for line in data.val.path.read_text().splitlines()[:limit]]
    return np.stack([load_video(str(p), Manifest.read(export).clip_spec) for p in paths])


def executed_batches(url: str, model: str) -> tuple[dict[int, int], int]:
    """Triton's statistics for ``model``: executions per batch size, and requests (inferences) served."""
    from sfdeploy.runtime.triton import TritonPredictor

    predictor = TritonPredictor(url, model=model)
    try:
        stats = predictor.statistics()
    finally:
        predictor.close()
    batches = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}
    return batches, int(stats.get("inference_count", 0))


def link_copies(videos: Path, root: Path, copies: int) -> Path:
    """``copies`` x the videos under ``videos``, as hard links under ``root/copy<i>/<class>/``:
    many inputs for a run long enough to be killed midway, at no cost in disk or encoding."""
    for copy in range(copies):
        for video in sorted(videos.rglob("*.mp4")):
            target = root / f"copy{copy}" / video.parent.name / video.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(video, target)
    return root


def csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows an `infer --out x.csv` run has written so far (none before the file exists)."""
    return list(csv.DictReader(path.open())) if path.exists() else []


def wait_for_rows(out: Path, proc: subprocess.Popen, count: int, timeout_s: float = 180) -> None:
    """Until ``count`` rows are in ``out``, while ``proc`` still runs: the moment to kill it midway."""
    deadline = time.monotonic() + timeout_s
    while len(csv_rows(out)) < count and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"


class Shifted:
    """A predictor fed frames ``shift`` grey levels off (what a normalisation bug does): the parity
    gate must fail it."""

    def __init__(self, inner, shift: int) -> None:
        self.inner, self.shift = inner, shift
        self.device, self.runtime, self.tf32 = inner.device, inner.runtime, inner.tf32

    def predict(self, frames: np.ndarray) -> np.ndarray:
        return self.inner.predict(np.clip(frames.astype(np.int16) + self.shift, 0, 255).astype(np.uint8))
