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
    # PERMISSION_DENIED, from the front: tritonserver's own answer (UNAVAILABLE) is one clients retry
    for call, why in ((client.get_model_repository_index, "--allow-model-control"),
                      (lambda: client.unload_model("slowfast"), "--allow-model-control"),
                      (lambda: client.load_model("slowfast_onnx"), "--allow-model-control"),
                      (client.get_log_settings, "logging and trace settings are closed"),
                      (lambda: client.update_log_settings({"log_file": "/tmp/x"}), "logging and trace"),
                      (client.get_trace_settings, "logging and trace settings are closed")):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "StatusCode.PERMISSION_DENIED" and why in info.value.message()
    assert client.is_model_ready("slowfast")  # still served, on the same connection


@pytest.fixture()
def foreign_region() -> Path:
    """A /dev/shm file this test made, not sfdeploy: what a client must not get the server to write."""
    import secrets

    path = Path(f"/dev/shm/sfdeploy_test_foreign_{secrets.token_hex(4)}")
    path.write_bytes(b"precious bytes!!" * 64)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _post(url: str, path: str, body: bytes | None, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """(status, body) of a POST of ``body`` to ``path`` (a GET when ``body`` is None), errors included."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://{url}{path}", data=body, headers=headers or {},
                                     method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_shared_memory_opens_only_with_the_servers_key(triton, foreign_region: Path) -> None:
    """Issue 33: registering a /dev/shm file sfdeploy never made, then asking for an output there,
    overwrote it. Without the key (which `serve` writes for this user only) registration is refused
    over both protocols, the output cannot go there, and the file is untouched; with it, sfdeploy's
    own client still registers its regions (test_serving.py runs shm=True both ways)."""
    import json
    import stat

    import numpy as np
    import tritonclient.grpc as grpc
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    from sfdeploy import shmkey
    from sfdeploy.runtime.triton import TritonPredictor

    before = foreign_region.read_bytes()
    register = json.dumps({"key": f"/{foreign_region.name}", "offset": 0, "byte_size": 1024}).encode()
    for key in ({}, {shmkey.HEADER: "0" * 32}):
        status, body = _post(triton.http_url, "/v2/systemsharedmemory/region/foreign/register", register, key)
        assert status == 403 and shmkey.HEADER in body, (status, body)
    status, body = _post(triton.http_url, "/v2/cudasharedmemory/region/foreign/register", b"{}")
    assert status == 403, (status, body)
    client = grpc.InferenceServerClient(triton.grpc_url)
    for headers in (None, {shmkey.GRPC_HEADER: "0" * 32}):
        with pytest.raises(InferenceServerException) as info:
            client.register_system_shared_memory("foreign", f"/{foreign_region.name}", 1024, headers=headers)
        assert info.value.status() == "StatusCode.PERMISSION_DENIED" and "key" in info.value.message()

    spec = TritonPredictor(triton.http_url, model="slowfast")
    for module, url in ((http, triton.http_url), (grpc, triton.grpc_url)):  # an output asked for in that region
        clips = module.InferInput(spec.input_name, [1, *spec.spec.input_shape], "UINT8")
        clips.set_data_from_numpy(np.zeros((1, *spec.spec.input_shape), np.uint8))
        output = module.InferRequestedOutput(spec.output_name)
        output.set_shared_memory("foreign", 16)
        with pytest.raises(InferenceServerException, match="Unable to find shared memory region"):
            module.InferenceServerClient(url).infer("slowfast", [clips], outputs=[output])
    assert foreign_region.read_bytes() == before
    assert client.is_model_ready("slowfast")  # the refusals ended calls, not the connection

    key_file = shmkey.key_file(triton.http_port)  # 0600 in a 0700 directory; the key opens the API
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    key = key_file.read_text().strip()
    status, body = _post(triton.http_url, "/v2/systemsharedmemory/status", None, {shmkey.HEADER: key})
    assert status == 200, body
    assert client.get_system_shared_memory_status(headers={shmkey.GRPC_HEADER: key}) is not None


def test_shared_memory_without_a_key_file_says_where_it_is(triton, tmp_path: Path, monkeypatch) -> None:
    """A client that cannot read the key (another user, another machine's server) is told which file
    it lacks and what to do; a key directory others may enter is refused, not trusted."""
    import numpy as np

    from sfdeploy import shmkey
    from sfdeploy.errors import ServingError
    from sfdeploy.runtime.triton import TritonPredictor

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    predictor = TritonPredictor(triton.http_url, model="slowfast", shm=True)
    try:
        with pytest.raises(ServingError) as info:
            predictor.predict(np.zeros((1, *predictor.spec.input_shape), np.uint8))
    finally:
        predictor.close()
    assert info.value.path == str(tmp_path / "sfdeploy" / f"shm-key-{triton.http_port}")
    assert "sfdeploy serve" in info.value.fix and "--shm" in info.value.fix
    (tmp_path / "sfdeploy").mkdir(mode=0o777)
    (tmp_path / "sfdeploy").chmod(0o777)
    with pytest.raises(ServingError, match="not private"):
        shmkey.read_key(triton.http_port)


def _non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than loopback (the kernel's pick for an outside route), if any."""
    import socket

    for target in ("10.255.255.255", "192.0.2.1", "203.0.113.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((target, 9))  # UDP: nothing is sent
            except OSError:
                continue
            address = probe.getsockname()[0]
            if not address.startswith("127."):
                return address
    return None


def test_shared_memory_is_refused_to_non_loopback_clients(triton) -> None:
    """Clients on a non-loopback connection (`serve --host 0.0.0.0`) may not register shared memory,
    even with the key, unless `--allow-remote-shm`. The guard's own accept loop runs here on this
    machine's outside address, in front of the session's tritonserver, so the peer address is real."""
    import dataclasses
    import json
    import socket
    import threading

    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    from sfdeploy import shmkey
    from sfdeploy.serving import guard
    from sfdeploy.serving.guard.common import GuardConfig, shm_refusal

    config = dataclasses.replace(GuardConfig.from_json(triton.guard.args[-1]), shm_key="k" * 32)
    assert shm_refusal(config, 1, loopback_peer=False, key=config.shm_key) is not None  # the policy itself
    assert shm_refusal(dataclasses.replace(config, allow_remote_shm=True), 1, False, config.shm_key) is None
    assert shm_refusal(config, 1, loopback_peer=True, key=config.shm_key) is None
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address (the policy above is tested)")
    key = shmkey.key_file(triton.http_port).read_text().strip()
    for allow in (False, True):
        front = dataclasses.replace(config, host=address, shm_key=key, allow_remote_shm=allow)
        sockets = [guard.listen(address, 0), guard.listen(address, 0)]
        http_url, grpc_url = (f"{address}:{sock.getsockname()[1]}" for sock in sockets)
        slots = threading.BoundedSemaphore(8)
        for sock, handler in zip(sockets, (guard.HttpConnection, guard.GrpcConnection), strict=True):
            threading.Thread(target=guard.serve, args=(sock, handler, front, slots), daemon=True).start()
        try:
            status, body = _post(http_url, "/v2/systemsharedmemory/status", None, {shmkey.HEADER: key})
            client = grpc.InferenceServerClient(grpc_url)
            if allow:
                assert status == 200, body
                assert client.get_system_shared_memory_status(headers={shmkey.GRPC_HEADER: key}) is not None
            else:
                assert status == 403 and "--allow-remote-shm" in json.loads(body)["error"], (status, body)
                with pytest.raises(InferenceServerException) as info:
                    client.get_system_shared_memory_status(headers={shmkey.GRPC_HEADER: key})
                assert info.value.status() == "StatusCode.PERMISSION_DENIED"
                assert "--allow-remote-shm" in info.value.message()
            assert client.is_server_live()  # everything else passes
            client.close()
        finally:
            for sock in sockets:  # shutdown wakes the accept loop (a close alone leaves it waiting)
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()


@pytest.mark.parametrize("body", [b'{"inputs": [{"name": "raw_input", "shape": [1', bytes(range(256)) * 4, b"[1, 2, 3]",
                                  b'{"inputs": [{"name": "raw_input", "shape": "x", "datatype": "UINT8", '
                                  b'"data": [1]}]}'],
                         ids=["truncated", "binary", "not-an-object", "wrong-type"])
@pytest.mark.parametrize("binary_header", [False, True])
def test_a_request_that_is_not_json_is_a_client_error(triton, body: bytes, binary_header: bool) -> None:
    """tritonserver 2.51 answers a request body it cannot parse with 500 (its own fault, to clients
    and retry policies); the front makes it 400, its message kept."""
    headers = {"Inference-Header-Content-Length": str(len(body))} if binary_header else {}
    status, answer = _post(triton.http_url, "/v2/models/slowfast/infer", body, headers)
    assert status == 400 and "parse" in answer, (status, answer)
