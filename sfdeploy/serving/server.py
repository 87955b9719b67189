"""Start and stop the real tritonserver (the one in ``nvidia-pytriton``) on a model repository.

:class:`TritonServer` checks the ports first, builds the python-backend directory for this
Python, starts the server bound to 127.0.0.1 (unless told otherwise) with the current virtual
environment first on ``PATH`` (that is how the backend stub finds sfdeploy, numpy, onnxruntime,
torch), loads the python-backend models of the repository, and waits until they are ready. If
the server exits instead, the error names the server's own error line from its log.

The server runs in its own process group, so a Ctrl-C in the terminal reaches sfdeploy first,
which then shuts the server down cleanly.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfdeploy.errors import InputError, ServingError
from sfdeploy.serving.config import TARGET_MODEL, parse_config, python_shm_sizes
from sfdeploy.serving.install import find_tritonserver, make_backend_dir

log = logging.getLogger("sfdeploy")

# E-lines the server prints on every machine without a GPU; they are not why it failed.
_BENIGN = ("CudaDriverHelper has not been initialized", "DCGM", "NVML", "GPU metrics")
_ERROR_LINE = re.compile(r"^(E\d{4} |error: |.*failed to load|.*Address already in use|.*Unexpected)")


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


def stub_passes_bytes() -> bool:
    """Whether the python backend stub (nvidia-pytriton's, built against numpy 1.x) can pass BYTES
    tensors in this environment: not under numpy 2 (see :mod:`sfdeploy.serving.tensors`, whose
    probe the video models run at load time; this is the same rule, known before the server starts)."""
    return int(_numpy_version().split(".")[0]) < 2


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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
    repo: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    models: list[str] | None = None  # default: every python-backend model of the repository
    startup_timeout_s: float = 180.0
    log_file: Path | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # model -> why it is not loaded

    def __post_init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._configs: dict[str, Any] = {}

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

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
        models = self._choose_models()
        shm_default, shm_growth = python_shm_sizes([self._configs[m] for m in models])
        for label, port in (("--http-port", self.http_port), ("--grpc-port", self.grpc_port),
                            ("--metrics-port", self.metrics_port)):
            if not port_free(self.host, port):
                raise ServingError(f"port {port} on {self.host} is already in use", fix=f"pass another {label}, "
                                   "or stop the program using it")
        install = find_tritonserver()
        self._tmp = tempfile.TemporaryDirectory(prefix="sfdeploy-triton-")
        backends = make_backend_dir(install, Path(self._tmp.name) / "backends")
        if self.log_file is None:  # kept after stop(): it is where a failure is explained
            handle, name = tempfile.mkstemp(prefix="sfdeploy-tritonserver-", suffix=".log")
            os.close(handle)
            self.log_file = Path(name)
        command = [
            str(install.binary),
            f"--model-repository={Path(self.repo).resolve()}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--model-control-mode=explicit", *[f"--load-model={m}" for m in models],
            "--strict-readiness=true", "--exit-on-error=true", "--exit-timeout-secs=5",
            f"--backend-config=python,shm-default-byte-size={shm_default}",
            f"--backend-config=python,shm-growth-byte-size={shm_growth}",
        ]
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(install.libs), env.get("LD_LIBRARY_PATH")) if p)
        # The python-backend stub takes its interpreter (and so its packages) from PATH.
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        log.info("starting tritonserver on %s (http %d, grpc %d) with %s", self.host, self.http_port,
                 self.grpc_port, ", ".join(models))
        with open(self.log_file, "wb") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        try:
            self._wait_ready(models)
        except BaseException:
            self.stop()
            raise
        self.loaded = models
        return self

    def log_text(self) -> str:
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
                    f"tritonserver exited (code {self.process.returncode}) while starting: "
                    + (errors[-1] if errors else "no error line in its log"),
                    path=self.log_file, fix="read the server log; " + _hint(errors))
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

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask the server to shut down (SIGTERM), then kill it if it does not within the timeout."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _hint(errors: list[str]) -> str:
    text = " ".join(errors)
    if "Address already in use" in text:
        return "a port is in use: pass other --http-port/--grpc-port/--metrics-port"
    if "; fix: " in text:  # the model said what to do
        return "do what the model's error says"
    if "failed to load" in text or "ModuleNotFoundError" in text:
        return "a model failed to load: regenerate the repository with `sfdeploy repo`, check `sfdeploy doctor`"
    return "check `sfdeploy doctor`"
