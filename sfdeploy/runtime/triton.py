"""Triton predictor: the same interface as the in-process ones, over HTTP or gRPC.

The clip spec, the tensor names and the largest batch are read from the *served* model's config
(``get_model_config``), so the client preprocesses for the model that is actually loaded. A
``tritonclient`` client must be used in the thread that created it: each thread gets its own
(and, with shared memory, its own region for the input: system shared memory, or CUDA shared
memory on the client's GPU, :mod:`sfdeploy.transport`), so ``predict`` may be called from many
threads at once to keep several requests in flight. What differs between the two protocols is one
:class:`Protocol` each (:data:`PROTOCOLS`), and between the two kinds of region one
:class:`~sfdeploy.runtime.shm_regions.Region` subclass each; the rest is one code path.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sfdeploy.clipspec import spec_of
from sfdeploy.device import REMOTE, Device
from sfdeploy.endpoints import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT
from sfdeploy.errors import ServingError
from sfdeploy.runtime.base import Frames, check_batch, host_array, is_torch_tensor
from sfdeploy.runtime.shm_regions import REGIONS, Region, cuda_shared_memory
from sfdeploy.transport import SharedMemory, check_same_host, shared_memory

_REGION_IDS = itertools.count()


def _as_is(answer: Any) -> Any:
    return answer


def _message_dict(message: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True)


@dataclass(frozen=True)
class Protocol:
    """What differs between Triton's HTTP and gRPC clients; the predictor's code is otherwise one.

    Both answer with the same content, the HTTP client as JSON dicts, the gRPC one as protobuf
    messages: ``config`` and ``answer`` turn a model-config answer and any other answer (statistics)
    into the JSON form, which is what the predictor reads."""

    client_module: str  # the tritonclient module (imported on first use: it is heavy)
    default_port: int  # where `sfdeploy serve` listens for it, when a URL names no port
    timeout_option: str | None  # the client's keyword for the network timeout (gRPC: per call, not set)
    config: Callable[[Any], dict[str, Any]]  # get_model_config's answer -> the config, JSON form
    answer: Callable[[Any], dict[str, Any]]  # any other answer -> JSON form
    # How the server says "this request's input is at fault" (INVALID_ARG; or too large, refused by
    # the server's front before it was read: sfdeploy.serving.guard), as the client's exc.status()
    invalid_input: frozenset[str]

    def module(self) -> Any:
        """The ``tritonclient`` module that speaks this protocol."""
        return importlib.import_module(self.client_module)

    def with_default_port(self, url: str) -> str:
        """``url`` with this protocol's default port when it names none (``host`` -> ``host:8001``)."""
        return url if ":" in url else f"{url}:{self.default_port}"

    def client_options(self, timeout_s: float) -> dict[str, Any]:
        """Keywords for its ``InferenceServerClient``."""
        return {self.timeout_option: timeout_s} if self.timeout_option else {}


PROTOCOLS: dict[str, Protocol] = {
    "http": Protocol("tritonclient.http", DEFAULT_HTTP_PORT, "network_timeout", config=_as_is, answer=_as_is,
                     invalid_input=frozenset({"400", "413"})),
    "grpc": Protocol("tritonclient.grpc", DEFAULT_GRPC_PORT, None, config=lambda answer: _message_dict(answer.config),
                     answer=_message_dict,
                     invalid_input=frozenset({"StatusCode.INVALID_ARGUMENT", "StatusCode.RESOURCE_EXHAUSTED"})),
}


def protocol_of(name: str) -> Protocol:
    """The :class:`Protocol` called ``name``, or a :class:`ServingError` that lists the known ones."""
    if name not in PROTOCOLS:
        raise ServingError(f"unknown protocol '{name}'", fix=f"use --protocol {' or '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


class TritonPredictor:
    """A client of the served model ``model`` at ``url`` (see the module docstring); opened through
    :meth:`sfdeploy.target.ModelTarget.open`, which owns the defaults.

    ``shm``: how the input travels (a :class:`~sfdeploy.transport.SharedMemory`, or ``True`` /
    ``False`` / a name). ``shm_device``: the GPU of CUDA shared memory for a batch that is not on one
    already (a CUDA tensor's region is on its own GPU); default ``cuda:0``."""

    def __init__(self, url: str, *, model: str, protocol: str = "http", shm: SharedMemory | bool | str = False,
                 shm_device: str | None = None, timeout_s: float = 120.0) -> None:
        self.wire = protocol_of(protocol)
        self.url, self.model, self.protocol = self.wire.with_default_port(url), model, protocol
        self.shm = shared_memory(shm)
        gpu = Device(shm_device or "cuda")
        self.shm_gpu = gpu.index if gpu.is_cuda else 0
        if self.shm is SharedMemory.CUDA:  # before the server is asked anything: what is missing, at once
            check_same_host(self.shm, self.url)
            cuda_shared_memory(self.shm_gpu)
        self.timeout_s = timeout_s
        self.module = self.wire.module()
        self._local = threading.local()
        self._states: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.name = f"triton-{protocol}:{model}"
        self.device = REMOTE  # wherever the server's model instances run
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
        config = self.wire.config(client.get_model_config(model))
        try:
            self.spec = spec_of(config)
        except KeyError:
            raise ServingError(f"model '{model}' has no sfdeploy clip spec in its config",
                               fix="serve a repository written by `sfdeploy repo`") from None
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.served_outputs = frozenset(output["name"] for output in config["output"])  # what it can answer
        self.max_batch = max(1, int(config.get("max_batch_size", 1)))

    def _client(self) -> Any:
        state = getattr(self._local, "state", None)
        if state is None:
            options = self.wire.client_options(self.timeout_s)
            state = {"client": self.module.InferenceServerClient(url=self.url, **options)}
            self._local.state = state
            with self._lock:
                self._states.append(state)
        return state["client"]

    def _region(self, frames: Frames) -> Region:
        """This thread's shared-memory region, made (again: larger, or on another GPU) to hold ``frames``."""
        state = self._local.state
        nbytes, device_id = math.prod(frames.shape), self._gpu_of(frames)
        region = state.get("region")
        if region is None or not region.fits(nbytes, device_id):
            if region is not None:
                state["region"] = None
                region.close()
            headers = self._shm_headers()
            size = max(nbytes, math.prod(self.spec.input_shape) * self.max_batch)
            region = REGIONS[self.shm](f"sfdeploy_{os.getpid()}_{next(_REGION_IDS)}", size, device_id)
            try:
                region.register(state["client"], headers)
            except Exception as exc:  # refused (the server's answer says why) or unreachable
                region.destroy()
                raise ServingError(f"the server at {self.url} did not register a {region.what} region "
                                   f"({type(exc).__name__}: {exc})",
                                   fix="do what the server's answer says, or send the tensors over the network "
                                       "(drop --shm)") from exc
            state["region"] = region
        return region

    def _gpu_of(self, frames: Frames) -> int:
        """The GPU a CUDA region for ``frames`` goes on: a CUDA tensor's own, else :attr:`shm_gpu`."""
        if self.shm is SharedMemory.CUDA and is_torch_tensor(frames) and frames.is_cuda:
            import torch

            index = frames.device.index
            return torch.cuda.current_device() if index is None else index
        return self.shm_gpu

    def _shm_headers(self) -> dict[str, str]:
        """The header carrying the server's shared-memory key (:mod:`sfdeploy.shmkey`), read from
        the key file of this URL's port: `sfdeploy serve` opens its shared-memory API to nothing
        else. A server elsewhere gets none (system shared memory is this machine's own)."""
        from sfdeploy import shmkey

        host, _, port = self.url.rpartition(":")
        if not shmkey.is_this_machine(host):
            return {}
        return shmkey.headers(self.protocol, shmkey.read_key(int(port)))

    def predict(self, frames: Frames) -> np.ndarray:
        """Probabilities for a batch of clips, sent in requests of at most the served model's
        ``max_batch_size`` (a larger batch is split and the answers joined); safe to call from many
        threads at once. With CUDA shared memory a batch on the GPU stays there (copied device to
        device into the region); otherwise the batch goes through host memory."""
        check_batch(frames, self.spec)
        if self.shm is not SharedMemory.CUDA:
            frames = host_array(frames)  # the request body, or system shared memory, is host memory
        parts = [self._infer(frames[i:i + self.max_batch]) for i in range(0, len(frames), self.max_batch)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _infer(self, frames: Frames) -> np.ndarray:
        client = self._client()
        request = self.module.InferInput(self.input_name, list(frames.shape), "UINT8")
        if self.shm:
            region = self._region(frames)
            region.write(frames)
            request.set_shared_memory(region.name, math.prod(frames.shape))  # uint8: a byte per value
        else:
            request.set_data_from_numpy(np.ascontiguousarray(frames))
        output = self.module.InferRequestedOutput(self.output_name)
        try:
            result = client.infer(self.model, [request], outputs=[output])
        except Exception as exc:  # InferenceServerException or a broken connection
            raise ServingError(f"inference on {self.url} failed ({type(exc).__name__}: {exc})",
                               fix="check that the server still runs (`sfdeploy serve` log)") from exc
        return result.as_numpy(self.output_name)

    def statistics(self) -> dict[str, Any]:
        """The served model's inference statistics (Triton's statistics extension), as a dict."""
        return self.wire.answer(self._client().get_inference_statistics(self.model))["model_stats"][0]

    def close(self) -> None:
        """Unregister and free every thread's shared-memory region (the server keeps a registered
        region alive otherwise) and close every thread's client; a server already gone is not an
        error here."""
        from tritonclient.utils import InferenceServerException

        with self._lock:
            states, self._states = self._states, []
        for state in states:
            region = state.pop("region", None)
            try:
                if region is not None:
                    region.close()
            except (InferenceServerException, OSError) as exc:  # the server may be gone already
                import logging

                logging.getLogger("sfdeploy").debug("shared memory cleanup: %s", exc)
            state["client"].close()
