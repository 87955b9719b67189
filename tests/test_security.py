"""Security defaults: servers bind loopback, artifacts never unpickle code."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfdeploy.errors import InputError


def _listening(port: int) -> set[str]:
    """Local addresses listening on ``port`` (from /proc/net/tcp{,6}: the kernel's own view)."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                addresses.add(address)
    return addresses


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, and as ::ffff:127.0.0.1


def test_the_server_listens_on_loopback_only(triton) -> None:
    for port in (triton.http_port, triton.grpc_port, triton.metrics_port):
        addresses = _listening(port)
        assert addresses and addresses <= LOOPBACK, (port, addresses)


def test_serve_defaults_to_loopback() -> None:
    from click.testing import CliRunner

    from sfdeploy.cli import cli

    help_text = CliRunner().invoke(cli, ["serve", "--help"]).output
    assert "--host TEXT" in help_text and "[default: 127.0.0.1]" in help_text


class _Boom:
    """Unpickling this object calls ``Path.touch(marker)``: code runs, as in a malicious checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture()
def code_payload(tmp_path: Path) -> tuple[Path, Path]:
    """A real ``torch.save`` file whose unpickling runs code, proven live: a plain
    ``torch.load(weights_only=False)`` in a fresh interpreter does create the marker."""
    import subprocess
    import sys

    import torch

    marker = tmp_path / "code_ran"
    payload = tmp_path / "payload.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": _Boom(str(marker))}, payload)
    subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=False)",
                    str(payload)], check=True, capture_output=True, cwd=Path(__file__).parent)
    assert marker.exists(), "the payload must be live for the tests below to mean anything"
    marker.unlink()
    return payload, marker


@pytest.mark.parametrize("backend", ["torchscript", "onnxruntime"])
def test_an_artifact_that_is_a_pickle_does_not_run(backend: str, code_payload: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    from sfdeploy.runtime.ort import OrtPredictor
    from sfdeploy.runtime.torchscript import TorchScriptPredictor

    payload, marker = code_payload
    path = tmp_path / ("model.pt" if backend == "torchscript" else "model.onnx")
    path.write_bytes(payload.read_bytes())
    kind = "TorchScript" if backend == "torchscript" else "ONNX"
    with pytest.raises(InputError, match=f"not an? {kind} model") as caught:
        (TorchScriptPredictor if backend == "torchscript" else OrtPredictor)(path)
    assert caught.value.path == str(path) and "sfdeploy export" in caught.value.fix
    assert not marker.exists()


def test_a_checkpoint_that_runs_code_is_refused_unrun(code_payload: tuple[Path, Path]) -> None:
    """--pretrained / resume / export all load checkpoints through this function."""
    from sfdeploy.compat import load_checkpoint_file
    from sfdeploy.errors import InputError

    payload, marker = code_payload
    with pytest.raises(InputError, match="could run code when loaded"):
        load_checkpoint_file(payload)
    assert not marker.exists()


def test_model_control_is_closed_to_clients(triton) -> None:
    """Listing, loading and unloading models, and the server's logging and trace settings (which can
    make it write files where a client says), answer no client of `sfdeploy serve` unless asked
    (`--allow-model-control`; tests/test_serving.py loads a model through it)."""
    import urllib.error
    import urllib.request

    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    def post(path: str, body: bytes = b"{}") -> tuple[int, str]:
        request = urllib.request.Request(f"http://{triton.http_url}{path}", data=body, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    for path in ("/v2/repository/index", "/v2/repository/models/slowfast/unload",
                 "/v2/repository/models/slowfast_onnx/load", "/v2/logging", "/v2/trace/setting"):
        status, body = post(path, b'{"log_file": "/tmp/x"}' if path == "/v2/logging" else b"{}")
        assert status == 403 and "restricted" in body, (path, status, body)
    client = grpc.InferenceServerClient(triton.grpc_url)
    for call in (client.get_model_repository_index, lambda: client.unload_model("slowfast")):
        with pytest.raises(InferenceServerException, match="restricted"):
            call()
    assert client.is_model_ready("slowfast")  # still served
