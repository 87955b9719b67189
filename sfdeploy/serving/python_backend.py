"""The Triton python-backend model that serves an sfdeploy export.

``model_repository/<name>/1/model.py`` only re-exports :class:`TritonPythonModel` from here, so
the logic is tested and versioned with sfdeploy. Each model instance runs the artifact named in
the config's parameters (ONNX through onnxruntime; TorchScript, the ExportedProgram or an
AOTInductor package through torch: :func:`sfdeploy.runtime.open_artifact`) on the instance's
device (a ``KIND_GPU`` instance on its GPU, else the CPU). Triton's dynamic batcher hands
``execute`` several requests at once: their inputs are concatenated into one batch, run once,
and split back, so batching across clients costs one model call.

Tensors cross the stub boundary by DLPack (:mod:`sfdeploy.serving.tensors`): exact under numpy 1
and 2, and no request or response makes a numpy round trip. What crosses where:

- The inputs stay on the device Triton gives them, as torch tensors: a host batch goes to the
  predictor as it is (on a GPU it uploads it through its pinned staging buffer), a GPU input for
  an instance on that GPU is run in place (one on another device is moved once). By default Triton copies every input to
  host memory before the stub sees it; ``FORCE_CPU_ONLY_INPUT_TENSORS: "no"`` in the config's
  parameters (what ``sfdeploy repo`` writes for ``KIND_GPU`` instances) lets it hand over an input
  that is in GPU memory as it is (a BLS request from ``<name>_video`` with clips decoded on the
  GPU, a client's CUDA shared memory), with no host copy. Such tensors move between the server and
  the stub through Triton's CUDA memory pool, which ``sfdeploy serve`` sizes for the largest
  request (:func:`sfdeploy.serving.config.cuda_pool_bytes`).
- The probabilities come from the predictor as host float32 (``[N, classes]``, a few KB), which
  Triton needs in host memory for HTTP/gRPC responses anyway; each response holds a slice of them
  (no copy).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfdeploy.artifacts import backend_format, verify_sha256
from sfdeploy.clipspec import spec_of
from sfdeploy.runtime import open_artifact
from sfdeploy.serving.config import (
    ARTIFACT,
    ARTIFACT_SHA256,
    FORCE_CPU_ONLY_INPUTS,
    RUNTIME,
    instance_device,
    string_parameters,
)
from sfdeploy.serving.tensors import from_tensor, to_tensor

if TYPE_CHECKING:
    import torch


class TritonPythonModel:
    """The class Triton's python backend instantiates once per model instance (the name is Triton's
    contract): it opens the artifact the config names and serves it (see the module docstring)."""

    def initialize(self, args: dict[str, str]) -> None:
        """Open the artifact on the instance's device, after checking its sha256 against the
        config's, and refuse to load (a ``ValueError`` in the server log) when its clip spec is not
        the config's: a model that would answer for other clips must not serve."""
        config = json.loads(args["model_config"])
        params = string_parameters(config)
        artifact = Path(args["model_repository"]) / args["model_version"] / params[ARTIFACT]
        device = instance_device(args)
        if params.get(ARTIFACT_SHA256):  # the file `sfdeploy repo` placed, not a changed one
            verify_sha256(artifact, params[ARTIFACT_SHA256], fix="regenerate the repository with `sfdeploy repo`")
        self.predictor = open_artifact(artifact, backend_format(params[RUNTIME]), device=device)
        configured = spec_of(config)
        if self.predictor.spec != configured:
            raise ValueError(f"{artifact} carries another clip spec than config.pbtxt: regenerate the "
                             "repository with `sfdeploy repo`")
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        import triton_python_backend_utils as pb_utils

        # In the server log: where this instance really runs (a KIND_GPU instance on its GPU), and
        # whether its inputs may arrive in GPU memory.
        inputs = ("may arrive in GPU memory (FORCE_CPU_ONLY_INPUT_TENSORS: no), used where they are"
                  if params.get(FORCE_CPU_ONLY_INPUTS) == "no" else "arrive in host memory (Triton copies GPU inputs "
                  "to the host: FORCE_CPU_ONLY_INPUT_TENSORS is not 'no')")
        pb_utils.Logger.log_info(f"sfdeploy: {args['model_name']} instance {args['model_instance_name']} runs "
                                 f"{artifact.name} on {self.predictor.device} ({self.predictor.runtime}); "
                                 f"its inputs {inputs}")

    def execute(self, requests: list[Any]) -> list[Any]:
        """One batch for all of ``requests`` (Triton's dynamic batcher gathered them), split back
        into one response each; a failure answers every request of the batch with the error, and the
        instance goes on serving."""
        import triton_python_backend_utils as pb_utils

        try:
            inputs = [to_tensor(pb_utils.get_input_tensor_by_name(r, self.input_name)) for r in requests]
            probs = self.predictor.predict(self._batch(inputs))  # host float32 [N, classes]
        except Exception as exc:  # every request of the failed batch gets the error, the server lives on
            error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for part in inputs:
            rows = probs[start:start + len(part)]  # a view: from_tensor hands its memory to the stub
            start += len(part)
            responses.append(pb_utils.InferenceResponse(output_tensors=[from_tensor(self.output_name, rows)]))
        return responses

    def _batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The requests' inputs as one batch (one alone: as it is). Host inputs stay on the host: the
        predictor uploads a host batch through its pinned staging buffer on its own stream, faster
        than a plain copy from pageable memory. Where an input is in GPU memory, each is moved to the
        predictor's device first, only if it is elsewhere (in place when it is there), and they are
        concatenated there: each byte crosses once, and the batcher may merge host and GPU inputs."""
        import torch

        if any(tensor.is_cuda for tensor in inputs):
            device = torch.device(str(self.predictor.device))
            inputs = [tensor if tensor.device == device else tensor.to(device) for tensor in inputs]
        return inputs[0] if len(inputs) == 1 else torch.cat(inputs)

    def finalize(self) -> None:
        """Release the predictor when Triton unloads the model."""
        self.predictor.close()
