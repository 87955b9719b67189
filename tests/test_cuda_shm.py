"""How a served model's input travels (:mod:`sfdeploy.transport`): one typed value (none, system or
CUDA shared memory) from ``--shm`` or a library call to the predictor; CUDA shared memory refused,
with the fix, where it cannot work (another machine's server, no cuda-python, no GPU); the region
kinds send the server's key when they register and unregister, and the guard closes the CUDA calls
as it closes the system ones; the bench's ``triton-cuda-shm`` row, skipped with the reason on a CPU.
The last test round-trips a batch through CUDA shared memory on a real server (GPU only)."""

from __future__ import annotations

import os
import sys
import types
from dataclasses import replace
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from sfdeploy.errors import EnvironmentProblem, InputError
from sfdeploy.target import ModelTarget
from sfdeploy.transport import CHOICES, SharedMemory, shared_memory, url_host

from conftest import run_cli


def _has_cuda_python() -> bool:
    try:
        import cuda.bindings.runtime  # noqa: F401
    except ImportError:
        return False
    return True


without_cuda_python = pytest.mark.skipif(_has_cuda_python(), reason="cuda-python is installed here")


@pytest.mark.parametrize(("given", "kind"), [
    (False, SharedMemory.NONE), (True, SharedMemory.SYSTEM), (None, SharedMemory.NONE),
    ("none", SharedMemory.NONE), ("system", SharedMemory.SYSTEM), (" CUDA ", SharedMemory.CUDA),
    (SharedMemory.CUDA, SharedMemory.CUDA),
])
def test_the_transport_is_one_typed_value(given: object, kind: SharedMemory) -> None:
    """bool (what library callers passed before there were kinds), names in any case, members."""
    assert shared_memory(given) is kind
    assert ModelTarget(shm=given).shm is kind
    assert bool(kind) == (kind is not SharedMemory.NONE)  # `if target.shm` still means "shared memory at all"
    assert kind == kind.value and f"{kind}" == kind.value  # a str: JSON, logs and click take it as it is


@pytest.mark.parametrize("bad", ["device", "yes", 1, 0.5])
def test_an_unknown_transport_names_the_choices(bad: object) -> None:
    with pytest.raises(InputError, match="unknown shared memory") as info:
        shared_memory(bad)
    assert all(choice in info.value.fix for choice in CHOICES)
    with pytest.raises(InputError, match="unknown shared memory"):
        ModelTarget(shm=bad)


def test_the_target_normalises_once_and_keeps_its_checks() -> None:
    target = ModelTarget(urls=("127.0.0.1:8001",), protocol="grpc", shm="cuda")
    assert target.shm is SharedMemory.CUDA and "(CUDA shared memory)" in target.describe()
    assert "(system shared memory)" in ModelTarget(shm=True).describe()
    assert replace(target, shm=False).shm is SharedMemory.NONE  # replace() parses again
    assert all(s.shm is SharedMemory.CUDA for s in ModelTarget(urls=("127.0.0.1:1", "localhost:2"), shm="cuda")
               .servers())
    for shm in (True, "system", "cuda"):
        with pytest.raises(InputError, match="--shm"):
            ModelTarget(shm=shm, server_decode=True)


@pytest.mark.parametrize(("url", "host"), [
    ("127.0.0.1:8001", "127.0.0.1"), ("localhost", "localhost"), ("[::1]:8001", "::1"), ("::1", "::1"),
    ("http://gpu1:8000/", "gpu1"), ("gpu1", "gpu1"),
])
def test_the_host_of_a_url(url: str, host: str) -> None:
    assert url_host(url) == host


def test_cuda_shared_memory_with_a_server_elsewhere_is_refused() -> None:
    """Its IPC handle names memory on this machine's GPU: nothing a server elsewhere can open."""
    for here in ("127.0.0.1:8001", "localhost:8001", "[::1]:8001"):
        assert ModelTarget(urls=(here,), shm="cuda").shm is SharedMemory.CUDA
    for urls in (("192.0.2.7:8001",), ("127.0.0.1:8001", "192.0.2.7:8001")):  # TEST-NET-1: never this machine
        with pytest.raises(InputError, match="needs a server on this machine") as info:
            ModelTarget(urls=urls, shm="cuda")
        assert "192.0.2.7" in info.value.message and "drop --shm" in info.value.fix
    assert ModelTarget(urls=("192.0.2.7:8001",), shm="system").shm  # system: the server refuses it (no key)
    assert ModelTarget(export_dir="E", shm="cuda").local  # a local backend has no server to be far from
    from sfdeploy.runtime.triton import TritonPredictor

    with pytest.raises(InputError, match="needs a server on this machine"):  # the library path checks it too
        TritonPredictor("192.0.2.7:8001", model="m", protocol="grpc", shm="cuda")


def _echo_command() -> click.Command:
    """A command with the target options `infer` has, printing what they parsed into."""
    from sfdeploy.cli.options import target_options

    @click.command()
    @click.argument("inputs", nargs=-1)
    @target_options(several_urls=True)
    @click.option("--out", default="p.csv")
    def echo(inputs: tuple[str, ...], target: ModelTarget, out: str) -> None:
        click.echo(f"{','.join(inputs)}|{target.shm.value}|{out}")

    return echo


@pytest.mark.parametrize(("args", "parsed"), [
    (["a.mp4"], "a.mp4|none|p.csv"),
    (["a.mp4", "--shm"], "a.mp4|system|p.csv"),  # the flag as it always was: last
    (["--shm", "a.mp4", "b"], "a.mp4,b|system|p.csv"),  # ... before the positionals (not taken as its value)
    (["--shm", "--out", "x.csv", "a.mp4"], "a.mp4|system|x.csv"),  # ... before another option
    (["--shm", "cuda", "a.mp4"], "a.mp4|cuda|p.csv"),
    (["--shm", "CUDA", "a.mp4"], "a.mp4|cuda|p.csv"),
    (["a.mp4", "--shm", "system"], "a.mp4|system|p.csv"),
    (["--shm=cuda", "a.mp4"], "a.mp4|cuda|p.csv"),
    (["--shm", "none", "a.mp4"], "a.mp4|none|p.csv"),
])
def test_the_shm_option_takes_a_value_or_none(args: list[str], parsed: str) -> None:
    result = CliRunner().invoke(_echo_command(), args)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == parsed


def test_the_shm_option_refuses_what_cannot_work_as_usage_errors() -> None:
    from sfdeploy.cli.infer import infer

    runner = CliRunner()
    bad = runner.invoke(_echo_command(), ["--shm=gpu", "a.mp4"])
    assert bad.exit_code == 2 and "'gpu' is not one of" in bad.output
    for args, says in ((["a.mp4", "--shm", "cuda", "--url", "192.0.2.7:8001"], "needs a server on this machine"),
                       (["a.mp4", "--shm", "--server-decode"], "drop --shm or --server-decode")):
        result = runner.invoke(infer, args)
        assert result.exit_code == 2 and says in result.output, result.output
    help_text = " ".join(runner.invoke(infer, ["--help"]).output.split())
    assert "--shm [none|system|cuda]" in help_text and "--shm alone (or --shm system)" in help_text
    assert "--shm cuda: CUDA shared memory" in help_text


@without_cuda_python
def test_cuda_shared_memory_without_cuda_python_fails_at_open(tmp_path: Path) -> None:
    """Before the server is asked anything (port 1: nothing listens), naming the package and the fix."""
    from sfdeploy.runtime.triton import TritonPredictor

    for opening in (lambda: TritonPredictor("127.0.0.1:1", model="m", protocol="grpc", shm="cuda"),
                    lambda: ModelTarget(urls=("127.0.0.1:1",), protocol="grpc", shm="cuda").open()):
        with pytest.raises(EnvironmentProblem, match="'cuda-python'") as info:
            opening()
        assert "--shm system" in info.value.fix and "sfdeploy[gpu]" in info.value.fix
    video = tmp_path / "a.mp4"
    video.write_bytes(b"")
    result = run_cli("infer", str(video), "--shm", "cuda", "--url", "127.0.0.1:1", "--out", str(tmp_path / "p.csv"),
                     check=False, timeout=120)
    assert result.returncode == 1 and "'cuda-python'" in result.stderr and "--shm system" in result.stderr


def test_no_gpu_for_cuda_shared_memory_is_an_environment_problem() -> None:
    from sfdeploy.runtime.shm_regions import check_gpu

    check_gpu(2, 1)
    with pytest.raises(EnvironmentProblem, match="no GPU is visible here .CUDA says cudaErrorNoDevice.") as info:
        check_gpu(0, 0, "CUDA says cudaErrorNoDevice")
    assert "--shm system" in info.value.fix
    with pytest.raises(EnvironmentProblem, match="GPU 1, and this machine shows 1"):
        check_gpu(1, 1)


class _Client:
    """A tritonclient client that records the shared-memory calls it is asked to make."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def test_each_region_kind_sends_the_key_when_it_registers_and_unregisters(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's shared-memory API answers only requests with its key (sfdeploy.shmkey): both kinds
    send it on register and unregister; a CUDA region is registered by its IPC handle, on its GPU."""
    from sfdeploy.runtime import shm_regions

    fake = types.SimpleNamespace(
        made=[], written=[], destroyed=[],
        create_shared_memory_region=lambda name, size, device: fake.made.append((name, size, device)) or "handle",
        get_raw_handle=lambda handle: b"aXBj",
        set_shared_memory_region=lambda handle, arrays: fake.written.append(arrays[0].copy()),
        destroy_shared_memory_region=lambda handle: fake.destroyed.append(handle))
    monkeypatch.setattr(shm_regions, "cuda_shared_memory", lambda device_id=0: fake)
    monkeypatch.setitem(sys.modules, "tritonclient.utils.cuda_shared_memory", fake)
    key = {"triton-grpc-protocol-sfdeploy-shm-key": "k"}
    batch = np.arange(24, dtype=np.uint8).reshape(1, 1, 2, 2, 2, 3)
    for kind, register, unregister in ((SharedMemory.SYSTEM, "register_system_shared_memory",
                                        "unregister_system_shared_memory"),
                                       (SharedMemory.CUDA, "register_cuda_shared_memory",
                                        "unregister_cuda_shared_memory")):
        client = _Client()
        name = f"sfdeploy_test_{kind.value}_{os.getpid()}"
        region = shm_regions.REGIONS[kind](name, 64, 1)
        try:
            region.register(client, key)
            region.write(batch)
            assert region.fits(24, 1) and not region.fits(65, 1)
        finally:
            region.close()
        assert [(name, kwargs["headers"]) for name, _, kwargs in client.calls] == [(register, key), (unregister, key)]
        if kind is SharedMemory.CUDA:
            assert client.calls[0][1] == (name, b"aXBj", 1, 64) and fake.made == [(name, 64, 1)]
            assert np.array_equal(fake.written[0], batch) and fake.destroyed == ["handle"]
            assert not region.fits(24, 0)  # a batch on another GPU gets a region there


def test_the_guard_closes_cuda_shared_memory_as_it_closes_system_shared_memory() -> None:
    """tritonserver's restricted `shared-memory` API covers both kinds; the front refuses both first."""
    from sfdeploy.serving.guard.common import SHM_METHODS, GuardConfig, is_shm_path, shm_refusal

    for kind in ("system", "cuda"):
        for path in (f"/v2/{kind}sharedmemory/region/r/register", f"/v2/{kind}sharedmemory/region/r/unregister",
                     f"/v2/{kind}sharedmemory/status", f"//v2/{kind.upper()}SharedMemory/unregister",
                     f"/v2/{kind}shared%6Demory/region/r/register", f"http://h:8000/v2/{kind}sharedmemory/status"):
            assert is_shm_path(path), path
    for call in ("Register", "Unregister", "Status"):
        for kind in ("System", "Cuda"):
            assert f"/inference.GRPCInferenceService/{kind}SharedMemory{call}".startswith(SHM_METHODS)
    config = GuardConfig("127.0.0.1", 1, 2, 3, 4, {}, 0, shm_key="k" * 32)
    assert shm_refusal(config, 1, loopback_peer=True, key=None) and shm_refusal(config, 1, True, "x" * 32)
    assert shm_refusal(config, 1, loopback_peer=True, key="k" * 32) is None


def _bench_context(tmp_path: Path, device: str, backends: tuple[str, ...]):
    from sfdeploy.bench.record import Record
    from sfdeploy.bench.run import BenchOptions
    from sfdeploy.bench.stages import Context

    header = {"date": "2026-12-05", "profile": "small", "model": "m", "clip_spec": {"crop_size": 64},
              "served": {"backend": "python", "runtime": "auto", "precision": "auto"},
              "device_info": {"device": device, "cpu_cores": 2, "packages": {}}, "settings": {}}
    record = Record.open(tmp_path / f"{device}.json", header, resume=False)
    record.add({"stage": "model", "backend": "torchscript", "precision": "fp32", "batch": 8, "concurrency": 1,
                "kind": "clips", "status": "ok", "clips_per_s": 100.0})
    opts = BenchOptions(precisions=("fp32",), backends=backends, concurrency=(1, 2), triton_batch=2)
    return Context(opts, None, device, tmp_path, tmp_path, record)


def test_the_bench_row_is_planned_when_named_and_skipped_with_the_reason_where_it_cannot_run(tmp_path: Path) -> None:
    from sfdeploy.bench import BACKENDS, DEFAULT_BACKENDS
    from sfdeploy.bench.report import sort_key
    from sfdeploy.bench.rows import SKIPPED
    from sfdeploy.bench.run import BenchOptions, check_options
    from sfdeploy.bench.stages import SERVED_TRANSPORTS, _served, plan_triton

    assert "triton-cuda-shm" in BACKENDS and "triton-cuda-shm" not in DEFAULT_BACKENDS  # a GPU run names it
    assert SERVED_TRANSPORTS["triton-cuda-shm"] == ("grpc", "cuda")
    check_options(BenchOptions(backends=("triton-cuda-shm",), precisions=("fp32",)), "cpu")  # a known backend
    context = _bench_context(tmp_path, "cpu", ("torchscript", "triton-shm", "triton-cuda-shm"))
    tasks = plan_triton(context)
    assert [(t.backend, t.concurrency) for t in tasks] == [
        ("torchscript", 1), ("triton-shm", 1), ("triton-cuda-shm", 1),
        ("torchscript", 2), ("triton-shm", 2), ("triton-cuda-shm", 2)]
    row = next(t for t in tasks if t.backend == "triton-cuda-shm").measure(context)  # no server is started
    assert row["status"] == SKIPPED and "--device cuda" in row["note"] and row["stage"] == "triton"
    assert (row["backend"], row["precision"], row["batch"], row["concurrency"]) == ("triton-cuda-shm", "fp32", 2, 1)
    rows = [{**row, "backend": b} for b in ("triton-video", "triton-cuda-shm", "triton-shm")]
    assert [r["backend"] for r in sorted(rows, key=sort_key)] == ["triton-shm", "triton-cuda-shm", "triton-video"]
    if not _has_cuda_python():  # a GPU run without cuda-python: skipped, naming the package
        gpu = _bench_context(tmp_path, "cuda", ("torchscript", "triton-cuda-shm"))
        row = _served("triton-cuda-shm", "fp16", 2, 1).measure(gpu)
        assert row["status"] == SKIPPED and "'cuda-python'" in row["note"]


@pytest.mark.gpu
def test_a_batch_round_trips_through_cuda_shared_memory(triton, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real server reads the input from CUDA shared memory: the same probabilities as over the
    network, from a host batch and from a CUDA tensor (device to device: never through the host);
    closing unregisters every region."""
    pytest.importorskip("cuda.bindings.runtime", reason="CUDA shared memory needs cuda-python (sfdeploy[gpu])")
    import torch

    from sfdeploy import shmkey
    from sfdeploy.runtime import shm_regions
    from sfdeploy.runtime import triton as runtime
    from sfdeploy.runtime.triton import TritonPredictor

    plain = TritonPredictor(triton.grpc_url, model="slowfast", protocol="grpc")
    cuda = ModelTarget(urls=(triton.grpc_url,), protocol="grpc", model="slowfast", shm="cuda", device="cuda:0").open()
    try:
        clips = np.random.default_rng(0).integers(0, 256, size=(3, *plain.spec.input_shape), dtype=np.uint8)
        expected = plain.predict(clips)
        assert np.allclose(cuda.predict(clips), expected, atol=1e-6)
        on_gpu = torch.from_numpy(clips).to("cuda:0")

        def no_host_copy(frames: object) -> np.ndarray:
            raise AssertionError("a CUDA batch went through the host")

        monkeypatch.setattr(runtime, "host_array", no_host_copy)
        monkeypatch.setattr(shm_regions, "host_array", no_host_copy)
        assert np.allclose(cuda.predict(on_gpu), expected, atol=1e-6)
        assert np.allclose(cuda.predict(on_gpu[:1]), expected[:1], atol=1e-6)
    finally:
        cuda.close()
        plain.close()
    import tritonclient.grpc as grpc

    key = shmkey.read_key(triton.grpc_port)
    status = grpc.InferenceServerClient(triton.grpc_url).get_cuda_shared_memory_status(
        headers=shmkey.headers("grpc", key), as_json=True)
    assert not [r for r in status.get("regions", {}) if str(r).startswith("sfdeploy_")]
