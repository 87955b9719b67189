"""The Triton python-backend model that serves an sfdeploy export.

``model_repository/<name>/1/model.py`` only re-exports :class:`TritonPythonModel` from here, so
the logic is tested and versioned with sfdeploy. Each model instance runs the artifact named in
the config's parameters (ONNX through onnxruntime; TorchScript, the ExportedProgram or an
AOTInductor package through torch: :func:`sfdeploy.runtime.open_artifact`) on the instance's
device (a ``KIND_GPU`` instance on its GPU, else the CPU). Triton's dynamic batcher hands
``execute`` several requests at once: their inputs are concatenated into one batch, run once,
and split back, so batching across clients costs one model call. Tensors cross the stub boundary
by DLPack (:mod:`sfdeploy.serving.tensors`): exact under numpy 1 and 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sfdeploy.artifacts import backend_format, verify_sha256
from sfdeploy.clipspec import spec_of
from sfdeploy.runtime import open_artifact
from sfdeploy.serving.config import ARTIFACT, ARTIFACT_SHA256, RUNTIME
from sfdeploy.serving.tensors import from_array, to_array


class TritonPythonModel:
    """The class Triton's python backend instantiates once per model instance (the name is Triton's
    contract): it opens the artifact the config names and serves it (see the module docstring)."""

    def initialize(self, args: dict[str, str]) -> None:
        """Open the artifact on the instance's device, after checking its sha256 against the
        config's, and refuse to load (a ``ValueError`` in the server log) when its clip spec is not
        the config's: a model that would answer for other clips must not serve."""
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        artifact = Path(args["model_repository"]) / args["model_version"] / params[ARTIFACT]
        if args["model_instance_kind"] == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        else:
            device = "cpu"
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

        # In the server log: where this instance really runs (a KIND_GPU instance on its GPU).
        pb_utils.Logger.log_info(f"sfdeploy: {args['model_name']} instance {args['model_instance_name']} runs "
                                 f"{artifact.name} on {self.predictor.device} ({self.predictor.runtime})")

    def execute(self, requests: list[Any]) -> list[Any]:
        """One batch for all of ``requests`` (Triton's dynamic batcher gathered them), split back
        into one response each; a failure answers every request of the batch with the error, and the
        instance goes on serving."""
        import triton_python_backend_utils as pb_utils

        arrays = [to_array(pb_utils.get_input_tensor_by_name(r, self.input_name)) for r in requests]
        try:
            probs = self.predictor.predict(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
        except Exception as exc:  # every request of the failed batch gets the error, the server lives on
            error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for array in arrays:
            part = probs[start:start + len(array)]
            start += len(array)
            responses.append(pb_utils.InferenceResponse(output_tensors=[from_array(self.output_name, part)]))
        return responses

    def finalize(self) -> None:
        """Release the predictor when Triton unloads the model."""
        self.predictor.close()
