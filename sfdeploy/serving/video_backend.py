"""The Triton python-backend model ``<name>_video``: the bytes of encoded videos in, labels out.

Each request item is one encoded video file (input ``video``, BYTES): any container and codec the
decoder reads. The instance decodes it with sfdeploy's own decode pool, :class:`DecodePool`
(the code ``sfdeploy infer`` runs on the client), for the clip spec in the config's parameters,
then sends the views to ``<name>`` (parameter ``target_model``) in one BLS request. ``<name>``'s
dynamic batcher merges the clips of the video requests of every ``_video`` instance into one
model call, on ``<name>``'s own instance (its GPU where it has one).

Where it decodes (``sfdeploy repo --decode auto|cpu|gpu``, the ``decode`` parameter; the
instance's plan is :func:`server_plan`, the client's rules of :mod:`sfdeploy.decode.gpu.select`
with the instance's GPU in place of the client's). On a ``KIND_GPU`` instance with a GPU decoder
on the server, NVDEC decodes the streams it can (``auto``: the codecs that passed the export's
fidelity gate, ``decode_fidelity.json`` beside model.py; ``gpu``: without a gate), then resizes and
crops on the GPU (:mod:`sfdeploy.decode.gpu.route`); the clips go to ``<name>`` as GPU tensors by
DLPack (``<name>``'s ``FORCE_CPU_ONLY_INPUT_TENSORS: no`` takes them there: no host copy). A
stream NVDEC cannot take (codec, size, pixel format), or fails on, is decoded on the CPU, with its
reason; every stream is probed first in a CPU worker, so the pixel and byte limits, and the queue
bound, are the CPU path's. A request may ask for the CPU decoder (request parameter
``decode=cpu``; ``gpu`` where this instance has none is refused). Outputs ``decoder`` and
``decoder_reason`` say, per video, which decoder read it and why (``infer``'s row columns).
Why BLS to ``<name>`` rather than the model in this instance: ``<name>``'s batcher merges the
clips of every ``_video`` instance (and of clip clients) into one model call per batch, and the
GPU holds one copy of the model; whether running it here would pay is the GPU run's to measure
(``benchmarks/gpu_check.sh``).

``<name>_video`` hands each request to the next free instance alone, so the instances (``sfdeploy
repo --decode-instances``, default the CPU count; GPU instances: a few per GPU, each with NVDEC
threads and its share of the CPUs to probe) decode that many videos at once: its dynamic
batcher prefers batches of one request and never waits (a batcher free to merge would give a whole
queue of requests to one instance, to decode one after the other while the others wait). The
batcher is there for its queue policy: requests are served first come, first served (a soak at
concurrency 64 and 128 on 2 cores: no request overtaken by more than 22 later ones), and one
that waits longer than ``--decode-queue-timeout`` for an instance, or arrives when
``--decode-max-queue`` are waiting, is refused (``UNAVAILABLE``: HTTP 503, retry later) rather
than left to wait without bound, each waiting request holding its upload in the server's memory.

Decoding runs in a child process of the instance (:class:`DecodePool` workers, started at load
time and kept between requests): a decoder that crashes or hangs on a payload costs that item
(its error says so) and its worker (replaced); the instance and the server go on.

What a client gets back:

* a request of one video that cannot be classified (empty, truncated, corrupt, not a video, over
  ``max_video_bytes``, or with frames of more than ``max_video_pixels``: both refused before
  decoding) fails with the cause and the fix (``INVALID_ARG``: HTTP 400, gRPC ``INVALID_ARGUMENT``);
* in a request of several videos every item has its own answer: ``error`` says why an item failed
  (``""`` for an item that was classified), a failed item's ``probs`` are zeros and its ``label``
  is ``""``; the other items are classified;
* a failure on the server's side (``<name>`` not loaded or failing, a decoder that cannot start)
  fails the whole request (``UNAVAILABLE``: HTTP 503).

Tensors cross the stub boundary through :mod:`sfdeploy.serving.tensors`: the clips and
probabilities by DLPack; the BYTES tensors (``video``, ``label``, ``error``, ``decoder``,
``decoder_reason``) have no DLPack form and need the stub's numpy bridge, which a stub built
against numpy 1 (nvidia-pytriton 0.7.0's) gets silently wrong under numpy 2: there the model
refuses to load, with the reason and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sfdeploy.artifacts import (
    DECODE_PARAMETER,
    DECODE_REFUSED,
    DECODER_OUTPUT,
    DECODER_REASON_OUTPUT,
    ERROR_OUTPUT,
    INPUT_NAME,
    LABEL_OUTPUT,
    OUTPUT_NAME,
    VIDEO_INPUT,
)
from sfdeploy.batching import stack_clips
from sfdeploy.clipspec import SPEC_KEY, ClipSpec
from sfdeploy.decode import MAX_VIDEO_PIXELS
from sfdeploy.decode.clips import DecodedBy, DecodeFailure
from sfdeploy.decode.gpu.select import SERVER_DECODE_MODES, DecodePlan, Gate
from sfdeploy.decode.pool import DecodePool
from sfdeploy.device import is_cuda
from sfdeploy.errors import EnvironmentProblem, InputError
from sfdeploy.serving.config import (
    DECODE_TIMEOUT_S,
    MAX_VIDEO_BYTES,
    MAX_VIDEO_PIXELS_KEY,
    TARGET_MODEL,
    VIDEO_DECODE,
    instance_device,
    string_parameters,
)
from sfdeploy.serving.tensors import bytes_items, bytes_tensor, from_tensor, require_numpy_bridge, to_array

#: what a video gets: its probabilities, or why it has none; and which decoder read it, and why
Answer = tuple[np.ndarray | str, DecodedBy]
#: the reason in the rows of a request that asked for the CPU decoder
ASKED_CPU = "the request asked for the CPU decoder (parameter decode=cpu)"


class ServerSideFailure(Exception):
    """Not the video's fault: the whole request fails, and the client should not blame its input."""


class RequestRefused(Exception):
    """The request asks for what this model cannot do (e.g. GPU decoding on a CPU instance): it
    fails with the reason (``INVALID_ARG``), the others go on."""


def too_large(size: int, limit: int) -> str:
    return (f"the video is {size / 2**20:.1f} MB, over this model's limit of {limit / 2**20:g} MB, and was not "
            "decoded; send a smaller file (re-encode it, e.g. `ffmpeg -i IN -vf scale=-2:360 OUT.mp4`), or "
            "write the repository with a larger `sfdeploy repo --max-video-mb`")


def server_plan(mode: str, device: str, gates: Mapping[str, Gate]) -> DecodePlan:
    """Where an instance on ``device`` decodes, for the repository's ``decode`` parameter ``mode``
    (:data:`~sfdeploy.decode.gpu.select.SERVER_DECODE_MODES`) and the export's fidelity ``gates``:
    the client's rules (:func:`~sfdeploy.decode.gpu.select.plan_decoding`), the instance's GPU in
    place of the client's. ``gpu`` on a CPU instance, or with no GPU decoder here, raises: the model
    does not load, and the log says why and the fix."""
    from sfdeploy.decode.gpu.select import plan_decoding, probe_backends

    if mode not in SERVER_DECODE_MODES:
        raise InputError(f"unknown decode parameter {mode!r}", fix=f"regenerate the repository with `sfdeploy repo "
                                                                   f"--decode {'|'.join(SERVER_DECODE_MODES)}`")
    if mode == "cpu":
        return DecodePlan(mode, None, device, "the repository decodes on the CPU (sfdeploy repo --decode cpu)")
    if not is_cuda(device):
        if mode == "gpu":
            raise EnvironmentProblem("decode=gpu, but this instance runs on the CPU (KIND_CPU)",
                                     fix="regenerate the repository for GPU instances: `sfdeploy repo --device cuda`")
        return DecodePlan(mode, None, device, "this instance runs on the CPU (KIND_CPU)")
    return plan_decoding(mode, device=device, statuses=probe_backends(), gates=gates)


def request_decode(parameters: str | None, plan: DecodePlan) -> str | None:
    """What one request's ``decode`` parameter (``parameters``: the request's parameters as JSON)
    asks of an instance decoding by ``plan``: ``None`` (the plan: ``auto``, or ``gpu`` where the
    plan decodes on the GPU), or the reason to decode it on the CPU. Raises :class:`RequestRefused`
    for ``gpu`` where the plan has no GPU decoder, or an unknown value."""
    asked = json.loads(parameters or "{}").get(DECODE_PARAMETER, "auto")
    if asked not in SERVER_DECODE_MODES:
        raise RequestRefused(f"{DECODE_REFUSED} unknown decode parameter {asked!r}: send one of "
                             f"{', '.join(SERVER_DECODE_MODES)}")
    if asked == "cpu":
        return ASKED_CPU
    if asked == "gpu" and plan.backend is None:
        raise RequestRefused(f"{DECODE_REFUSED} the request asked for GPU decoding, but this server decodes on the "
                             f"CPU ({plan.why}); send it without decode=gpu (`infer --server-decode --decode auto`)")
    return None


class TritonPythonModel:
    """Triton's python-backend model ``<name>_video`` (see the module docstring)."""

    def initialize(self, args: dict[str, str]) -> None:
        """Read the config, refuse to load where BYTES tensors would be wrong, and start the decoder
        (the instance's plan: the GPU's NVDEC, or the CPU)."""
        config = json.loads(args["model_config"])
        params = string_parameters(config)
        self.spec = ClipSpec.from_json(params[SPEC_KEY])
        self.target = params[TARGET_MODEL]
        require_numpy_bridge(  # before any work: a model that cannot answer right does not load
            args["model_name"], needs=f"its '{VIDEO_INPUT}' input and '{LABEL_OUTPUT}'/'{ERROR_OUTPUT}' outputs are "
            "BYTES tensors", otherwise=f"serve without it: `sfdeploy serve --models {self.target}` or `sfdeploy "
            f"repo --no-video` (the '{self.target}' model works under numpy 2)")
        self.max_bytes = int(params[MAX_VIDEO_BYTES])
        # `sfdeploy repo` gives <name>_video the max_batch_size of <name>: a request's clips fit one call
        self.max_batch = max(1, int(config.get("max_batch_size", 1)))
        self.outputs = {output["name"] for output in config["output"]}  # an older repository lacks the decoder's
        self.plan = self._plan(args, params)
        self.decoder = DecodePool(self.spec, plan=self.plan, workers=self._workers(config),
                                  timeout_s=float(params[DECODE_TIMEOUT_S]),
                                  max_pixels=int(params.get(MAX_VIDEO_PIXELS_KEY, MAX_VIDEO_PIXELS)))
        self.decoder.warm()  # a decoder that cannot start fails the load, with its reason
        import triton_python_backend_utils as pb_utils

        where = f"NVDEC ({self.plan.backend}) on {self.plan.device}, else the CPU" if self.plan.backend else "the CPU"
        pb_utils.Logger.log_info(f"sfdeploy: {args['model_name']} instance {args['model_instance_name']} decodes on "
                                 f"{where}: {self.plan.why}")

    @staticmethod
    def _plan(args: dict[str, str], params: dict[str, str]) -> DecodePlan:
        """The instance's decode plan; the gate is the export's record the repository placed beside model.py."""
        from sfdeploy.decode.gpu.gate import read_gates

        device = instance_device(args)
        version = Path(args["model_repository"]) / args["model_version"]
        mode = params.get(VIDEO_DECODE, "cpu")  # an older repository: the CPU, as it did
        return server_plan(mode, device, read_gates(version) if is_cuda(device) and mode != "cpu" else {})

    def _workers(self, config: dict[str, Any]) -> int:
        """Decode worker processes: one per CPU instance (the instances are the parallelism); on a
        GPU, where NVDEC decodes and the workers only probe and fall back, the server's CPUs shared
        among the GPU's instances."""
        if self.plan.backend is None:
            return 1
        per_gpu = max(1, sum(int(group.get("count", 1)) for group in config.get("instance_group", [])))
        return max(1, (os.cpu_count() or 1) // per_gpu)

    def classify(self, videos: list[bytes], run_model: Callable[[Any], np.ndarray],
                 cpu_because: str | None = None) -> list[Answer]:
        """Probabilities, or why not, and the decoder, for each video; ``run_model(views) -> probs``
        runs a batch (numpy, or a torch tensor on the GPU where NVDEC decoded a clip).
        ``cpu_because``: decode on the CPU, for that reason."""
        results: list[Answer | None] = [None] * len(videos)
        todo = []
        for i, video in enumerate(videos):
            if len(video) > self.max_bytes:
                results[i] = (too_large(len(video), self.max_bytes), DecodedBy("", "not decoded"))
            else:
                todo.append(i)
        decoded: dict[int, tuple[Any, DecodedBy]] = {}
        try:
            for k, views, how in self.decoder.decode([videos[i] for i in todo], cpu_because=cpu_because):
                if isinstance(views, DecodeFailure):
                    results[todo[k]] = (views.error, how)
                else:
                    decoded[todo[k]] = (views, how)
        except EnvironmentProblem as exc:  # the decoder's interpreter cannot start: not the video's fault
            raise ServerSideFailure(f"the decoder cannot start ({exc.message}); fix: {exc.fix}") from exc
        order = sorted(decoded)
        for start in range(0, len(order), self.max_batch):
            chunk = order[start:start + self.max_batch]
            probs = run_model(stack_clips([decoded[i][0] for i in chunk]))
            for i, row in zip(chunk, probs, strict=True):
                results[i] = (row, decoded[i][1])
        return results  # type: ignore[return-value]

    def _run_model(self, views: Any) -> np.ndarray:
        """One BLS request to the model: ``[N, V, T, H, W, 3]`` uint8 (host memory, or the GPU's by
        DLPack: the model's KIND_GPU instance takes it there) -> ``[N, classes]``."""
        import triton_python_backend_utils as pb_utils

        request = pb_utils.InferenceRequest(model_name=self.target, requested_output_names=[OUTPUT_NAME],
                                            inputs=[from_tensor(INPUT_NAME, views)])
        response = request.exec()
        if response.has_error():
            raise ServerSideFailure(f"the model '{self.target}' that classifies the decoded clips failed: "
                                    f"{response.error().message()} (is it loaded? `sfdeploy serve` loads both)")
        return to_array(pb_utils.get_output_tensor_by_name(response, OUTPUT_NAME))

    def execute(self, requests: list[Any]) -> list[Any]:
        """Each request's videos classified (see the module docstring for what a client gets back)."""
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:  # the batcher hands them one at a time (preferred batch 1); each may ask its decoder
            try:
                cpu_because = request_decode(request.parameters(), self.plan)
                videos = bytes_items(pb_utils.get_input_tensor_by_name(request, VIDEO_INPUT))
                answers = self.classify(videos, self._run_model, cpu_because)
            except RequestRefused as exc:
                responses.append(_failed(pb_utils, str(exc), pb_utils.TritonError.INVALID_ARG))
                continue
            except ServerSideFailure as exc:
                responses.append(_failed(pb_utils, str(exc), pb_utils.TritonError.UNAVAILABLE))
                continue
            if len(answers) == 1 and isinstance(answers[0][0], str):  # one video, not classified: the request fails
                responses.append(_failed(pb_utils, answers[0][0], pb_utils.TritonError.INVALID_ARG))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=self._outputs(answers)))
        return responses

    def _outputs(self, answers: list[Answer]) -> list[Any]:
        classes = self.spec.class_names
        zeros = np.zeros(len(classes), dtype=np.float32)
        values = [a for a, _ in answers]
        probs = np.stack([zeros if isinstance(a, str) else a.astype(np.float32, copy=False) for a in values])
        texts = {LABEL_OUTPUT: [b"" if isinstance(a, str) else classes[int(np.argmax(a))].encode() for a in values],
                 ERROR_OUTPUT: [a.encode() if isinstance(a, str) else b"" for a in values],
                 DECODER_OUTPUT: [how.decoder.encode() for _, how in answers],
                 DECODER_REASON_OUTPUT: [how.reason.encode() for _, how in answers]}
        return [from_tensor(OUTPUT_NAME, probs), *(bytes_tensor(name, items, (len(answers), 1))
                                                   for name, items in texts.items() if name in self.outputs)]

    def finalize(self) -> None:
        """Stop the decoder's workers."""
        self.decoder.close()


def _failed(pb_utils: Any, message: str, code: Any) -> Any:
    """A response that fails with ``message`` and Triton's error ``code``."""
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
