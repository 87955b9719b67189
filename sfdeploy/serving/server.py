"""Start and stop the real tritonserver (the one in ``nvidia-pytriton``) on a model repository.

:class:`TritonServer` checks the ports first, builds the python-backend directory for this
Python, starts the server with the current virtual environment first on ``PATH`` (that is how the
backend stub finds sfdeploy, numpy, onnxruntime, torch), loads the python-backend models of the
repository, and waits until they are ready. If the server exits instead, or a model's backend stub
cannot start (the server itself would wait for it forever), the error names the failing line of
the server's log.

What clients reach is :mod:`sfdeploy.serving.guard`, on the public ports (127.0.0.1 unless told
otherwise): it refuses a request larger than what its model accepts (:func:`request_limit` of
each loaded model's config) before reading it, closes idle connections, and forwards the rest to
tritonserver on private loopback ports. Model control is closed unless ``allow_model_control``:
the server runs in tritonserver's ``none`` mode on a repository of links to the chosen models
(nothing can be loaded or unloaded), and the repository API (index, load, unload) and the logging
and trace settings (which can make the server write files where a client says) answer only
requests carrying a key this object makes per server (tritonserver's restricted-API options).
The shared-memory API (system and CUDA), which writes outputs into whatever region a client names,
is closed the same way with a second key (:mod:`sfdeploy.shmkey`): that one is written, for this
user only, to a key file per public port, which sfdeploy's own client (``infer --shm``) reads, and
removed on stop; the guard also refuses shared-memory calls from non-loopback peers unless
``allow_remote_shm``.

Nothing outlives the server: tritonserver, its python-backend stubs and their decode workers share
one process group, in a session of its own (a Ctrl-C in the terminal reaches sfdeploy first, which
then shuts the server down cleanly). :meth:`TritonServer.stop` kills what is left of the group and
the guard and removes the backend's shared-memory segments; the guard's watchdog does the same
when tritonserver dies or the process that started it is killed.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfdeploy import shmkey
from sfdeploy.endpoints import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT, LOOPBACK
from sfdeploy.errors import InputError, ServingError
from sfdeploy.serving.config import TARGET_MODEL, cuda_pool_bytes, parse_config, python_shm_sizes, request_limit
from sfdeploy.serving.guard import SHM_KEY_ENV, GuardConfig, remove_shm
from sfdeploy.serving.guard.budget import CLIP_COST, DEFAULT_BUDGET_MB, VIDEO_COST
from sfdeploy.serving.install import find_tritonserver, make_backend_dir
from sfdeploy.serving.memory import process_group_memory
from sfdeploy.serving.ports import busy_port_error, free_port, port_free

log = logging.getLogger("sfdeploy")

# E-lines the server prints on every machine without a GPU; they are not why it failed.
_BENIGN = ("CudaDriverHelper has not been initialized", "DCGM", "NVML", "GPU metrics")
_ERROR_LINE = re.compile(r"^(E\d{4} |error: |.*failed to load|.*Address already in use|.*Unexpected)")
# Lines after which the server would wait for a model forever: the backend stub binary cannot start
# (the dynamic loader's "<stub path>: error while loading shared libraries: ...", "symbol lookup
# error", a missing GLIBC version). A model whose Python fails to load ends the server by itself.
_STUB_FAILURE = re.compile(r"triton_python_backend_stub: |error while loading shared libraries")
ADMIN_HEADER = "sfdeploy-admin-key"  # the header tritonserver's restricted APIs expect, with a key per server


def repository_models(repo: Path) -> dict[str, Any]:
    """Model name -> its parsed config (``ModelConfig``), for every model folder with a config.pbtxt."""
    repo = Path(repo)
    if not repo.is_dir():
        raise InputError("model repository not found", path=repo,
                         fix="write one with `sfdeploy repo EXPORT --repo DIR`")
    models = {}
    for config in sorted(repo.glob("*/config.pbtxt")):
        try:
            models[config.parent.name] = parse_config(config.read_text())
        except Exception as exc:  # a malformed config: named, with the parser's reason
            raise InputError(f"unreadable config.pbtxt ({exc})", path=config,
                             fix="regenerate it with `sfdeploy repo`") from exc
    if not models:
        raise InputError("no models in the repository (no */config.pbtxt)", path=repo,
                         fix="write one with `sfdeploy repo EXPORT --repo DIR`")
    return models


def _numpy_version() -> str:
    import numpy

    return numpy.__version__


def visible_gpus() -> int:
    """The CUDA GPUs tritonserver will see (``CUDA_VISIBLE_DEVICES`` honoured), counted by torch as
    tritonserver's CUDA runtime numbers them; 0 without a GPU, its driver or a CUDA build of torch."""
    import torch

    return torch.cuda.device_count()


def stub_passes_bytes() -> bool:
    """Whether the python backend stub (nvidia-pytriton's, built against numpy 1.x) can pass BYTES
    tensors in this environment: not under numpy 2 (see :mod:`sfdeploy.serving.tensors`, whose
    probe the video models run at load time; this is the same rule, known before the server starts)."""
    return int(_numpy_version().split(".")[0]) < 2


def error_lines(log_text: str) -> list[str]:
    """The server's own error lines, benign GPU-less noise removed. A model that failed to load
    with an :class:`SfdeployError` has its ``fix:`` on the next line: it is kept with its error."""
    lines = [line.strip() for line in log_text.splitlines()]
    found = []
    for i, line in enumerate(lines):
        if _ERROR_LINE.match(line) and not any(b in line for b in _BENIGN):
            if i + 1 < len(lines) and lines[i + 1].startswith("fix: "):
                line = f"{line}; {lines[i + 1]}"
            found.append(line)
    return found


@dataclass
class TritonServer:
    """One tritonserver on a repository, behind its guard (see the module docstring): configure it
    with the fields, then :meth:`start` and :meth:`stop`, or use it as a context manager, so that
    nothing it started outlives it."""

    repo: Path
    host: str = LOOPBACK
    http_port: int = DEFAULT_HTTP_PORT
    grpc_port: int = DEFAULT_GRPC_PORT
    metrics_port: int = DEFAULT_METRICS_PORT
    models: list[str] | None = None  # default: every python-backend model of the repository
    startup_timeout_s: float = 180.0
    log_file: Path | None = None
    allow_model_control: bool = False  # open load/unload and the repository index to clients
    idle_timeout_s: float = 60.0  # a client connection with nothing in flight this long is closed
    max_connections: int = 256  # client connections at once; more are refused
    allow_remote_shm: bool = False  # let clients on non-loopback connections register shared memory (with the key)
    memory_budget_mb: int = DEFAULT_BUDGET_MB  # what the requests in flight may cost at once (guard.budget); 0: none
    skipped: dict[str, str] = field(default_factory=dict)  # model -> why it is not loaded

    def __post_init__(self) -> None:
        self.process: subprocess.Popen | None = None  # tritonserver
        self.guard: subprocess.Popen | None = None
        self.limits: dict[str, int] = {}  # model -> the largest request it accepts, in bytes
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._configs: dict[str, Any] = {}
        self._key = secrets.token_hex(16)  # opens the restricted APIs: never printed, never sent by a client
        self._shm_key = secrets.token_hex(16)  # opens the shared-memory API: in key files for this user only
        self._shm_prefix = f"sfdeploy_{os.getpid()}_{secrets.token_hex(4)}_"

    @property
    def http_url(self) -> str:
        """The URL a client on this machine uses for HTTP (the loopback address when the server
        listens on every interface)."""
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """The URL a client on this machine uses for gRPC (as :attr:`http_url`)."""
        return f"{self._client_host}:{self.grpc_port}"

    def url(self, protocol: str) -> str:
        """The URL a client on this machine uses for ``protocol`` (``http`` or ``grpc``)."""
        return {"http": self.http_url, "grpc": self.grpc_url}[protocol]

    @property
    def _client_host(self) -> str:
        return LOOPBACK if self.host in ("0.0.0.0", "") else self.host

    def _choose_models(self) -> list[str]:
        available = self._configs = repository_models(self.repo)
        if self.models:
            unknown = [m for m in self.models if m not in available]
            if unknown:
                raise InputError(f"model(s) not in the repository: {', '.join(unknown)} "
                                 f"(it has: {', '.join(available)})", path=self.repo, fix="check --models")
            for name in self.models:  # <name>_video runs its clips through <name> (BLS)
                params = available[name].parameters
                target = params[TARGET_MODEL].string_value if TARGET_MODEL in params else None
                if target and target not in self.models:
                    raise InputError(f"model '{name}' classifies the videos it decodes with '{target}', which "
                                     "--models does not load", path=self.repo,
                                     fix=f"load both: --models {' '.join([*self.models, target])}")
            return list(self.models)
        chosen = [name for name, config in available.items() if config.backend == "python"]
        for name, config in available.items():
            if config.backend != "python":
                self.skipped[name] = (f"{config.backend} backend: not in the nvidia-pytriton build; serve it with "
                                      "NVIDIA's Triton container")
        if not stub_passes_bytes():  # the video models would refuse to load (and stop the server)
            for name in [n for n in chosen if TARGET_MODEL in available[n].parameters]:
                chosen.remove(name)
                self.skipped[name] = (f"needs numpy<2 in the server's environment (numpy {_numpy_version()} here: "
                                      "the python backend stub passes BYTES tensors only through its numpy 1.x "
                                      "bridge); pip install numpy==1.26.4 to serve it")
        if not chosen:
            raise InputError("no python-backend model in the repository", path=self.repo,
                             fix="write one with `sfdeploy repo EXPORT --repo DIR`")
        return chosen

    def start(self) -> TritonServer:
        """Start the server with the chosen models loaded, and return once every one is ready. Fails,
        with nothing left running, when a port is busy (naming who holds it), nvidia-pytriton is
        missing, or the server or a model does not come up (naming the log line that says why)."""
        models = self._choose_models()
        configs = self._configs  # parsed once, by _choose_models
        self.limits = {name: request_limit(configs[name]) for name in models}
        for label, port in (("--http-port", self.http_port), ("--grpc-port", self.grpc_port),
                            ("--metrics-port", self.metrics_port)):
            if not port_free(self.host, port):
                raise busy_port_error(self.host, port, label)
        install = find_tritonserver()
        self._tmp = tempfile.TemporaryDirectory(prefix="sfdeploy-triton-")
        backends = make_backend_dir(install, Path(self._tmp.name) / "backends")
        if self.log_file is None:  # kept after stop(): it is where a failure is explained
            handle, name = tempfile.mkstemp(prefix="sfdeploy-tritonserver-", suffix=".log")
            os.close(handle)
            self.log_file = Path(name)
        upstream_http, upstream_grpc = free_port(), free_port()
        if self.allow_model_control:  # the whole repository, the chosen models loaded, the others loadable
            repository, control = Path(self.repo).resolve(), ["--model-control-mode=explicit",
                                                             *[f"--load-model={m}" for m in models]]
        else:  # only the chosen models, loaded at start, none loadable or unloadable after
            repository, control = self._serving_repository(models), ["--model-control-mode=none"]
        command = [
            str(install.binary),
            f"--model-repository={repository}",
            f"--backend-directory={backends}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            "--http-address=127.0.0.1", f"--http-port={upstream_http}",  # behind the guard
            "--grpc-address=127.0.0.1", f"--grpc-port={upstream_grpc}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            # tritonserver keeps 8 gRPC request objects for reuse by default, each with the capacity of
            # the largest message it held: one 250 MB upload left 310 MB behind. None kept: given back.
            "--grpc-infer-allocation-pool-size=0",
            *self._restricted_apis(), *control,
            "--strict-readiness=true", "--exit-on-error=true", "--exit-timeout-secs=5",
            *self._memory_options(models),
        ]
        env = install.env(dict(os.environ))
        # The python-backend stub takes its interpreter (and so its packages) from PATH.
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        log.info("starting tritonserver on %s (http %d, grpc %d) with %s", self.host, self.http_port,
                 self.grpc_port, ", ".join(models))
        Path(self.log_file).write_bytes(b"")
        with open(self.log_file, "ab") as sink:  # appending, as the guard does to the same log
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        try:
            self._start_guard(upstream_http, upstream_grpc)
            self._wait_ready(models)
        except BaseException:
            self.stop()
            raise
        self.loaded = models
        return self

    def _memory_options(self, models: list[str]) -> list[str]:
        """Memory sized for the largest request of ``models``: the python backend's shared memory
        (:func:`python_shm_sizes`) and, on a machine with CUDA GPUs, Triton's CUDA memory pool on each
        (:func:`cuda_pool_bytes`: how GPU inputs reach a ``KIND_GPU`` instance); nothing of a pool
        where no GPU is seen or no model has a GPU instance."""
        configs = [self._configs[m] for m in models]
        shm_default, shm_growth = python_shm_sizes(configs)
        options = [f"--backend-config=python,shm-default-byte-size={shm_default}",
                   f"--backend-config=python,shm-growth-byte-size={shm_growth}"]
        pool = cuda_pool_bytes(configs)
        if pool:  # only then is torch asked for the GPUs
            options += [f"--cuda-memory-pool-byte-size={gpu}:{pool}" for gpu in range(visible_gpus())]
        return options

    def _restricted_apis(self) -> list[str]:
        """tritonserver's own walls behind the guard's: the logging and trace settings (and the
        repository API while model control is closed) answer only a key no client gets; shared
        memory only this server's shm key (:mod:`sfdeploy.shmkey`)."""
        restricted = ",".join(["logging", "trace", *([] if self.allow_model_control else ["model-repository"])])
        return [f"--http-restricted-api={restricted}:{ADMIN_HEADER}={self._key}",
                f"--grpc-restricted-protocol={restricted}:{ADMIN_HEADER}={self._key}",
                f"--http-restricted-api=shared-memory:{shmkey.HEADER}={self._shm_key}",
                f"--grpc-restricted-protocol=shared-memory:{shmkey.HEADER}={self._shm_key}"]

    def _serving_repository(self, models: list[str]) -> Path:
        """A repository of links to the chosen models only: what the server loads at start when
        model control is closed (tritonserver's ``none`` mode loads its whole repository)."""
        served = Path(self._tmp.name) / "repository"
        served.mkdir()
        for name in models:
            (served / name).symlink_to(Path(self.repo).resolve() / name, target_is_directory=True)
        return served

    def _start_guard(self, upstream_http: int, upstream_grpc: int) -> None:
        """The guard on the public ports, in a session of its own (a Ctrl-C in the terminal is for
        sfdeploy, which stops it); waits until it listens. The shared-memory key is published first,
        for sfdeploy's clients of this user on this machine (``infer --shm``; removed by :meth:`stop`)."""
        for port in (self.http_port, self.grpc_port):
            shmkey.write_key(port, self._shm_key)
        config = GuardConfig(
            host=self.host, http_port=self.http_port, grpc_port=self.grpc_port, upstream_http=upstream_http,
            upstream_grpc=upstream_grpc, http_limits=self.limits, grpc_limit=max(self.limits.values()),
            idle_timeout_s=self.idle_timeout_s, max_connections=self.max_connections, parent_pid=os.getpid(),
            server_pid=self.process.pid, shm_prefix=self._shm_prefix, memory_budget=self.memory_budget_mb << 20,
            costs={name: VIDEO_COST if TARGET_MODEL in self._configs[name].parameters else CLIP_COST
                   for name in self.limits},
            allow_model_control=self.allow_model_control, allow_remote_shm=self.allow_remote_shm)
        env = {**os.environ, SHM_KEY_ENV: self._shm_key}  # not on its command line: any local user reads that
        with open(self.log_file, "ab") as sink:
            self.guard = subprocess.Popen([sys.executable, "-m", "sfdeploy.serving.guard", config.to_json()],
                                          stdout=subprocess.PIPE, stderr=sink, start_new_session=True, env=env)
        ready, _, _ = select.select([self.guard.stdout], [], [], 30)
        line = self.guard.stdout.readline().decode(errors="replace").strip() if ready else ""
        if line != "listening":
            raise ServingError(f"the server's front (sfdeploy.serving.guard) did not start: {line or 'no answer'}",
                               path=self.log_file, fix="pass other --http-port/--grpc-port, or read the log")

    def log_text(self) -> str:
        """The server's log so far ('' when there is none yet), for error messages and tests."""
        try:
            return Path(self.log_file).read_text(errors="replace") if self.log_file else ""
        except OSError:
            return ""

    def _wait_ready(self, models: list[str]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                errors = error_lines(self.log_text())
                raise ServingError(
                    f"tritonserver exited (code {self.process.returncode}) while starting: " + _cause(errors),
                    path=self.log_file, fix="read the server log; " + _hint(errors))
            stub = stub_failure(self.log_text())
            if stub:  # tritonserver would wait for this model forever
                raise ServingError(f"a model's python backend stub cannot start: {stub}", path=self.log_file,
                                   fix=_stub_hint(stub))
            if self.guard.poll() is not None:
                raise ServingError(f"the server's front (sfdeploy.serving.guard) exited (code "
                                   f"{self.guard.returncode}) while starting", path=self.log_file,
                                   fix="read the server log")
            if self._ready(models):
                return
            time.sleep(0.25)
        raise ServingError(f"tritonserver was not ready after {self.startup_timeout_s:.0f} s", path=self.log_file,
                           fix="read the server log; a large model may need a longer --startup-timeout")

    def _ready(self, models: list[str]) -> bool:
        base = f"http://{self.http_url}/v2"
        try:
            for path in ["/health/ready", *[f"/models/{m}/ready" for m in models]]:
                with urllib.request.urlopen(base + path, timeout=2) as response:
                    if response.status != 200:
                        return False
        except (urllib.error.URLError, OSError):
            return False
        return True

    def running(self) -> str | None:
        """None while the server and its front run; otherwise what stopped."""
        if self.process is not None and self.process.poll() is not None:
            return f"tritonserver exited (code {self.process.returncode})"
        if self.guard is not None and self.guard.poll() is not None:
            return f"the server's front (sfdeploy.serving.guard) exited (code {self.guard.returncode})"
        return None

    def memory(self) -> dict[str, float]:
        """Memory of the server's whole process tree, the guard included (see :func:`process_group_memory`)."""
        return process_group_memory(self.process.pid, *([self.guard.pid] if self.guard else []))

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask the server to shut down (SIGTERM), kill it if it does not within the timeout, then
        kill whatever is left of its process group (stubs, decode workers, the guard) and remove
        the python backend's shared-memory segments."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except OSError:  # nothing left in the group
                pass
            self.process.wait()
        if self.guard is not None:
            if self.guard.poll() is None:
                self.guard.terminate()
            self.guard.wait()
            self.guard.stdout.close()
        remove_shm(self._shm_prefix)
        for port in (self.http_port, self.grpc_port):
            shmkey.remove_key(port, self._shm_key)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stub_failure(log_text: str) -> str | None:
    """The line of the server log saying a backend stub could not start, if there is one."""
    return next((line.strip() for line in log_text.splitlines() if _STUB_FAILURE.search(line)), None)


def _stub_hint(line: str) -> str:
    if "error while loading shared libraries" in line:
        return ("the stub's shared libraries do not load for this Python: run `sfdeploy doctor` (its 'python backend "
                "stub' row names what is missing), e.g. install the python3.X shared library (libpython3.X.so)")
    return "read the server log; run `sfdeploy doctor`"


def _cause(errors: list[str]) -> str:
    """The error line that says why: a model's own load failure (with its reason) rather than the
    server's closing "failed to load all models"."""
    if not errors:
        return "no error line in its log"
    return next((line for line in reversed(errors) if re.search(r"failed to load '[^']+' version", line)), errors[-1])


def _hint(errors: list[str]) -> str:
    text = " ".join(errors)
    if "Address already in use" in text:
        return "a port is in use: pass other --http-port/--grpc-port/--metrics-port"
    if "; fix: " in text:  # the model said what to do
        return "do what the model's error says"
    if "failed to load" in text or "ModuleNotFoundError" in text:
        return "a model failed to load: regenerate the repository with `sfdeploy repo`, check `sfdeploy doctor`"
    return "check `sfdeploy doctor`"
