"""Which model a command talks to: one value, parsed once by the CLI or built in Python.

::

    from sfdeploy.target import ModelTarget

    ModelTarget(export_dir="EXPORT")                          # onnxruntime, in this process
    ModelTarget(backend="torchscript", export_dir="EXPORT", device="cuda", precision="fp16")
    ModelTarget()                                             # the model `sfdeploy serve` serves here
    ModelTarget(urls=("gpu1:8001",), protocol="grpc", server_decode=True)

A :class:`ModelTarget` says everything that picks the model: the backend, the export folder
(local backends), precision and device, or the server(s), protocol, model name and how the
inputs travel (system or CUDA shared memory, :mod:`sfdeploy.transport`, or encoded files decoded on
the server). ``infer``, ``eval``,
the Ray engine and its model actors, and ``bench`` take it whole; :meth:`ModelTarget.open` is the
one place that turns it into a predictor. Invalid combinations are refused when it is made, before
anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sfdeploy.artifacts import LOCAL_BACKENDS
from sfdeploy.device import DEFAULT_DEVICE, Device
from sfdeploy.endpoints import DEFAULT_HTTP_URL, DEFAULT_MODEL, PROTOCOLS
from sfdeploy.errors import InputError
from sfdeploy.precision import DEFAULT_RUN_PRECISION, RUN_PRECISIONS
from sfdeploy.transport import SharedMemory, check_same_host, shared_memory

if TYPE_CHECKING:  # light at import: the CLI's options read this module's names
    from sfdeploy.clipspec import ClipSpec
    from sfdeploy.runtime.base import Predictor

SERVED = "triton"  # the backend of a served model
BACKENDS: tuple[str, ...] = (SERVED, *LOCAL_BACKENDS)
#: the local backend when an export is given and no backend is (`infer --export`, `eval`)
DEFAULT_LOCAL_BACKEND = "onnxruntime"


@dataclass(frozen=True)
class ModelTarget:
    """The model to run, in this process or on Triton servers (see the module docstring).

    ``backend="auto"`` (the default) is :data:`DEFAULT_LOCAL_BACKEND` when ``export_dir`` is
    given, else the served model. ``urls``: one server, or for the Ray engine several serving
    the same repository (a string is one URL).
    """

    backend: str = "auto"  # triton | onnxruntime | torchscript | auto
    export_dir: Path | None = None  # local backends: the `sfdeploy export` folder
    precision: str = DEFAULT_RUN_PRECISION  # which artifact of the export (local backends)
    # where a local backend runs: auto | cpu | cuda[:N] (a str is parsed into a Device when it is made)
    device: Device = Device(DEFAULT_DEVICE)
    urls: tuple[str, ...] = (DEFAULT_HTTP_URL,)  # triton: the server(s)
    protocol: str = "http"  # triton: http | grpc
    model: str = DEFAULT_MODEL  # triton: the served model's name
    # triton: how the inputs travel: none | system | cuda shared memory (a server on this machine); a bool
    # (True: system) or a str is parsed into a SharedMemory when it is made
    shm: SharedMemory = SharedMemory.NONE
    server_decode: bool = False  # triton: send encoded files to <model>_video, decoded on the server

    def __post_init__(self) -> None:
        backend = self.backend
        if backend == "auto":
            backend = DEFAULT_LOCAL_BACKEND if self.export_dir is not None else SERVED
        if backend not in BACKENDS:
            raise InputError(f"unknown backend '{self.backend}'", fix=f"use one of: {', '.join(BACKENDS)}")
        urls = (self.urls,) if isinstance(self.urls, str) else tuple(self.urls)
        for name, value in (("backend", backend), ("urls", urls), ("device", Device(self.device)),
                            ("shm", shared_memory(self.shm)),
                            ("export_dir", Path(self.export_dir) if self.export_dir is not None else None)):
            object.__setattr__(self, name, value)  # frozen: normalised once, here
        if self.precision not in RUN_PRECISIONS:
            raise InputError(f"unknown precision '{self.precision}'", fix=f"use one of: {', '.join(RUN_PRECISIONS)}")
        if self.protocol not in PROTOCOLS:
            raise InputError(f"unknown protocol '{self.protocol}'", fix="use --protocol http or grpc")
        if self.server_decode and self.local:
            raise InputError("decoding on the server needs --backend triton",
                             fix="drop --server-decode, or pass --backend triton (the default without --export)")
        if self.local and self.export_dir is None:
            raise InputError(f"--backend {backend} runs an exported model in this process", fix="pass --export EXPORT")
        if not self.urls:
            raise InputError("no Triton server given", fix=f"pass --url (default {DEFAULT_HTTP_URL})")
        if self.server_decode and self.shm:
            raise InputError("--shm carries decoded clips; with --server-decode the encoded files are sent",
                             fix="drop --shm or --server-decode")
        if not self.local:
            for url in self.urls:
                check_same_host(self.shm, url)

    @property
    def local(self) -> bool:
        """Whether the model runs in this process (an exported artifact), not on a server."""
        return self.backend in LOCAL_BACKENDS

    @property
    def url(self) -> str:
        """The one server of a served target."""
        if len(self.urls) > 1:
            raise InputError(f"{len(self.urls)} servers given where one is used ({', '.join(self.urls)})",
                             fix="pass one --url (`infer --engine ray` spreads batches over several)")
        return self.urls[0]

    def servers(self) -> tuple[ModelTarget, ...]:
        """One target per server (a local target: itself)."""
        return (self,) if self.local else tuple(replace(self, urls=(url,)) for url in self.urls)

    def describe(self) -> str:
        """For logs: ``onnxruntime fp32 (EXPORT, device auto)`` or ``triton grpc slowfast at URL``."""
        if self.local:
            return f"{self.backend} {self.precision} ({self.export_dir}, device {self.device})"
        how = " (decoded on the server)" if self.server_decode else f" ({self.shm.describe()})" if self.shm else ""
        return f"{self.backend} {self.protocol} {self.model} at {', '.join(self.urls)}{how}"

    def open(self, *, threads: int | None = None) -> Predictor:
        """The predictor: the export's artifact on the device (``threads``: its inference threads), or
        a client of the served model (of ``<model>_video``, taking encoded files, with
        ``server_decode``). Fails at once when the export or the server cannot be used."""
        if self.local:
            from sfdeploy.runtime import open_local

            return open_local(self.backend, self.export_dir, precision=self.precision, device=self.device,
                              threads=threads)
        if self.server_decode:
            from sfdeploy.runtime.triton_video import TritonVideoPredictor

            return TritonVideoPredictor(self.url, model=self.model, protocol=self.protocol)
        from sfdeploy.runtime.triton import TritonPredictor

        return TritonPredictor(self.url, model=self.model, protocol=self.protocol, shm=self.shm,
                               shm_device=self.device)

    def read_spec(self) -> ClipSpec:
        """The clip spec the model takes, read without running it: from the export's manifest, or
        from every server's config (they must all serve the same model)."""
        if self.local:
            from sfdeploy.artifacts import Manifest

            return Manifest.read(self.export_dir).clip_spec
        specs = {}
        for server in self.servers():
            predictor = replace(server, shm=SharedMemory.NONE, server_decode=False).open()
            specs[server.url] = predictor.spec
            predictor.close()
        first = next(iter(specs.values()))
        differ = [url for url, spec in specs.items() if spec != first]
        if differ:
            raise InputError(f"the servers serve different '{self.model}' models ({', '.join(differ)} differ from "
                             f"{self.urls[0]})", fix="pass --url only for servers of the same model repository")
        return first
