"""Triton model configs as data -> ``ModelConfig`` protobuf -> ``config.pbtxt`` text.

A :class:`ServedModel` says what one model of the repository is (backend, tensors, batching,
instances, parameters); :func:`build_config` turns it into Triton's own ``ModelConfig`` message
(from ``tritonclient``), so a misspelt field or enum cannot be written, and :func:`parse_config`
reads text back through the same message (tests do, for every generated file). A model's tensors
default to the deployed model's (uint8 clips in, probabilities out); ``<name>_video`` lists its own
(:class:`TensorConfig`: encoded videos in, probabilities, labels and per-item errors out).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sfdeploy.artifacts import INPUT_NAME, OUTPUT_NAME
from sfdeploy.clipspec import SPEC_KEY, ClipSpec
from sfdeploy.device import Device

BACKENDS = ("python", "onnxruntime", "pytorch")
LABELS_FILE = "labels.txt"  # beside config.pbtxt: class names, one per line, for the probabilities

# parameters of <name>, the python-backend model (sfdeploy/serving/repo.py writes them,
# sfdeploy/serving/python_backend.py reads them)
RUNTIME = "runtime"  # the in-process backend that runs the artifact: torchscript | onnxruntime
ARTIFACT = "artifact"  # the artifact's file name, in the version folder
ARTIFACT_SHA256 = "artifact_sha256"  # its hash: an instance refuses a file that is not the one placed
PRECISION = "precision"  # the artifact's precision (for whoever reads the config)
CHOSEN_BECAUSE = "chosen_because"  # why this runtime and precision (sfdeploy.serving.choice)

# parameters of <name>_video (server-side decoding; sfdeploy/serving/video_backend.py reads them)
TARGET_MODEL = "target_model"  # the model its decoded clips go to
MAX_VIDEO_BYTES = "max_video_bytes"  # larger payloads are refused before decoding
MAX_VIDEO_PIXELS_KEY = "max_video_pixels"  # videos with larger frames are refused before decoding
DECODE_TIMEOUT_S = "decode_timeout_s"  # a decode that takes longer fails (its worker is replaced)
VIDEO_DECODE = "decode"  # where it decodes: auto | cpu | gpu (sfdeploy.decode.gpu.select.SERVER_DECODE_MODES)

#: Triton's python-backend parameter: "no" lets a KIND_GPU instance receive its inputs in GPU memory
#: (a BLS request's GPU clips, a client's CUDA shared memory) instead of copied to the host first
FORCE_CPU_ONLY_INPUTS = "FORCE_CPU_ONLY_INPUT_TENSORS"


@dataclass(frozen=True)
class TensorConfig:
    """One input or output of a served model, as Triton's config declares it (batch axis left out:
    ``max_batch_size`` adds it)."""

    name: str
    data_type: str  # a ModelConfig DataType name: TYPE_UINT8, TYPE_FP32, TYPE_STRING, ...
    dims: tuple[int, ...]
    label_filename: str | None = None  # Triton's classification extension reads the labels here


@dataclass(frozen=True)
class ServedModel:
    """One model of the repository as data: what :func:`build_config` turns into a ``ModelConfig``.
    Every field has the default ``sfdeploy repo`` writes, so a caller names only what differs."""

    name: str
    backend: str  # one of BACKENDS
    spec: ClipSpec
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    max_batch: int = 32
    preferred_batches: tuple[int, ...] = (8, 16, 32)
    queue_delay_us: int = 5000
    instances: int = 1
    kind: str = "cpu"  # "cpu" or "gpu"
    parameters: dict[str, str] = field(default_factory=dict)
    tensorrt_fp16: bool = False  # onnxruntime backend: TensorRT execution accelerator
    warmup: bool = True
    default_model_filename: str | None = None
    dynamic_batching: bool = True  # False: Triton's default scheduler, one request per execution
    queue_timeout_us: int = 0  # a request queued longer is refused (UNAVAILABLE); 0: it waits as long as it takes
    max_queue: int = 0  # requests queued beyond this are refused at once (UNAVAILABLE); 0: no limit
    inputs: tuple[TensorConfig, ...] = ()  # default: the deployed model's clips (input_name)
    outputs: tuple[TensorConfig, ...] = ()  # default: its probabilities (output_name)

    def tensors(self) -> tuple[tuple[TensorConfig, ...], tuple[TensorConfig, ...]]:
        """(inputs, outputs) of the model."""
        inputs = self.inputs or (TensorConfig(self.input_name, "TYPE_UINT8", self.spec.input_shape),)
        outputs = self.outputs or (probs_tensor(self.spec, self.output_name),)
        return inputs, outputs


def probs_tensor(spec: ClipSpec, name: str = OUTPUT_NAME) -> TensorConfig:
    """The probabilities output, labelled by :data:`LABELS_FILE` (Triton's classification extension)."""
    return TensorConfig(name, "TYPE_FP32", (spec.num_classes,), LABELS_FILE)


def build_config(model: ServedModel) -> Any:
    """The ``ModelConfig`` message for ``model``."""
    from tritonclient.grpc import model_config_pb2 as pb

    if model.backend not in BACKENDS:
        raise ValueError(f"backend {model.backend!r} not in {BACKENDS}")
    spec = model.spec
    config = pb.ModelConfig(name=model.name, backend=model.backend, max_batch_size=model.max_batch)
    inputs, outputs = model.tensors()
    for tensor in inputs:
        config.input.append(pb.ModelInput(name=tensor.name, data_type=pb.DataType.Value(tensor.data_type),
                                          dims=list(tensor.dims)))
    for tensor in outputs:
        config.output.append(pb.ModelOutput(name=tensor.name, data_type=pb.DataType.Value(tensor.data_type),
                                            dims=list(tensor.dims), label_filename=tensor.label_filename or ""))
    if model.dynamic_batching:
        preferred = sorted(b for b in set(model.preferred_batches) if 1 <= b <= model.max_batch)
        config.dynamic_batching.CopyFrom(pb.ModelDynamicBatching(
            preferred_batch_size=preferred, max_queue_delay_microseconds=model.queue_delay_us))
        if model.queue_timeout_us or model.max_queue:  # a bounded wait, refused with Triton's own reason
            config.dynamic_batching.default_queue_policy.CopyFrom(pb.ModelQueuePolicy(
                timeout_action=pb.ModelQueuePolicy.REJECT, default_timeout_microseconds=model.queue_timeout_us,
                max_queue_size=model.max_queue))
    config.instance_group.append(pb.ModelInstanceGroup(
        count=model.instances, kind=getattr(pb.ModelInstanceGroup, Device.of_instance_kind(model.kind).triton_kind)))
    parameters = {SPEC_KEY: spec.to_json(), **model.parameters}
    for key, value in sorted(parameters.items()):
        config.parameters[key].string_value = value
    if model.default_model_filename:
        config.default_model_filename = model.default_model_filename
    if model.tensorrt_fp16:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters["precision_mode"] = "FP16"
        accelerator.parameters["max_workspace_size_bytes"] = str(1 << 30)
    if model.warmup:  # a zero batch at load time, so the first real request is not the slow one
        warm = config.model_warmup.add(name="zeros", batch_size=1, count=1)
        for tensor in inputs:
            warm.inputs[tensor.name].CopyFrom(pb.ModelWarmup.Input(
                data_type=pb.DataType.Value(tensor.data_type), dims=list(tensor.dims), zero_data=True))
    return config


HEADER = "# Generated by `sfdeploy repo` from an export's manifest.json: regenerate it rather than edit it.\n"


def config_text(model: ServedModel) -> str:
    """The ``config.pbtxt`` text of ``model``, with a header that says it is generated (regenerate
    it, do not edit it)."""
    from google.protobuf import text_format

    return HEADER + text_format.MessageToString(build_config(model))


def parse_config(text: str) -> Any:
    """Parse ``config.pbtxt`` text into a ``ModelConfig`` (raises on unknown fields or enums)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    return text_format.Parse(text, pb.ModelConfig())


def instance_device(args: Mapping[str, str]) -> str:
    """Where a python-backend model instance runs, from the arguments Triton gives ``initialize``:
    ``cuda:N`` for a ``KIND_GPU`` instance, else ``cpu``."""
    return f"cuda:{args['model_instance_device_id']}" if args["model_instance_kind"] == "GPU" else "cpu"


def string_parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """A model config's ``parameters`` (the JSON form Triton gives ``initialize``) as plain strings."""
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


#: Bytes per element of the fixed-size types; a request of any other type is held to VARIABLE_LIMIT.
_ITEM_BYTES = {"TYPE_BOOL": 1, "TYPE_UINT8": 1, "TYPE_INT8": 1, "TYPE_UINT16": 2, "TYPE_INT16": 2, "TYPE_FP16": 2,
               "TYPE_BF16": 2, "TYPE_UINT32": 4, "TYPE_INT32": 4, "TYPE_FP32": 4, "TYPE_UINT64": 8, "TYPE_INT64": 8,
               "TYPE_FP64": 8}
VARIABLE_LIMIT = 64 << 20
REQUEST_HEADROOM = 1 << 20  # a request's JSON header, tensor names and shapes, BYTES length prefixes


def request_limit(config: Any) -> int:
    """The largest request (HTTP body, gRPC message) a served model accepts, in bytes: its inputs
    at ``max_batch_size`` (a clip model: the largest clip batch), or for a video model its
    ``max_video_bytes`` of encoded videos in all; plus :data:`REQUEST_HEADROOM`. The server
    refuses larger requests before reading them (:mod:`sfdeploy.serving.guard`)."""
    from tritonclient.grpc import model_config_pb2 as pb

    if MAX_VIDEO_BYTES in config.parameters:
        return int(config.parameters[MAX_VIDEO_BYTES].string_value) + REQUEST_HEADROOM
    batch = max(1, config.max_batch_size)
    payload = 0
    for tensor in config.input:
        item = _ITEM_BYTES.get(pb.DataType.Name(tensor.data_type))
        if item is None or any(d < 0 for d in tensor.dims):  # variable size: no bound in the config
            return VARIABLE_LIMIT
        payload += batch * math.prod(tensor.dims) * item
    return payload + REQUEST_HEADROOM
#: shared memory the python backend gives each model instance beyond its largest request (outputs),
#: and how much it grows at a time when that is not enough
PYTHON_SHM_MARGIN_BYTES = 64 << 20
PYTHON_SHM_GROWTH_BYTES = 64 << 20


def python_shm_sizes(configs: list[Any]) -> tuple[int, int]:
    """(shm-default-byte-size, shm-growth-byte-size) for the python backend serving ``configs``.

    Each python-backend instance moves tensors through a shared-memory region that starts at 1 MB
    and grows 1 MB at a time by default: a 154 MB batch of R50 clips made it grow ~150 times per
    request, which is most of why the served model ran at 10% of in-process speed on an H200. The
    region starts large enough for the largest request any served model accepts
    (:func:`request_limit`, plus a margin for the outputs), and grows in large steps beyond it
    (tmpfs pages are only backed once touched)."""
    largest = max([request_limit(c) for c in configs if c.backend == "python"] or [0])
    return largest + PYTHON_SHM_MARGIN_BYTES, PYTHON_SHM_GROWTH_BYTES


def cuda_pool_bytes(configs: list[Any]) -> int:
    """Triton's CUDA memory pool for each GPU (``--cuda-memory-pool-byte-size``) serving ``configs``,
    or 0 when no python-backend model has a ``KIND_GPU`` instance (Triton's default then).

    The python backend moves GPU tensors between the server and its stubs (the inputs a
    ``KIND_GPU`` instance receives in GPU memory, see :mod:`sfdeploy.serving.python_backend`, and
    the GPU clips a ``<name>_video`` instance sends on in its BLS requests) through that pool, which
    is 64 MB per GPU by default: smaller than one 154 MB batch of R50 clips (see
    :func:`python_shm_sizes`). The pool is shared by every instance on the GPU, so it holds what
    each GPU instance may have in flight at once (Triton's ``count`` is per GPU): a clip model's
    largest request (:func:`request_limit`), a video model's largest BLS request (``max_batch``
    clips; its encoded videos are BYTES, which never cross in GPU memory); plus
    :data:`PYTHON_SHM_MARGIN_BYTES` (64 MB: never less than Triton's default)."""
    from tritonclient.grpc import model_config_pb2 as pb

    def in_flight(config: Any) -> int:
        if MAX_VIDEO_BYTES in config.parameters:  # <name>_video: the clips of one BLS request
            spec = ClipSpec.from_json(config.parameters[SPEC_KEY].string_value)
            return max(1, config.max_batch_size) * math.prod(spec.input_shape)
        return request_limit(config)

    held = sum(max(1, group.count) * in_flight(config) for config in configs if config.backend == "python"
               for group in config.instance_group if group.kind == pb.ModelInstanceGroup.KIND_GPU)
    return held + PYTHON_SHM_MARGIN_BYTES if held else 0
