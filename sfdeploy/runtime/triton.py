"""Triton predictor: the same interface as the in-process ones, over HTTP or gRPC.

The clip spec, the tensor names and the largest batch are read from the *served* model's config
(``get_model_config``), so the client preprocesses for the model that is actually loaded. A
``tritonclient`` client must be used in the thread that created it: each thread gets its own
(and, with ``shm=True``, its own system shared-memory region for the input), so ``predict`` may
be called from many threads at once to keep several requests in flight.
"""

from __future__ import annotations

import itertools
import os
import threading
from typing import Any

import numpy as np

from sfdeploy.clipspec import SPEC_KEY, ClipSpec
from sfdeploy.endpoints import with_default_port
from sfdeploy.errors import ServingError
from sfdeploy.runtime.base import Frames, check_batch, host_array

_REGION_IDS = itertools.count()


def _client_module(protocol: str) -> Any:
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ServingError(f"unknown protocol '{protocol}'", fix="use --protocol http or grpc")
    return module


class TritonPredictor:
    """A client of the served model ``model`` at ``url`` (see the module docstring); opened through
    :meth:`sfdeploy.target.ModelTarget.open`, which owns the defaults."""

    def __init__(self, url: str, *, model: str, protocol: str = "http", shm: bool = False,
                 timeout_s: float = 120.0) -> None:
        self.url, self.model, self.protocol, self.shm = with_default_port(url, protocol), model, protocol, shm
        self.timeout_s = timeout_s
        self.module = _client_module(protocol)
        self._local = threading.local()
        self._states: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.name = f"triton-{protocol}:{model}"
        self.device = "remote"  # wherever the server's model instances run
        client = self._client()
        try:
            live = client.is_server_live()
        except Exception as exc:  # refused / unreachable: tritonclient raises several types
            raise ServingError(f"cannot reach a Triton server at {self.url} ({type(exc).__name__}: {exc})",
                               fix="start one with `sfdeploy serve --repo model_repository`, or pass --url "
                                   f"(the {protocol} port)") from exc
        if not live or not client.is_server_ready():
            raise ServingError(f"the Triton server at {self.url} is not ready",
                               fix="wait until `sfdeploy serve` prints that it is ready, or read its log")
        if not client.is_model_ready(model):
            try:
                index = client.get_model_repository_index()
            except Exception:  # the repository API is closed (`sfdeploy serve` without --allow-model-control)
                raise ServingError(f"model '{model}' is not ready on {self.url}",
                                   fix="pass --model with a model the server serves (`sfdeploy serve` prints "
                                       "them)") from None
            rows = index if isinstance(index, list) else [{"name": m.name, "state": m.state} for m in index.models]
            ready = [r["name"] for r in rows if r.get("state") == "READY"]
            raise ServingError(f"model '{model}' is not ready on {self.url} (ready: {', '.join(ready) or 'none'})",
                               fix="pass --model with one of the ready models")
        config = client.get_model_config(model)
        if protocol == "grpc":
            from google.protobuf.json_format import MessageToDict

            config = MessageToDict(config.config, preserving_proto_field_name=True)
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if SPEC_KEY not in params:
            raise ServingError(f"model '{model}' has no sfdeploy clip spec in its config",
                               fix="serve a repository written by `sfdeploy repo`")
        self.spec = ClipSpec.from_json(params[SPEC_KEY])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.max_batch = max(1, int(config.get("max_batch_size", 1)))

    def _client(self) -> Any:
        state = getattr(self._local, "state", None)
        if state is None:
            state = {"client": self.module.InferenceServerClient(url=self.url, network_timeout=self.timeout_s)
                     if self.protocol == "http" else self.module.InferenceServerClient(url=self.url)}
            self._local.state = state
            with self._lock:
                self._states.append(state)
        return state["client"]

    def _region(self, nbytes: int) -> tuple[str, Any]:
        """This thread's shared-memory region, big enough for ``nbytes``."""
        import tritonclient.utils.shared_memory as shm

        state = self._local.state
        if state.get("region_bytes", 0) < nbytes:
            self._drop_region(state)
            name = f"sfdeploy_{os.getpid()}_{next(_REGION_IDS)}"
            size = max(nbytes, int(np.prod(self.spec.input_shape)) * self.max_batch)
            handle = shm.create_shared_memory_region(name, f"/{name}", size)
            state["client"].register_system_shared_memory(name, f"/{name}", size)
            state.update(region=name, handle=handle, region_bytes=size)
        return state["region"], state["handle"]

    @staticmethod
    def _drop_region(state: dict[str, Any]) -> None:
        import tritonclient.utils.shared_memory as shm

        if state.get("region"):
            try:
                state["client"].unregister_system_shared_memory(state["region"])
            finally:
                shm.destroy_shared_memory_region(state["handle"])
                state.update(region=None, handle=None, region_bytes=0)

    def predict(self, frames: Frames) -> np.ndarray:
        check_batch(frames, self.spec)
        frames = host_array(frames)  # the request body is host memory
        parts = [self._infer(frames[i:i + self.max_batch]) for i in range(0, len(frames), self.max_batch)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _infer(self, frames: np.ndarray) -> np.ndarray:
        client = self._client()
        frames = np.ascontiguousarray(frames)
        request = self.module.InferInput(self.input_name, list(frames.shape), "UINT8")
        if self.shm:
            import tritonclient.utils.shared_memory as shm

            region, handle = self._region(frames.nbytes)
            shm.set_shared_memory_region(handle, [frames])
            request.set_shared_memory(region, frames.nbytes)
        else:
            request.set_data_from_numpy(frames)
        output = self.module.InferRequestedOutput(self.output_name)
        try:
            result = client.infer(self.model, [request], outputs=[output])
        except Exception as exc:  # InferenceServerException or a broken connection
            raise ServingError(f"inference on {self.url} failed ({type(exc).__name__}: {exc})",
                               fix="check that the server still runs (`sfdeploy serve` log)") from exc
        return result.as_numpy(self.output_name)

    def statistics(self) -> dict[str, Any]:
        """The served model's inference statistics (Triton's statistics extension), as a dict."""
        stats = self._client().get_inference_statistics(self.model)
        if self.protocol == "grpc":
            from google.protobuf.json_format import MessageToDict

            stats = MessageToDict(stats, preserving_proto_field_name=True)
        return stats["model_stats"][0]

    def close(self) -> None:
        from tritonclient.utils import InferenceServerException

        with self._lock:
            states, self._states = self._states, []
        for state in states:
            try:
                self._drop_region(state)
            except (InferenceServerException, OSError) as exc:  # the server may be gone already
                import logging

                logging.getLogger("sfdeploy").debug("shared memory cleanup: %s", exc)
            state["client"].close()
