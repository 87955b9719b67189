"""Triton repository, the real tritonserver, and the batched client."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sfdeploy import shmkey
from sfdeploy.client import Classifier
from sfdeploy.clipspec import spec_of
from sfdeploy.errors import ServingError
from sfdeploy.runtime.ort import OrtPredictor
from sfdeploy.runtime.torch_export import ExportedProgramPredictor
from sfdeploy.runtime.torchscript import TorchScriptPredictor
from sfdeploy.runtime.triton import TritonPredictor
from sfdeploy.serving.config import parse_config
from sfdeploy.serving.repo import PYTHON_MODEL, VIDEO_MODEL

from badvideos import not_a_video, truncated
from conftest import REPO, executed_batches, run_cli, val_clips


@pytest.fixture(scope="module")
def clips(tiny_export: Path, prepared: Path) -> np.ndarray:
    return val_clips(tiny_export, prepared)


def test_every_config_parses_and_carries_the_clip_spec(tiny_repo: Path, tiny_export: Path) -> None:
    from sfdeploy.artifacts import Manifest

    spec = Manifest.read(tiny_export).clip_spec
    configs = {p.parent.name: parse_config(p.read_text()) for p in tiny_repo.glob("*/config.pbtxt")}
    assert {name: c.backend for name, c in configs.items()} == {
        "slowfast": "python", "slowfast_onnx": "onnxruntime", "slowfast_torchscript": "pytorch",
        "slowfast_ort": "python", "slowfast_video": "python", "slowfast_ort_video": "python",
        "slowfast_pt2": "python"}
    # the _video models take encoded videos: tests/test_server_decode.py checks their configs
    configs = {name: c for name, c in configs.items() if not name.endswith("_video")}
    assert configs["slowfast"].parameters["runtime"].string_value == "torchscript"
    assert configs["slowfast_ort"].parameters["runtime"].string_value == "onnxruntime"
    assert configs["slowfast_pt2"].parameters["artifact"].string_value == "model.pt2"
    assert configs["slowfast"].parameters["chosen_because"].string_value == (
        "as asked: --runtime torchscript --precision fp32")
    for name, config in configs.items():
        assert spec_of(config) == spec
        assert list(config.input[0].dims) == list(spec.input_shape)
        assert list(config.output[0].dims) == [4] and config.output[0].label_filename == "labels.txt"
        assert config.max_batch_size == 32 and config.dynamic_batching.max_queue_delay_microseconds == 5000
        assert (tiny_repo / name / "labels.txt").read_text().split() == list(spec.class_names)
    assert (tiny_repo / "slowfast/1/model.py").read_text() == PYTHON_MODEL


def test_native_configs_name_tensors_that_exist_in_the_artifacts(tiny_repo: Path) -> None:
    import onnx
    import torch

    onnx_config = parse_config((tiny_repo / "slowfast_onnx/config.pbtxt").read_text())
    graph = onnx.load(str(tiny_repo / "slowfast_onnx/1/model.onnx")).graph
    assert [i.name for i in graph.input] == [i.name for i in onnx_config.input]
    assert [o.name for o in graph.output] == [o.name for o in onnx_config.output]
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]]
    assert dims == list(onnx_config.input[0].dims)

    ts_config = parse_config((tiny_repo / "slowfast_torchscript/config.pbtxt").read_text())
    module = torch.jit.load(str(tiny_repo / "slowfast_torchscript/1/model.pt"))
    arguments = [a.name for a in module.forward.schema.arguments if a.name != "self"]
    assert [i.name for i in ts_config.input] == arguments  # pytorch backend: forward argument names
    outputs = module.forward.schema.returns
    assert len(outputs) == 1 and [o.name for o in ts_config.output] == ["probs__0"]  # <name>__<index>


def test_repo_is_idempotent_and_versions_add_folders(tiny_export: Path, tmp_path: Path) -> None:
    repo = tmp_path / "r"
    run_cli("repo", str(tiny_export), "--repo", str(repo), "--device", "cpu")
    files = {p: p.stat().st_mtime_ns for p in repo.rglob("*") if p.is_file()}
    time.sleep(0.05)
    run_cli("repo", str(tiny_export), "--repo", str(repo), "--device", "cpu")
    assert {p: p.stat().st_mtime_ns for p in repo.rglob("*") if p.is_file()} == files
    run_cli("repo", str(tiny_export), "--repo", str(repo), "--device", "cpu", "--version", "2")
    served = parse_config((repo / "slowfast/config.pbtxt").read_text()).parameters["artifact"].string_value
    assert (repo / "slowfast/1" / served).is_file() and (repo / "slowfast/2" / served).is_file()


def test_committed_model_repository_is_what_repo_writes(tiny_export: Path, tiny_repo: Path, tmp_path: Path) -> None:
    """model_repository/ in git holds the generated configs of the demo model (tiny, synthetic,
    CPU) and the python-backend code, exactly as `sfdeploy repo` writes them (on the 2-core machine
    it was written on: --decode-instances' default is the CPU count)."""
    import re

    def run_independent(text: str) -> str:  # the artifact's hash belongs to one training run
        return re.sub(r'(key: "artifact_sha256"\n  value \{\n    string_value: )"[0-9a-f]{64}"', r"\1HASH", text)

    written = tmp_path / "model_repository"
    run_cli("repo", str(tiny_export), "--repo", str(written), "--device", "cpu", "--decode-instances", "2",
            "--runtime", "torchscript", "--precision", "fp32")
    committed = REPO / "model_repository"
    for name in ("slowfast", "slowfast_onnx", "slowfast_torchscript", "slowfast_video"):
        for filename in ("config.pbtxt", "labels.txt"):
            expected, got = (run_independent((root / name / filename).read_text()) for root in (committed, written))
            assert expected == got, (name, filename)
    assert "HASH" in run_independent((written / "slowfast/config.pbtxt").read_text())
    default = (tiny_repo / "slowfast_video/config.pbtxt").read_text()  # written without --decode-instances
    assert f"instance_group {{\n  count: {os.cpu_count()}\n" in default
    assert (committed / "slowfast/1/model.py").read_text() == PYTHON_MODEL
    assert (committed / "slowfast_video/1/model.py").read_text() == VIDEO_MODEL


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("shm", [False, True])
@pytest.mark.parametrize("runtime", ["onnxruntime", "torchscript", "torch_export"])
def test_served_predictions_equal_in_process(triton, tiny_export: Path, clips: np.ndarray, protocol: str,
                                             shm: bool, runtime: str) -> None:
    """Bit for bit: the served model and the same artifact run in this process."""
    if runtime == "onnxruntime":
        local, model = OrtPredictor(tiny_export / "model.onnx"), "slowfast_ort"
    elif runtime == "torch_export":
        local, model = ExportedProgramPredictor(tiny_export / "model.pt2"), "slowfast_pt2"
    else:
        local, model = TorchScriptPredictor(tiny_export / "model.pt"), "slowfast"
    url = triton.http_url if protocol == "http" else triton.grpc_url
    remote = TritonPredictor(url, model=model, protocol=protocol, shm=shm)
    try:
        assert remote.spec == local.spec
        for n in (1, 3, 8):
            assert np.array_equal(remote.predict(clips[:n]), local.predict(clips[:n]))
    finally:
        remote.close()


def test_concurrent_requests_are_batched_by_the_server(triton, synth_root: Path, tmp_path: Path) -> None:
    stats_before = _executed_batch_sizes(triton)
    out = tmp_path / "p.csv"
    run_cli("infer", str(synth_root), "--url", triton.http_url, "--batch-size", "1", "--concurrency", "8",
            "--out", str(out))
    after = _executed_batch_sizes(triton)
    new = {size: after.get(size, 0) - stats_before.get(size, 0) for size in after}
    assert sum(size * count for size, count in new.items()) == 64  # every video executed once
    assert any(size > 1 and count > 0 for size, count in new.items()), new  # requests of 1 merged


def _executed_batch_sizes(triton) -> dict[int, int]:
    return executed_batches(triton.http_url, "slowfast")[0]


def test_a_corrupt_file_gets_its_error_row_and_the_rest_is_classified(triton, synth_root: Path,
                                                                      tmp_path: Path) -> None:
    folder = tmp_path / "videos"
    shutil.copytree(synth_root / "move_left", folder / "move_left")
    truncated(folder / "move_left" / "broken.mp4", folder / "move_left" / "move_left_0000.mp4")
    not_a_video(folder / "notes.mp4")
    out = tmp_path / "p.csv"
    result = run_cli("infer", str(folder), "--url", triton.grpc_url, "--protocol", "grpc", "--out", str(out),
                     check=False)
    assert result.returncode == 1
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert len(rows) == 18
    assert rows["broken.mp4"]["status"] == rows["notes.mp4"]["status"] == "error"
    assert "cannot decode" in rows["broken.mp4"]["error"]
    ok = [r for name, r in rows.items() if name not in ("broken.mp4", "notes.mp4")]
    assert all(r["status"] == "ok" for r in ok)
    assert sum(r["label"] == "move_left" for r in ok) >= 14  # the model is right on its training class
    assert "broken.mp4" in result.stderr


def test_python_api(triton, synth_root: Path, tiny_export: Path) -> None:
    videos = sorted((synth_root / "move_up").glob("*.mp4"))[:5]
    with Classifier.from_triton(triton.http_url, model="slowfast") as served, \
            Classifier.from_export(tiny_export, backend="torchscript") as local:
        remote = {p.path: p for p in served.classify(videos, batch_size=2, concurrency=2)}
        here = {p.path: p for p in local.classify(videos, batch_size=2)}
    assert set(remote) == {str(v) for v in videos}
    for path, prediction in remote.items():
        assert prediction.ok and prediction.label == here[path].label
        assert abs(prediction.score - here[path].score) < 1e-4


def test_client_errors_name_the_problem(triton, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    cases = [
        (["--url", f"127.0.0.1:{closed_port}"], "cannot reach a Triton server"),
        (["--url", triton.http_url, "--model", "nope"], "model 'nope' is not ready"),
    ]
    for args, message in cases:
        result = run_cli("infer", str(tmp_path), *args, "--out", str(tmp_path / "p.csv"), check=False)
        assert result.returncode == 1 and message in result.stderr and "fix:" in result.stderr


def test_a_loading_server_is_not_ready(tiny_repo: Path, tmp_path: Path) -> None:
    """While a model loads, the real server answers live but not ready (strict readiness)."""
    from sfdeploy.serving.ports import free_port
    from sfdeploy.serving.server import TritonServer

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo / "slowfast", repo / "slowfast")
    slow = repo / "slow_loading"
    shutil.copytree(tiny_repo / "slowfast/1", slow / "1")
    shutil.copy(tiny_repo / "slowfast/config.pbtxt", slow / "config.pbtxt")
    (slow / "config.pbtxt").write_text((slow / "config.pbtxt").read_text().replace('name: "slowfast"',
                                                                                  'name: "slow_loading"'))
    shutil.copy(tiny_repo / "slowfast/labels.txt", slow / "labels.txt")
    (slow / "1/model.py").write_text(  # the real sfdeploy model, 8 s slower to load
        "import time\nfrom sfdeploy.serving.python_backend import TritonPythonModel as Model\n\n\n"
        "class TritonPythonModel(Model):\n    def initialize(self, args):\n        time.sleep(8)\n"
        "        super().initialize(args)\n")
    with TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                      models=["slowfast"], allow_model_control=True) as server:
        import tritonclient.http as http

        loader = threading.Thread(target=lambda: http.InferenceServerClient(server.http_url).load_model(
            "slow_loading"), daemon=True)
        loader.start()
        time.sleep(1.5)
        with pytest.raises(ServingError, match="is not ready") as info:
            TritonPredictor(server.http_url, model="slowfast")
        assert info.value.fix
        loader.join(timeout=30)
        import tritonclient.grpc as grpc  # open: the front lets gRPC model control through too

        assert "slow_loading" in {m.name for m in grpc.InferenceServerClient(server.grpc_url)
                                  .get_model_repository_index().models}
        key_files = [shmkey.key_file(port) for port in (server.http_port, server.grpc_port)]
        assert all(path.is_file() for path in key_files)
    assert not any(path.exists() for path in key_files)  # the shared-memory key goes with the server


def test_serve_reports_a_busy_port_and_a_broken_model(tiny_repo: Path, tmp_path: Path) -> None:
    from sfdeploy.serving.ports import free_port

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--repo", str(tiny_repo), "--http-port", str(port), check=False)
    assert result.returncode == 1 and f"port {port} on 127.0.0.1 is already in use by pid {os.getpid()} (python" \
        in result.stderr  # who holds it, from the kernel's socket table

    broken = tmp_path / "repo"
    shutil.copytree(tiny_repo / "slowfast", broken / "slowfast")
    artifact = parse_config((broken / "slowfast/config.pbtxt").read_text()).parameters["artifact"].string_value
    (broken / "slowfast/1" / artifact).write_bytes(b"not a model")  # the file the model runs
    result = run_cli("serve", "--repo", str(broken), "--http-port", str(free_port()), "--grpc-port",
                     str(free_port()), "--metrics-port", str(free_port()), check=False, timeout=180)
    assert result.returncode == 1
    assert "tritonserver exited" in result.stderr and "slowfast" in result.stderr
    assert "fix:" in result.stderr


_HOLDER = """
import os, socket, subprocess, sys, time
sock = socket.socket()
sock.bind(("127.0.0.1", int(sys.argv[1])))
sock.listen()  # and never accepts, as a stub that inherited the socket
child = subprocess.Popen([sys.argv[3], "-c", "import time; time.sleep(120)"], pass_fds=[sock.fileno()]) \\
    if sys.argv[2:3] == ["--child"] else None
print(child.pid if child else os.getpid(), flush=True)
time.sleep(120)
"""


def test_a_busy_port_is_told_apart_live_server_or_leftover(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill advice only for a backend stub whose tritonserver is gone; another `sfdeploy serve`
    (its guard), a live tritonserver (and its stubs), a server that answers, or another user's
    program are named as such. Holders are python processes that look like them (their argv)."""
    import http.server

    from sfdeploy.serving import ports

    for name in ("tritonserver", "triton_python_backend_stub"):
        (tmp_path / name).symlink_to(sys.executable)
    started: list[int] = []

    def hold(*argv: str) -> tuple[int, subprocess.Popen]:
        port = ports.free_port()
        proc = subprocess.Popen([*argv[:1], "-c", _HOLDER, str(port), *argv[1:]], stdout=subprocess.PIPE, text=True)
        started.extend([proc.pid, int(proc.stdout.readline())])  # printed once it listens
        return port, proc

    def error(port: int) -> tuple[str, str]:
        err = ports.busy_port_error("127.0.0.1", port, "--http-port")
        return str(err), err.fix

    try:
        port, guard = hold(sys.executable, "-m", "sfdeploy.serving.guard", "{}")  # its parent: this process
        message, fix = error(port)
        assert f"in use by another `sfdeploy serve` (pid {os.getpid()})" in message
        assert "kill" not in fix and "stop that server" in fix and "--http-port" in fix

        port, server = hold(str(tmp_path / "tritonserver"), "--child", str(tmp_path / "triton_python_backend_stub"))
        stub = started[-1]
        message, fix = error(port)  # held by the server and its stub
        assert f"tritonserver (pid {server.pid})" in message or f"tritonserver is pid {server.pid}" in message
        assert "killed" not in message and "kill" not in fix
        server.kill()
        server.wait()  # the stub, reparented, still holds the socket: a leftover
        message, fix = error(port)
        assert f"by pid {stub} (triton_python_backend_stub), left running by a tritonserver that was killed" \
            in message and f"`kill {stub}`" in fix

        port, lone = hold(str(tmp_path / "triton_python_backend_stub"))  # its parent is no tritonserver
        message, fix = error(port)
        assert "left running by a tritonserver that was killed" in message and f"`kill {lone.pid}`" in fix
    finally:
        for pid in started:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    monkeypatch.setattr(ports, "_holders", lambda inodes: [])  # as for another user's processes
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        message, fix = error(busy.getsockname()[1])
    assert "by another program (not visible to this user" in message and "kill" not in fix
    answering = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=answering.serve_forever, daemon=True).start()
    try:
        message, fix = error(answering.server_address[1])
    finally:
        answering.shutdown()
        answering.server_close()
    assert "a live server (it answers HTTP)" in message and "kill" not in fix


def test_serve_shuts_down_cleanly_on_sigterm(tiny_repo: Path) -> None:
    from sfdeploy.serving.ports import free_port

    ports = [str(free_port()) for _ in range(3)]
    proc = subprocess.Popen([sys.executable, "-m", "sfdeploy", "serve", "--repo", str(tiny_repo), "--http-port",
                             ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = json.loads(proc.stdout.readline())  # printed once the models are ready
        assert ready["models"] == ["slowfast", "slowfast_ort", "slowfast_ort_video", "slowfast_pt2", "slowfast_video"]
        assert ready["http"] == f"127.0.0.1:{ports[0]}"
        server_pids = subprocess.run(["pgrep", "-g", str(ready["pid"])], capture_output=True,  # server and stubs
                                     text=True).stdout.split()
        assert len(server_pids) > 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    for pid in server_pids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


def test_under_numpy_2_serve_leaves_the_video_models_out_and_says_why(tiny_repo: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The stub in nvidia-pytriton passes BYTES only through its numpy 1.x bridge: by default the
    server is started without the <name>_video models (which would refuse to load) and says why."""
    from sfdeploy.serving import server as server_module

    monkeypatch.setattr(server_module, "stub_passes_bytes", lambda: False)
    server = server_module.TritonServer(tiny_repo)
    chosen = server._choose_models()
    assert "slowfast" in chosen and not any(name.endswith("_video") for name in chosen)
    assert {"slowfast_video", "slowfast_ort_video"} <= set(server.skipped)
    assert "pip install numpy==1.26.4" in server.skipped["slowfast_video"]
    monkeypatch.setattr(server_module, "stub_passes_bytes", lambda: True)
    assert "slowfast_video" in server_module.TritonServer(tiny_repo)._choose_models()
