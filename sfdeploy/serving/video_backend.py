"""The Triton python-backend model ``<name>_video``: the bytes of encoded videos in, labels out.

Each request item is one encoded video file (input ``video``, BYTES): any container and codec the
decoder reads. The instance decodes it with sfdeploy's own decode pool, :class:`DecodePool`
(the code ``sfdeploy infer`` runs on the client), for the clip spec in the config's parameters,
then sends the views to ``<name>`` (parameter ``target_model``) in one BLS request. ``<name>``'s
dynamic batcher merges the clips of the video requests of every ``_video`` instance into one
model call, on ``<name>``'s own instance (its GPU where it has one).

``<name>_video`` hands each request to the next free instance alone, so the instances (``sfdeploy
repo --decode-instances``, default the CPU count) decode that many videos at once: its dynamic
batcher prefers batches of one request and never waits (a batcher free to merge would give a whole
queue of requests to one instance, to decode one after the other while the others wait). The
batcher is there for its queue policy: requests are served first come, first served (a soak at
concurrency 64 and 128 on 2 cores: no request overtaken by more than 22 later ones), and one
that waits longer than ``--decode-queue-timeout`` for an instance, or arrives when
``--decode-max-queue`` are waiting, is refused (``UNAVAILABLE``: HTTP 503, retry later) rather
than left to wait without bound, each waiting request holding its upload in the server's memory.

Decoding runs in a child process of the instance (one :class:`DecodePool` worker, started at load
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
probabilities by DLPack; the BYTES tensors (``video``, ``label``, ``error``) have no DLPack form and
need the stub's numpy bridge, which a stub built against numpy 1 (nvidia-pytriton 0.7.0's) gets
silently wrong under numpy 2: there the model refuses to load, with the reason and the fix.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from sfdeploy.artifacts import ERROR_OUTPUT, INPUT_NAME, LABEL_OUTPUT, OUTPUT_NAME, VIDEO_INPUT
from sfdeploy.clipspec import SPEC_KEY, ClipSpec
from sfdeploy.decode import MAX_VIDEO_PIXELS
from sfdeploy.decode.clips import DecodeFailure
from sfdeploy.decode.pool import DecodePool
from sfdeploy.errors import EnvironmentProblem
from sfdeploy.serving.config import DECODE_TIMEOUT_S, MAX_VIDEO_BYTES, MAX_VIDEO_PIXELS_KEY, TARGET_MODEL
from sfdeploy.serving.tensors import bytes_items, bytes_tensor, from_array, require_numpy_bridge, to_array


class ServerSideFailure(Exception):
    """Not the video's fault: the whole request fails, and the client should not blame its input."""


def too_large(size: int, limit: int) -> str:
    return (f"the video is {size / 2**20:.1f} MB, over this model's limit of {limit / 2**20:g} MB, and was not "
            "decoded; send a smaller file (re-encode it, e.g. `ffmpeg -i IN -vf scale=-2:360 OUT.mp4`), or "
            "write the repository with a larger `sfdeploy repo --max-video-mb`")


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.spec = ClipSpec.from_json(params[SPEC_KEY])
        self.target = params[TARGET_MODEL]
        require_numpy_bridge(  # before any work: a model that cannot answer right does not load
            args["model_name"], needs=f"its '{VIDEO_INPUT}' input and '{LABEL_OUTPUT}'/'{ERROR_OUTPUT}' outputs are "
            "BYTES tensors", otherwise=f"serve without it: `sfdeploy serve --models {self.target}` or `sfdeploy "
            f"repo --no-video` (the '{self.target}' model works under numpy 2)")
        self.max_bytes = int(params[MAX_VIDEO_BYTES])
        # `sfdeploy repo` gives <name>_video the max_batch_size of <name>: a request's clips fit one call
        self.max_batch = max(1, int(config.get("max_batch_size", 1)))
        max_pixels = int(params.get(MAX_VIDEO_PIXELS_KEY, MAX_VIDEO_PIXELS))  # older repositories: the default
        self.decoder = DecodePool(self.spec, workers=1, timeout_s=float(params[DECODE_TIMEOUT_S]),
                                  max_pixels=max_pixels)
        self.decoder.warm()  # a decoder that cannot start fails the load, with its reason

    def classify(self, videos: list[bytes], run_model: Any) -> list[np.ndarray | str]:
        """Probabilities, or why not, for each video; ``run_model(views) -> probs`` runs a batch."""
        results: list[np.ndarray | str | None] = [None] * len(videos)
        todo = []
        for i, video in enumerate(videos):
            if len(video) > self.max_bytes:
                results[i] = too_large(len(video), self.max_bytes)
            else:
                todo.append(i)
        decoded: dict[int, np.ndarray] = {}
        try:
            for k, views, _ in self.decoder.decode([videos[i] for i in todo]):
                if isinstance(views, DecodeFailure):
                    results[todo[k]] = views.error
                else:
                    decoded[todo[k]] = views
        except EnvironmentProblem as exc:  # the decoder's interpreter cannot start: not the video's fault
            raise ServerSideFailure(f"the decoder cannot start ({exc.message}); fix: {exc.fix}") from exc
        order = sorted(decoded)
        for start in range(0, len(order), self.max_batch):
            chunk = order[start:start + self.max_batch]
            probs = run_model(np.stack([decoded[i] for i in chunk]))
            for i, row in zip(chunk, probs, strict=True):
                results[i] = row
        return results  # type: ignore[return-value]

    def _run_model(self, views: np.ndarray) -> np.ndarray:
        """One BLS request to the model: ``[N, V, T, H, W, 3]`` uint8 -> ``[N, classes]``."""
        import triton_python_backend_utils as pb_utils

        request = pb_utils.InferenceRequest(model_name=self.target, requested_output_names=[OUTPUT_NAME],
                                            inputs=[from_array(INPUT_NAME, views)])
        response = request.exec()
        if response.has_error():
            raise ServerSideFailure(f"the model '{self.target}' that classifies the decoded clips failed: "
                                    f"{response.error().message()} (is it loaded? `sfdeploy serve` loads both)")
        return to_array(pb_utils.get_output_tensor_by_name(response, OUTPUT_NAME))

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        per_request = [bytes_items(pb_utils.get_input_tensor_by_name(r, VIDEO_INPUT)) for r in requests]
        try:
            answers = self.classify([video for videos in per_request for video in videos], self._run_model)
        except ServerSideFailure as exc:
            error = pb_utils.TritonError(str(exc), pb_utils.TritonError.UNAVAILABLE)
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for videos in per_request:
            mine = answers[start:start + len(videos)]
            start += len(videos)
            if len(mine) == 1 and isinstance(mine[0], str):  # one video, not classified: the request fails
                error = pb_utils.TritonError(mine[0], pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=self._outputs(mine)))
        return responses

    def _outputs(self, answers: list[np.ndarray | str]) -> list[Any]:
        classes = self.spec.class_names
        zeros = np.zeros(len(classes), dtype=np.float32)
        probs = np.stack([zeros if isinstance(a, str) else a.astype(np.float32, copy=False) for a in answers])
        labels = [b"" if isinstance(a, str) else classes[int(np.argmax(a))].encode() for a in answers]
        errors = [a.encode() if isinstance(a, str) else b"" for a in answers]
        return [from_array(OUTPUT_NAME, probs), bytes_tensor(LABEL_OUTPUT, labels, (len(answers), 1)),
                bytes_tensor(ERROR_OUTPUT, errors, (len(answers), 1))]

    def finalize(self) -> None:
        self.decoder.close()
