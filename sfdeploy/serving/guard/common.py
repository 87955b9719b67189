"""What the two halves of the server's front (:mod:`sfdeploy.serving.guard`) share: its settings,
its limits, and blocking socket reads and writes that turn every failure, timeout or close into
:class:`Closed` (the connection ends)."""

from __future__ import annotations

import hmac
import json
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import unquote

from sfdeploy import shmkey

HEADER_TIMEOUT_S = 10.0  # to send a request head (HTTP) or the connection preface (gRPC); at most the idle timeout
BODY_TIMEOUT_S = 60.0  # the longest pause while a client sends a body
DRAIN_TIMEOUT_S = 30.0  # how long a refused body is read (and dropped) so the client sees the answer
MAX_HEAD = 64 * 1024
OTHER_LIMIT = 1 << 20  # bodies of paths other than a model's infer (health, metadata, shared-memory registration)
CHUNK = 1 << 20  # bytes per read
MAX_FRAME = 1 << 24  # the largest HTTP/2 frame read (the protocol's own maximum)
SHM_KEY_ENV = "SFDEPLOY_GUARD_SHM_KEY"  # how the guard gets the shared-memory key (its environment is the user's)
# Shared-memory calls (register, unregister, status; system and CUDA): the server maps the region a
# client names and writes outputs into it, so they pass only as shm_refusal says.
_SHM_PATH = re.compile(r"^/*v2/+(system|cuda)sharedmemory(/|$)", re.IGNORECASE)
SHM_METHODS = ("/inference.GRPCInferenceService/SystemSharedMemory", "/inference.GRPCInferenceService/CudaSharedMemory")


@dataclass
class GuardConfig:
    """What one guard process is told by ``sfdeploy serve``: the public and private ports, the
    request limits per model, and the processes it watches. It crosses to the guard process as JSON
    on its command line."""

    host: str
    http_port: int  # public
    grpc_port: int  # public
    upstream_http: int  # tritonserver's, on 127.0.0.1
    upstream_grpc: int
    http_limits: dict[str, int]  # model -> the largest request body it accepts, in bytes
    grpc_limit: int  # the largest gRPC request message, in bytes
    idle_timeout_s: float = 60.0
    max_connections: int = 256
    parent_pid: int = 0  # watched: when it is gone, the server goes
    server_pid: int = 0  # watched: tritonserver, leader of its process group, killed when either side is gone
    shm_prefix: str = ""  # the python backend's shared-memory segments (/dev/shm/<prefix>*), removed at the end
    memory_budget: int = 0  # bytes the requests in flight may cost at once (guard.budget); 0: no budget
    costs: dict[str, float] = field(default_factory=dict)  # model -> memory a request costs per body byte
    allow_model_control: bool = False  # gRPC repository calls pass (else refused here, PERMISSION_DENIED)
    allow_remote_shm: bool = False  # shared-memory calls from non-loopback peers pass (with the key)
    shm_key: str = ""  # the server's shared-memory key: never on the command line (environment, SHM_KEY_ENV)

    def to_json(self) -> str:
        """The form passed on the guard's command line (:meth:`from_json` reads it back): all but
        the key, which any local user could read there (``ps``)."""
        return json.dumps({**asdict(self), "shm_key": ""})

    @classmethod
    def from_json(cls, text: str) -> GuardConfig:
        """Read back what :meth:`to_json` wrote."""
        return cls(**json.loads(text))


def is_shm_path(target: str) -> bool:
    """Whether an HTTP request target is the shared-memory API, as spelled any way tritonserver may
    route it (percent-encoded, absolute form, another case)."""
    path = unquote(re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*", "", target).split("?")[0])
    return bool(_SHM_PATH.match(path))


def peer_is_loopback(sock: socket.socket) -> bool:
    """Whether the client of an accepted connection is on this machine's loopback."""
    try:
        return shmkey.is_loopback(sock.getpeername()[0])
    except (OSError, IndexError):
        return False


def shm_refusal(config: GuardConfig, port: int, loopback_peer: bool, key: str | None) -> str | None:
    """Why a shared-memory call (register, unregister, status) on public ``port`` is refused here,
    None if it passes: from a non-loopback peer unless ``allow_remote_shm``, and without this
    server's key always (tritonserver checks the key again)."""
    if not loopback_peer and not config.allow_remote_shm:
        return ("shared memory is open only to clients connected through this machine's loopback (127.0.0.1): the "
                "server writes outputs into the region a client names. Connect to 127.0.0.1, or start the server with "
                "`sfdeploy serve --allow-remote-shm`")
    if not key or not config.shm_key or not hmac.compare_digest(key.encode(), config.shm_key.encode()):
        return (f"shared memory needs this server's key (header '{shmkey.HEADER}'; gRPC metadata "
                f"'{shmkey.GRPC_HEADER}'), which `sfdeploy serve` gives only "
                f"to its user on this machine, in {shmkey.key_file(port)}; sfdeploy's client (`infer "
                "--shm`) sends it. Regions named without it are refused: they may not be the client's to write")
    return None


def mb(size: int) -> str:
    """``size`` bytes as MB for messages to users (one decimal)."""
    return f"{size / 2**20:.1f} MB"


class Refusal(Exception):
    """An HTTP request refused with ``status`` and ``message`` (the connection then ends)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def too_large(size: int, limit: int, owner: str, more: bool = False) -> str:
    """The reason a too-large request is refused, naming its size, the limit and whose limit it is,
    and how to send or allow more. ``more``: the size is only a lower bound (the body had not ended)."""
    return (f"the request body is {'over ' if more else ''}{mb(size)}, over the {mb(limit)} that {owner} accepts; "
            "it was refused before it was read. Send less per request (fewer videos or clips), or write the "
            "repository with a larger `sfdeploy repo --max-video-mb` / `--max-batch`")


class Closed(Exception):
    """The peer closed, timed out, or broke the protocol: the connection ends."""


def recv(sock: socket.socket, size: int = CHUNK) -> bytes:
    """Up to ``size`` bytes from ``sock``; a timeout, an error or the peer closing raises
    :class:`Closed`, so a caller handles every way a connection ends in one place."""
    try:
        data = sock.recv(size)
    except (TimeoutError, OSError) as exc:
        raise Closed(str(exc)) from exc
    if not data:
        raise Closed("closed")
    return data


def send(sock: socket.socket, data: bytes | memoryview) -> None:
    """All of ``data`` to ``sock``; any failure raises :class:`Closed`."""
    try:
        sock.sendall(data)
    except OSError as exc:
        raise Closed(str(exc)) from exc


def send_parts(sock: socket.socket, *parts: bytes) -> None:
    """Several buffers in one system call where the kernel takes them all (no joined copy)."""
    try:
        sent = sock.sendmsg(parts)
    except OSError as exc:
        raise Closed(str(exc)) from exc
    if sent < sum(len(part) for part in parts):
        send(sock, b"".join(parts)[sent:])


class Reader:
    """Buffered reads from one socket: heads up to a blank line, exact byte counts, chunk lines."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.scratch: memoryview | None = None

    def head(self, idle_s: float | None, complete_s: float | None) -> bytes | None:
        """The next head (through its blank line); None if the peer closes or stays idle first."""
        self.sock.settimeout(idle_s)
        if not self.buffer:
            try:
                self.buffer += recv(self.sock)
            except Closed:
                return None
        deadline = None if complete_s is None else time.monotonic() + complete_s
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > MAX_HEAD:
                raise Refusal(431, "the request head is over 64 KiB")
            if deadline is not None:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            self.buffer += recv(self.sock)
        head = bytes(self.buffer[:end + 4])
        del self.buffer[:end + 4]
        return head

    def line(self) -> bytes:
        """The next line through its CRLF (a chunk-size line of a chunked body); :class:`Closed` when
        it grows past 64 KiB without one."""
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > MAX_HEAD:
                raise Closed("chunk line too long")
            self.buffer += recv(self.sock)
        line = bytes(self.buffer[:end + 2])
        del self.buffer[:end + 2]
        return line

    def copy(self, size: int, to: socket.socket | None) -> None:
        """Move ``size`` bytes to ``to`` (None: drop them): what is buffered, then straight from
        the socket through one reused buffer (a body of hundreds of MB is never held whole)."""
        if self.buffer:
            part = min(size, len(self.buffer))
            if to is not None:
                send(to, memoryview(self.buffer)[:part])
            del self.buffer[:part]
            size -= part
        if size <= 0:
            return
        if self.scratch is None:
            self.scratch = memoryview(bytearray(CHUNK))
        while size > 0:
            try:
                got = self.sock.recv_into(self.scratch, min(CHUNK, size))
            except (TimeoutError, OSError) as exc:
                raise Closed(str(exc)) from exc
            if not got:
                raise Closed("closed")
            if to is not None:
                send(to, self.scratch[:got])
            size -= got

    def rest(self, to: socket.socket) -> None:
        """Everything until the peer closes."""
        if self.buffer:
            send(to, self.buffer)
            self.buffer.clear()
        while True:
            try:
                send(to, recv(self.sock))
            except Closed:
                return


def read_frame(reader: Reader) -> tuple[bytes, int, int, int, bytes]:
    """(9-byte header, type, flags, stream, payload); a timeout leaves a partly read frame buffered."""
    fill(reader, 9)
    length = int.from_bytes(reader.buffer[:3], "big")
    if length > MAX_FRAME:
        raise Closed("frame too large")
    data = take(reader, 9 + length)
    return data[:9], data[3], data[4], int.from_bytes(data[5:9], "big") & 0x7FFFFFFF, data[9:]


def fill(reader: Reader, size: int) -> None:
    """Read until ``reader`` has at least ``size`` bytes buffered."""
    while len(reader.buffer) < size:
        reader.buffer += recv(reader.sock)


def take(reader: Reader, size: int) -> bytes:
    """The next ``size`` bytes of ``reader``, consumed."""
    fill(reader, size)
    data = bytes(reader.buffer[:size])
    del reader.buffer[:size]
    return data
