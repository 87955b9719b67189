"""The front of the server ``sfdeploy serve`` starts: request size, timeouts and connection limits
at the protocol layer, and a watchdog so that nothing is left behind.

Why it exists. tritonserver 2.51 (nvidia-pytriton 0.7.0) reads a whole request into memory before
any model sees it and has no option to cap it (``--http-max-input-size`` came in later releases;
its gRPC limit is fixed at 2 GB): a 1 GiB HTTP upload took 8 GB before the model refused it. It
has no header or idle timeout either. So tritonserver listens on private loopback ports, and this
process, one per server, listens on the public ones and forwards, unchanged, what passes:

* HTTP/1.1: a request head (at most 64 KiB, read within :data:`HEADER_TIMEOUT_S`) whose body is
  over the limit of its path is answered ``413`` before the body is read (the body is then
  drained, not kept, so that the client sees the answer); the limit of ``/v2/models/<m>/infer``
  is what model ``m`` accepts (``GuardConfig.http_limits``), that of any other path
  :data:`OTHER_LIMIT`. A compressed body (``Content-Encoding``) is refused with ``415``: inflated,
  it would escape the limit. ``Expect: 100-continue`` is answered here.
* gRPC (HTTP/2): frames are forwarded as they come; the 5-byte length prefix of each request
  message is read before its bytes go on, and a message over ``grpc_limit`` (or compressed) ends
  its call with ``RESOURCE_EXHAUSTED`` and the reason, and is reset on the server's side, which
  never receives it.
* Both: a connection with nothing in flight for ``idle_timeout_s`` is closed (gRPC: after a
  GOAWAY, so the client reconnects cleanly), and connections beyond ``max_connections`` are
  refused (HTTP ``503``).
* Shared memory (system and CUDA: register, unregister, status): tritonserver writes outputs into
  whatever region a client names, so these calls pass only with the server's key
  (:mod:`sfdeploy.shmkey`, given to this process in its environment, never on its command line)
  and only from a loopback peer unless ``allow_remote_shm``; else HTTP ``403`` / gRPC
  ``PERMISSION_DENIED`` with the reason (tritonserver checks the key again). To see each gRPC
  call's path and metadata, every client header block is decoded (one HPACK decoder per
  connection, in order), its frames still forwarded unchanged.
* Errors of the right class: closed gRPC control calls (repository index, load, unload unless
  ``allow_model_control``; logging and trace always) are answered ``PERMISSION_DENIED`` here, not
  tritonserver's ``UNAVAILABLE``, which clients retry (over HTTP tritonserver's own ``403``
  stands); tritonserver's ``500`` for a request body it cannot parse becomes ``400``
  (:func:`~sfdeploy.serving.guard.http1.client_fault`).

Watchdog: this process also watches the sfdeploy process that started it and the tritonserver it
fronts. When either is gone it kills the server's process group (tritonserver, its backend stubs
and their decode workers), removes the python backend's shared-memory segments and the server's
shared-memory key files (:mod:`sfdeploy.shmkey`) and exits, so a killed ``sfdeploy serve`` or a
crashed tritonserver leaves nothing running, bound or mapped.

Run as ``python -m sfdeploy.serving.guard CONFIG_JSON`` (:class:`GuardConfig`); it prints
``listening`` once both ports are bound, or an ``error:`` line and exits 2.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from sfdeploy import shmkey
from sfdeploy.serving.guard.budget import install as install_budget
from sfdeploy.serving.guard.common import SHM_KEY_ENV, GuardConfig
from sfdeploy.serving.guard.http1 import HttpConnection, http_error
from sfdeploy.serving.guard.http2 import GrpcConnection

__all__ = ["SHM_KEY_ENV", "GuardConfig", "main", "remove_shm"]

SHM_DIR = Path("/dev/shm")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (IPv6 when the host has a colon), bindable again at once
    after a restart."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart binds while old connections linger
    sock.bind((host, port))
    sock.listen(128)
    return sock


def serve(sock: socket.socket, handler: type, config: GuardConfig, slots: threading.BoundedSemaphore) -> None:
    """Accept connections on ``sock`` for ever (until it is closed), each handled by ``handler`` on
    its own thread while a slot of ``slots`` is free; beyond ``max_connections`` a connection is
    refused at once (HTTP: with a 503 that says why)."""
    while True:
        try:
            client, _ = sock.accept()
        except OSError:
            return
        if not slots.acquire(blocking=False):
            if handler is HttpConnection:
                try:
                    client.sendall(http_error(503, f"too many connections (over {config.max_connections}); retry "
                                                   "later"))
                except OSError:
                    pass
            client.close()
            continue
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def run(client: socket.socket = client) -> None:
            try:
                handler(client, config).run()
            finally:
                slots.release()

        threading.Thread(target=run, daemon=True, name=f"guard-{handler.__name__}").start()


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (``/proc/<pid>/stat`` field 22), None if it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def remove_shm(prefix: str) -> list[str]:
    """Remove the shared-memory segments whose names start with ``prefix``; returns their names."""
    removed = []
    if prefix:
        for path in SHM_DIR.glob(f"{prefix}*"):
            try:
                path.unlink()
                removed.append(path.name)
            except OSError:
                pass
    return removed


def watch(config: GuardConfig) -> None:
    """Return when the parent or the server is gone, after killing the server's process group and
    removing its shared memory and its shared-memory key files."""
    server_start = process_start(config.server_pid)
    while server_start is not None:
        if os.getppid() != config.parent_pid or process_start(config.server_pid) != server_start:
            break
        time.sleep(0.25)
    try:
        os.killpg(config.server_pid, signal.SIGKILL)  # tritonserver, the stubs, their decode workers
    except OSError:
        pass
    remove_shm(config.shm_prefix)
    for port in (config.http_port, config.grpc_port):  # a killed `serve` cannot remove its key files itself
        shmkey.remove_key(port, config.shm_key)


def main(argv: list[str]) -> int:
    """The guard process (``python -m sfdeploy.serving.guard CONFIG_JSON``): bind both public ports,
    say ``listening``, forward until the parent or the server is gone, then clean up (see the module
    docstring). 2 when a port cannot be bound."""
    config = GuardConfig.from_json(argv[1])
    config.shm_key = os.environ.pop(SHM_KEY_ENV, "")  # not on the command line: any local user reads that
    sockets = []
    for port in (config.http_port, config.grpc_port):
        try:
            sockets.append(listen(config.host, port))
        except OSError as exc:
            print(f"error: cannot listen on {config.host}:{port}: {exc.strerror}", flush=True)
            return 2
    install_budget(config.memory_budget)
    slots = threading.BoundedSemaphore(config.max_connections)
    for sock, handler in zip(sockets, (HttpConnection, GrpcConnection), strict=True):
        threading.Thread(target=serve, args=(sock, handler, config, slots), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("listening", flush=True)
    watch(config)
    return 0
