"""The python backend's tensor path, in process: ``TritonPythonModel.initialize`` and ``execute``
on the demo export's TorchScript, with requests and responses made by a stand-in for the stub's API.

What is held here: every tensor crosses by DLPack as a torch tensor (the stub's numpy bridge is
silently wrong under numpy 2, :mod:`sfdeploy.serving.tensors`), the clip batch never makes a numpy
round trip on the way to the predictor (on a GPU that would be a host copy of every request), one
request's clips reach the predictor without a copy, merged requests are split back to their own
rows, and a failing batch answers every request with the error. Also the server's memory options:
Triton's CUDA memory pool, sized for the largest GPU request, and passed only where GPUs are seen.

The real tritonserver with the real stub is tested in tests/test_serving.py; the GPU half of this
path (inputs in GPU memory used in place) in the GPU run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sfdeploy.device import Device
from sfdeploy.serving import server as server_module
from sfdeploy.serving.config import (
    PYTHON_SHM_MARGIN_BYTES,
    ServedModel,
    build_config,
    cuda_pool_bytes,
    parse_config,
    request_limit,
)
from sfdeploy.serving.python_backend import TritonPythonModel
from sfdeploy.serving.repo import RepoOptions, video_model, write_repository
from sfdeploy.serving.server import TritonServer
from sfdeploy.serving.tensors import from_tensor, to_tensor

CLIP_NDIM = 6  # [N, V, T, H, W, 3]: the clip batch, which must never become a numpy array


class StubTensor:
    """The stub's ``pb_utils.Tensor``, crossing by DLPack only. ``from_dlpack`` records what it was
    given and takes a torch tensor only (how sfdeploy hands tensors over); the numpy bridge
    (``Tensor(name, ndarray)``, ``as_numpy``) raises, because under numpy 2 it is silently wrong."""

    made_from: list[tuple[str, Any]] = []  # (name, what from_dlpack got), reset by the fixture

    def __init__(self, name: str, value: Any) -> None:
        if not isinstance(value, torch.Tensor):
            raise AssertionError(f"pb_utils.Tensor({name!r}, {type(value).__name__}): the stub's numpy bridge")
        self._name, self.value = name, value

    def name(self) -> str:
        return self._name

    def to_dlpack(self) -> Any:
        return torch.utils.dlpack.to_dlpack(self.value)  # a capsule, as the stub hands one over

    @classmethod
    def from_dlpack(cls, name: str, value: Any) -> StubTensor:
        cls.made_from.append((name, value))
        if not isinstance(value, torch.Tensor):
            raise AssertionError(f"from_dlpack got a {type(value).__name__}, not a torch tensor")
        return cls(name, torch.from_dlpack(value))

    def as_numpy(self) -> np.ndarray:
        raise AssertionError("as_numpy(): the stub's numpy bridge, silently wrong under numpy 2")

    def is_cpu(self) -> bool:
        return self.value.device.type == "cpu"


class StubRequest:
    """An inference request of the stub: its input tensors by name."""

    def __init__(self, *tensors: StubTensor) -> None:
        self.inputs = {tensor.name(): tensor for tensor in tensors}


class StubError:
    """``pb_utils.TritonError``."""

    def __init__(self, message: str) -> None:
        self._message = message

    def message(self) -> str:
        return self._message


class StubResponse:
    """``pb_utils.InferenceResponse``."""

    def __init__(self, output_tensors: list[StubTensor], error: StubError | None = None) -> None:
        self._outputs, self._error = output_tensors, error

    def output_tensors(self) -> list[StubTensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> StubError | None:
        return self._error


@pytest.fixture
def pb_utils(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A stand-in for ``triton_python_backend_utils`` in ``sys.modules``: the stub's API only (what
    sfdeploy's backends call), not its behaviour; the real one runs in tests/test_serving.py."""
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = StubTensor
    module.InferenceResponse = StubResponse
    module.TritonError = StubError
    module.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    module.get_output_tensor_by_name = lambda response, name: next(
        (t for t in response.output_tensors() if t.name() == name), None)
    module.logged = []
    module.Logger = types.SimpleNamespace(**{level: module.logged.append for level in
                                             ("log_info", "log_warn", "log_error", "log_verbose")})
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    monkeypatch.setattr(StubTensor, "made_from", [])
    return module


@pytest.fixture(scope="module")
def served(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<repo>/slowfast``: the python-backend model of the demo export, TorchScript fp32 on the CPU."""
    repo = tmp_path_factory.mktemp("tensor_path") / "model_repository"
    write_repository(tiny_export, RepoOptions(repo=repo, device=Device("cpu"), runtime="torchscript",
                                              precision="fp32", native=False, video=False))
    return repo / "slowfast"


def instance_args(model_dir: Path, gpu_inputs: bool = False) -> dict[str, str]:
    """The ``args`` Triton gives ``initialize``: the model config as Triton's JSON (proto field
    names), with ``FORCE_CPU_ONLY_INPUT_TENSORS: "no"`` added when ``gpu_inputs``."""
    from google.protobuf.json_format import MessageToJson

    config = parse_config((model_dir / "config.pbtxt").read_text())
    if gpu_inputs:
        config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value = "no"
    return {"model_config": MessageToJson(config, preserving_proto_field_name=True),
            "model_repository": str(model_dir), "model_version": "1", "model_name": model_dir.name,
            "model_instance_name": f"{model_dir.name}_0", "model_instance_kind": "CPU",
            "model_instance_device_id": "0"}


@pytest.fixture
def model(served: Path, pb_utils: types.ModuleType) -> TritonPythonModel:
    """An initialized instance; its predictor's calls recorded in ``model.received``."""
    instance = TritonPythonModel()
    instance.initialize(instance_args(served))
    predict, instance.received = instance.predictor.predict, []

    def recorded(frames: Any) -> np.ndarray:
        instance.received.append(frames)
        return predict(frames)

    instance.predictor.predict = recorded
    yield instance
    instance.finalize()


def clips(model: TritonPythonModel, n: int, seed: int) -> np.ndarray:
    """``n`` random uint8 clips of the model's spec."""
    shape = (n, *model.predictor.spec.input_shape)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def request(model: TritonPythonModel, batch: np.ndarray) -> StubRequest:
    """A request carrying ``batch`` as the stub holds an input: a tensor (made here, not in execute)."""
    return StubRequest(StubTensor(model.input_name, torch.from_numpy(batch)))


@pytest.fixture
def no_numpy_clips(monkeypatch: pytest.MonkeyPatch):
    """While active, a clip batch (a 6-dim tensor) made into a numpy array raises: ``.numpy()``,
    ``np.asarray`` (``__array__``), ``np.from_dlpack``. Call it to turn it on."""

    def guard() -> None:
        def refuse(original: Any) -> Any:
            def call(value: Any, *args: Any, **kwargs: Any) -> Any:
                if getattr(value, "ndim", 0) == CLIP_NDIM:
                    raise AssertionError("the clip batch made a numpy round trip")
                return original(value, *args, **kwargs)

            return call

        monkeypatch.setattr(torch.Tensor, "numpy", refuse(torch.Tensor.numpy))
        monkeypatch.setattr(torch.Tensor, "__array__", refuse(torch.Tensor.__array__))
        monkeypatch.setattr(np, "from_dlpack", refuse(np.from_dlpack))

    return guard


def probabilities(response: StubResponse, name: str) -> np.ndarray:
    """The probabilities of a response, checked to be a torch tensor handed over by DLPack."""
    assert not response.has_error(), response.error().message()
    (output,) = response.output_tensors()
    assert output.name() == name and isinstance(output.value, torch.Tensor)
    return output.value.numpy()


def test_one_request_reaches_the_predictor_as_a_torch_tensor_with_no_copy_and_no_numpy(
        model: TritonPythonModel, pb_utils: types.ModuleType, no_numpy_clips) -> None:
    batch = clips(model, 2, seed=0)
    expected = model.predictor.predict(batch)  # the same clips, as numpy, straight to the predictor
    req = request(model, batch)
    no_numpy_clips()
    (response,) = model.execute([req])
    assert np.array_equal(probabilities(response, model.output_name), expected)  # (a round trip: its error)
    frames = model.received[-1]
    assert isinstance(frames, torch.Tensor) and frames.ndim == CLIP_NDIM
    assert frames.data_ptr() == req.inputs[model.input_name].value.data_ptr()  # the request's memory itself
    assert [(name, type(value)) for name, value in StubTensor.made_from] == [(model.output_name, torch.Tensor)]
    assert any("inputs arrive in host memory" in line for line in pb_utils.logged)


def test_merged_requests_are_one_batch_split_back_to_their_own_rows(model: TritonPythonModel,
                                                                    no_numpy_clips) -> None:
    batches = [clips(model, 1, seed=1), clips(model, 3, seed=2), clips(model, 2, seed=3)]
    expected = model.predictor.predict(np.concatenate(batches))
    requests = [request(model, b) for b in batches]
    no_numpy_clips()
    responses = model.execute(requests)
    got = [probabilities(r, model.output_name) for r in responses]
    assert len(model.received) == 2 and isinstance(model.received[-1], torch.Tensor)  # one call for all three
    assert model.received[-1].shape[0] == 6
    assert [len(p) for p in got] == [1, 3, 2]
    assert np.array_equal(np.concatenate(got), expected)
    assert all(isinstance(value, torch.Tensor) for _, value in StubTensor.made_from)


def test_a_failing_batch_answers_every_request_with_the_error_and_the_instance_serves_on(
        model: TritonPythonModel) -> None:
    def fail(frames: Any) -> np.ndarray:
        raise RuntimeError("CUDA out of memory")

    working, model.predictor.predict = model.predictor.predict, fail
    responses = model.execute([request(model, clips(model, 1, seed=4)), request(model, clips(model, 2, seed=5))])
    assert [r.error().message() for r in responses] == ["RuntimeError: CUDA out of memory"] * 2
    assert all(r.output_tensors() == [] for r in responses)
    model.predictor.predict = working
    (response,) = model.execute([request(model, clips(model, 1, seed=6))])
    assert probabilities(response, model.output_name).shape == (1, model.predictor.spec.num_classes)


def test_initialize_says_when_inputs_may_arrive_in_gpu_memory(served: Path, pb_utils: types.ModuleType) -> None:
    instance = TritonPythonModel()
    instance.initialize(instance_args(served, gpu_inputs=True))
    instance.finalize()
    assert any("may arrive in GPU memory" in line for line in pb_utils.logged), pb_utils.logged


def test_to_tensor_and_from_tensor_hand_memory_over_without_copies(pb_utils: types.ModuleType) -> None:
    held = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4)
    assert to_tensor(StubTensor("x", held)).data_ptr() == held.data_ptr()
    assert from_tensor("y", held).value.data_ptr() == held.data_ptr()
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert from_tensor("z", array).value.data_ptr() == array.ctypes.data  # numpy: wrapped, not copied
    array.flags.writeable = False  # torch wraps writable memory only: a copy, with the same values
    assert np.array_equal(from_tensor("z", array).value.numpy(), array)
    strided = from_tensor("t", held.transpose(0, 2))  # the stub takes C-order tensors only
    assert strided.value.is_contiguous() and torch.equal(strided.value, held.transpose(0, 2))
    assert all(isinstance(value, torch.Tensor) for _, value in StubTensor.made_from)


def gpu_config(spec: Any, instances: int) -> Any:
    """A python-backend config with ``instances`` KIND_GPU instances per GPU (no GPU needed to write it)."""
    return build_config(ServedModel(name="m", backend="python", spec=spec, kind="gpu", instances=instances,
                                    max_batch=4))


def test_cuda_pool_holds_the_largest_request_of_each_gpu_instance(tiny_export: Path) -> None:
    from sfdeploy.artifacts import Manifest

    spec = Manifest.read(tiny_export).clip_spec
    gpu = gpu_config(spec, instances=2)
    clip_bytes = 4 * int(np.prod(spec.input_shape))  # max_batch 4, uint8
    assert request_limit(gpu) > clip_bytes
    assert cuda_pool_bytes([gpu]) == 2 * request_limit(gpu) + PYTHON_SHM_MARGIN_BYTES
    cpu = build_config(ServedModel(name="c", backend="python", spec=spec, max_batch=4))
    assert cuda_pool_bytes([cpu]) == 0  # its inputs always reach it in host memory
    assert cuda_pool_bytes([cpu, gpu]) == cuda_pool_bytes([gpu])
    # <name>_video on the GPU: the clips of one BLS request per instance (its BYTES uploads never cross there)
    video = build_config(video_model(spec, RepoOptions(repo=Path("r"), max_batch=4, decode_instances=3), "gpu"))
    assert cuda_pool_bytes([video]) == 3 * clip_bytes + PYTHON_SHM_MARGIN_BYTES
    assert cuda_pool_bytes([video, gpu]) == 3 * clip_bytes + 2 * request_limit(gpu) + PYTHON_SHM_MARGIN_BYTES


def test_the_pool_option_is_passed_for_each_visible_gpu_and_never_without_one(
        tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sfdeploy.artifacts import Manifest

    gpu = gpu_config(Manifest.read(tiny_export).clip_spec, instances=1)
    server = TritonServer(tmp_path)
    server._configs = {"m": gpu}
    pool = cuda_pool_bytes([gpu])
    seen = server_module.visible_gpus()
    assert [o for o in server._memory_options(["m"]) if o.startswith("--cuda-memory-pool-byte-size")] == [
        f"--cuda-memory-pool-byte-size={i}:{pool}" for i in range(seen)]
    monkeypatch.setattr(server_module, "visible_gpus", lambda: 2)
    assert server._memory_options(["m"])[2:] == [f"--cuda-memory-pool-byte-size=0:{pool}",
                                                 f"--cuda-memory-pool-byte-size=1:{pool}"]
    monkeypatch.setattr(server_module, "visible_gpus", lambda: 0)
    assert not any("cuda-memory-pool" in o for o in server._memory_options(["m"]))


def test_the_server_command_line_has_no_pool_option_without_a_gpu(
        tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real command line ``start`` builds, for a KIND_GPU repository on this machine."""
    if server_module.visible_gpus():
        pytest.skip("torch sees a GPU here: the option is passed (the test above checks its form)")
    repo = tmp_path / "model_repository"
    write_repository(tiny_export, RepoOptions(repo=repo, device=Device("cuda"), runtime="torchscript",
                                              precision="fp32", native=False, video=False))
    commands: list[list[str]] = []

    class Launched(Exception):
        pass

    def launch(command: list[str], **kwargs: Any) -> None:
        commands.append(command)
        raise Launched

    monkeypatch.setattr(server_module, "subprocess", types.SimpleNamespace(
        Popen=launch, STDOUT=subprocess.STDOUT, TimeoutExpired=subprocess.TimeoutExpired))
    server = TritonServer(repo, http_port=_free(), grpc_port=_free(), metrics_port=_free())
    try:
        with pytest.raises(Launched):
            server.start()
    finally:
        server.stop()
    (command,) = commands
    assert any("shm-default-byte-size" in part for part in command)
    assert not any("cuda-memory-pool" in part for part in command), json.dumps(command)


def _free() -> int:
    from sfdeploy.serving.ports import free_port

    return free_port()
