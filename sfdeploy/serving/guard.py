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

Watchdog: this process also watches the sfdeploy process that started it and the tritonserver it
fronts. When either is gone it kills the server's process group (tritonserver, its backend stubs
and their decode workers), removes the python backend's shared-memory segments and exits, so a
killed ``sfdeploy serve`` or a crashed tritonserver leaves nothing running, bound or mapped.

Run as ``python -m sfdeploy.serving.guard CONFIG_JSON`` (:class:`GuardConfig`); it prints
``listening`` once both ports are bound, or an ``error:`` line and exits 2.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HEADER_TIMEOUT_S = 10.0  # to send a request head (HTTP) or the connection preface (gRPC); at most the idle timeout
BODY_TIMEOUT_S = 60.0  # the longest pause while a client sends a body
DRAIN_TIMEOUT_S = 30.0  # how long a refused body is read (and dropped) so the client sees the answer
MAX_HEAD = 64 * 1024
OTHER_LIMIT = 1 << 20  # bodies of paths other than a model's infer (health, metadata, shared-memory registration)
CHUNK = 1 << 20
SHM_DIR = Path("/dev/shm")
_INFER_PATH = re.compile(r"^/v2/models/([^/?]+)(?:/versions/[^/?]+)?/infer(?:\?.*)?$")


@dataclass
class GuardConfig:
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
    extra: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> GuardConfig:
        return cls(**json.loads(text))


def mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


# --- HTTP/1.1 ---------------------------------------------------------------------------------

class _Closed(Exception):
    """The peer closed, timed out, or broke the protocol: the connection ends."""


def _recv(sock: socket.socket, size: int = CHUNK) -> bytes:
    try:
        data = sock.recv(size)
    except (TimeoutError, OSError) as exc:
        raise _Closed(str(exc)) from exc
    if not data:
        raise _Closed("closed")
    return data


def _send(sock: socket.socket, data: bytes | memoryview) -> None:
    try:
        sock.sendall(data)
    except OSError as exc:
        raise _Closed(str(exc)) from exc


def _send_parts(sock: socket.socket, *parts: bytes) -> None:
    """Several buffers in one system call where the kernel takes them all (no joined copy)."""
    try:
        sent = sock.sendmsg(parts)
    except OSError as exc:
        raise _Closed(str(exc)) from exc
    if sent < sum(len(part) for part in parts):
        _send(sock, b"".join(parts)[sent:])


class _Reader:
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
                self.buffer += _recv(self.sock)
            except _Closed:
                return None
        deadline = None if complete_s is None else time.monotonic() + complete_s
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > MAX_HEAD:
                raise _HttpRefusal(431, "the request head is over 64 KiB")
            if deadline is not None:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            self.buffer += _recv(self.sock)
        head = bytes(self.buffer[:end + 4])
        del self.buffer[:end + 4]
        return head

    def line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > MAX_HEAD:
                raise _Closed("chunk line too long")
            self.buffer += _recv(self.sock)
        line = bytes(self.buffer[:end + 2])
        del self.buffer[:end + 2]
        return line

    def copy(self, size: int, to: socket.socket | None) -> None:
        """Move ``size`` bytes to ``to`` (None: drop them): what is buffered, then straight from
        the socket through one reused buffer (a body of hundreds of MB is never held whole)."""
        if self.buffer:
            part = min(size, len(self.buffer))
            if to is not None:
                _send(to, memoryview(self.buffer)[:part])
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
                raise _Closed(str(exc)) from exc
            if not got:
                raise _Closed("closed")
            if to is not None:
                _send(to, self.scratch[:got])
            size -= got

    def rest(self, to: socket.socket) -> None:
        """Everything until the peer closes."""
        if self.buffer:
            _send(to, self.buffer)
            self.buffer.clear()
        while True:
            try:
                _send(to, _recv(self.sock))
            except _Closed:
                return


class _HttpRefusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_REASONS = {400: "Bad Request", 413: "Payload Too Large", 415: "Unsupported Media Type", 431:
            "Request Header Fields Too Large", 501: "Not Implemented", 503: "Service Unavailable"}


def http_error(status: int, message: str) -> bytes:
    """A response as Triton words its own errors: JSON ``{"error": ...}``, and the connection closes."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """(start line, [(lower-case name, value)])."""
    lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _HttpRefusal(400, f"malformed header line {line[:80]!r}")
        headers.append((name.lower(), value.strip()))
    return lines[0], headers


def _value(headers: list[tuple[str, str]], name: str) -> str | None:
    values = [v for n, v in headers if n == name]
    if len(values) > 1 and name in ("content-length", "transfer-encoding"):
        raise _HttpRefusal(400, f"more than one {name} header")
    return values[0] if values else None


def _body_size(headers: list[tuple[str, str]]) -> tuple[int | None, bool]:
    """(Content-Length or None, chunked)."""
    length, coding = _value(headers, "content-length"), _value(headers, "transfer-encoding")
    if length is not None and coding is not None:
        raise _HttpRefusal(400, "both Content-Length and Transfer-Encoding")
    if coding is not None and coding.lower() != "chunked":
        raise _HttpRefusal(501, f"Transfer-Encoding {coding!r} is not supported (send the body with Content-Length)")
    if length is not None and not length.isdigit():
        raise _HttpRefusal(400, f"bad Content-Length {length!r}")
    return (int(length) if length is not None else None), coding is not None


class HttpConnection:
    """One client connection: requests checked, forwarded to tritonserver, answers sent back."""

    def __init__(self, client: socket.socket, config: GuardConfig) -> None:
        self.client = client
        self.config = config
        self.reader = _Reader(client)
        self.upstream: socket.socket | None = None
        self.upstream_reader: _Reader | None = None

    def limit(self, target: str) -> tuple[int, str]:
        """The largest body ``target`` accepts, and what to call it in an error."""
        match = _INFER_PATH.match(target)
        if match and match.group(1) in self.config.http_limits:
            return self.config.http_limits[match.group(1)], f"model '{match.group(1)}'"
        if match or target.startswith("/v2/repository"):
            return max(self.config.http_limits.values(), default=OTHER_LIMIT), "this server"
        return OTHER_LIMIT, "this endpoint"

    def run(self) -> None:
        try:
            while self.one_request():
                pass
        except _HttpRefusal as refusal:
            self.refuse(refusal, None)
        except _Closed:
            pass
        finally:
            for sock in (self.client, self.upstream):
                if sock is not None:
                    sock.close()

    def one_request(self) -> bool:
        """Serve one request; False when the connection is to end."""
        head = self.reader.head(self.config.idle_timeout_s, min(HEADER_TIMEOUT_S, self.config.idle_timeout_s))
        if head is None:
            return False
        start, headers = _parse_head(head)
        parts = start.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _HttpRefusal(400, f"not an HTTP/1.x request line: {start[:80]!r}")
        method, target, version = parts
        length, chunked = _body_size(headers)
        limit, owner = self.limit(target)
        coding = _value(headers, "content-encoding")
        if coding is not None and coding.lower() != "identity":
            raise _HttpRefusal(415, f"compressed request bodies (Content-Encoding: {coding}) are not accepted: "
                                    "inflated, their size is unknown until they are in memory; send them uncompressed")
        if length is not None and length > limit:
            self.refuse(_HttpRefusal(413, too_large(length, limit, owner)), length)
            return False
        forwarded = [(n, v) for n, v in headers if n != "expect"]
        if any(n == "expect" and v.lower() == "100-continue" for n, v in headers):
            _send(self.client, b"HTTP/1.1 100 Continue\r\n\r\n")
        self.connect()
        _send(self.upstream, (start + "\r\n" + "".join(f"{n}: {v}\r\n" for n, v in forwarded) + "\r\n").encode(
            "latin-1"))
        self.client.settimeout(BODY_TIMEOUT_S)
        if chunked:
            self.forward_chunks(limit, owner)
        elif length:
            self.reader.copy(length, self.upstream)
        keep = self.forward_response(method)
        wants_close = (_value(headers, "connection") or "").lower() == "close" or (
            version == "HTTP/1.0" and (_value(headers, "connection") or "").lower() != "keep-alive")
        return keep and not wants_close

    def forward_chunks(self, limit: int, owner: str) -> None:
        total = 0
        while True:
            line = self.reader.line()
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise _Closed("bad chunk size") from None
            total += size
            if total > limit:  # the part sent so far goes nowhere: this upstream connection ends
                self.upstream.close()
                self.upstream = None
                raise _HttpRefusal(413, too_large(total, limit, owner, more=True))
            _send(self.upstream, line)
            if size == 0:  # trailers, then a blank line
                while (trailer := self.reader.line()) != b"\r\n":
                    _send(self.upstream, trailer)
                _send(self.upstream, b"\r\n")
                return
            self.reader.copy(size + 2, self.upstream)

    def forward_response(self, method: str) -> bool:
        """Copy one response (after any interim 1xx ones); True if the connection may go on."""
        assert self.upstream_reader is not None
        while True:
            head = self.upstream_reader.head(None, None)
            if head is None:
                raise _Closed("tritonserver closed the connection")
            _send(self.client, head)
            start, headers = _parse_head(head)
            status = int(start.split(" ")[1])
            if status >= 200:
                break
        length, chunked = _body_size(headers)
        if method == "HEAD" or status in (204, 304):
            pass
        elif chunked:
            while True:
                line = self.upstream_reader.line()
                _send(self.client, line)
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while (trailer := self.upstream_reader.line()) != b"\r\n":
                        _send(self.client, trailer)
                    _send(self.client, b"\r\n")
                    break
                self.upstream_reader.copy(size + 2, self.client)
        elif length is not None:
            self.upstream_reader.copy(length, self.client)
        else:
            self.upstream_reader.rest(self.client)
            return False
        return (_value(headers, "connection") or "").lower() != "close"

    def connect(self) -> None:
        if self.upstream is None:
            try:
                self.upstream = socket.create_connection(("127.0.0.1", self.config.upstream_http), timeout=10)
            except OSError as exc:
                raise _HttpRefusal(503, f"tritonserver is not reachable ({exc.strerror})") from exc
            self.upstream.settimeout(None)  # an inference may take long; tritonserver is trusted
            self.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.upstream_reader = _Reader(self.upstream)

    def refuse(self, refusal: _HttpRefusal, pending: int | None) -> None:
        """Answer with the error, then read (and drop) the rest of the body for a while, so that a
        client still sending it gets to read the answer instead of a reset connection."""
        try:
            _send(self.client, http_error(refusal.status, refusal.message))
            self.client.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            left = pending - len(self.reader.buffer) if pending is not None else 1 << 62
            while left > 0 and time.monotonic() < deadline:
                self.client.settimeout(max(0.01, deadline - time.monotonic()))
                left -= len(_recv(self.client, min(CHUNK, left)))
        except (_Closed, OSError):
            pass


def too_large(size: int, limit: int, owner: str, more: bool = False) -> str:
    return (f"the request body is {'over ' if more else ''}{mb(size)}, over the {mb(limit)} that {owner} accepts; "
            "it was refused before it was read. Send less per request (fewer videos or clips), or write the "
            "repository with a larger `sfdeploy repo --max-video-mb` / `--max-batch`")


# --- gRPC (HTTP/2) ----------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 7, 8, 9
END_STREAM, END_HEADERS, PADDED = 0x1, 0x4, 0x8
CANCEL, NO_ERROR = 0x8, 0x0
RESOURCE_EXHAUSTED = 8
MAX_FRAME = 1 << 24


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload


def _hpack_int(value: int, prefix: int = 7) -> bytes:
    top = (1 << prefix) - 1
    if value < top:
        return bytes((value,))
    out, value = bytearray((top,)), value - top
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal header field without indexing: the peer's dynamic table is left as it is."""
    return b"\x00" + _hpack_int(len(name)) + name + _hpack_int(len(value)) + value


def grpc_refusal(stream: int, status: int, message: str) -> bytes:
    """A trailers-only gRPC response ending the call, then RST_STREAM(NO_ERROR) to stop its upload."""
    encoded = "".join(c if " " <= c <= "~" and c != "%" else "".join(f"%{b:02X}" for b in c.encode())
                      for c in message).encode()
    block = (b"\x88" + _literal(b"content-type", b"application/grpc")  # 0x88: static ':status: 200'
             + _literal(b"grpc-status", str(status).encode()) + _literal(b"grpc-message", encoded))
    return (frame(HEADERS, END_STREAM | END_HEADERS, stream, block)
            + frame(RST_STREAM, 0, stream, NO_ERROR.to_bytes(4, "big")))


def _read_frame(reader: _Reader) -> tuple[bytes, int, int, int, bytes]:
    """(9-byte header, type, flags, stream, payload); a timeout leaves a partly read frame buffered."""
    _fill(reader, 9)
    length = int.from_bytes(reader.buffer[:3], "big")
    if length > MAX_FRAME:
        raise _Closed("frame too large")
    data = _take(reader, 9 + length)
    return data[:9], data[3], data[4], int.from_bytes(data[5:9], "big") & 0x7FFFFFFF, data[9:]


def _fill(reader: _Reader, size: int) -> None:
    while len(reader.buffer) < size:
        reader.buffer += _recv(reader.sock)


def _take(reader: _Reader, size: int) -> bytes:
    _fill(reader, size)
    data = bytes(reader.buffer[:size])
    del reader.buffer[:size]
    return data


class _Message:
    """Where a stream is in its request messages: the bytes of a length prefix so far, then the
    message bytes still to come."""

    def __init__(self) -> None:
        self.prefix = b""
        self.remaining = 0


class GrpcConnection:
    """One HTTP/2 client connection, frames forwarded both ways, request messages checked."""

    def __init__(self, client: socket.socket, config: GuardConfig) -> None:
        self.client = client
        self.config = config
        self.upstream: socket.socket | None = None
        self.to_client = threading.Lock()  # held for a whole server header block: nothing is injected inside it
        self.server_spoke = threading.Event()  # the server's SETTINGS went first: frames may be injected after
        self.lock = threading.Lock()
        self.messages: dict[int, _Message] = {}
        self.refused: set[int] = set()
        self.open: set[int] = set()
        self.last_stream = 0
        self.active = time.monotonic()
        self.pending: list[bytes] = []  # frames read from the client, not yet sent on
        self.pending_bytes = 0

    def run(self) -> None:
        reader = _Reader(self.client)
        try:
            self.client.settimeout(min(HEADER_TIMEOUT_S, self.config.idle_timeout_s))
            if _take(reader, len(PREFACE)) != PREFACE:
                return
            self.upstream = socket.create_connection(("127.0.0.1", self.config.upstream_grpc), timeout=10)
            self.upstream.settimeout(None)
            self.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _send(self.upstream, PREFACE)
            threading.Thread(target=self.server_to_client, daemon=True, name="guard-grpc-s2c").start()
            self.client_to_server(reader)
        except (_Closed, OSError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def client_to_server(self, reader: _Reader) -> None:
        self.client.settimeout(1.0)  # a tick to check for idleness
        while True:
            if len(reader.buffer) < 9 or self.pending_bytes > CHUNK or len(self.pending) > 500:  # a read may wait
                self.flush()
            try:
                header, kind, flags, stream, payload = _read_frame(reader)
            except _Closed as exc:
                if "timed out" not in str(exc):
                    raise
                self.idle()  # raises _Closed once nothing was in flight for the idle timeout
                continue
            if kind in (HEADERS, DATA):
                self.active = time.monotonic()
            if kind == HEADERS and stream not in self.messages:
                with self.lock:
                    self.open.add(stream)
                    self.messages[stream] = _Message()
                    self.last_stream = max(self.last_stream, stream)
            elif kind == DATA:
                if stream in self.refused or not self.check(stream, flags, payload):
                    if payload:  # the server never sees these bytes: give the client its window back
                        self.inject(frame(WINDOW_UPDATE, 0, 0, len(payload).to_bytes(4, "big")))
                    continue
            elif kind == RST_STREAM:
                with self.lock:
                    self.open.discard(stream)
            if flags & END_STREAM and kind in (HEADERS, DATA) or kind == RST_STREAM:
                self.messages.pop(stream, None)
            self.pending += (header, payload)
            self.pending_bytes += len(header) + len(payload)

    def flush(self) -> None:
        """Send the frames read so far in one system call: a large message comes in thousands of
        small DATA frames, and one call each would cost more than the copying."""
        if self.pending:
            _send_parts(self.upstream, *self.pending)
            self.pending.clear()
            self.pending_bytes = 0

    def check(self, stream: int, flags: int, payload: bytes) -> bool:
        """Follow the request messages in a DATA frame; False (and the call refused) for one over the limit."""
        state = self.messages.setdefault(stream, _Message())
        data = memoryview(payload)
        if flags & PADDED:
            data = data[1:len(data) - payload[0]] if payload else data
        while len(data):
            if state.remaining:
                step = min(state.remaining, len(data))
                state.remaining -= step
                data = data[step:]
                continue
            need = 5 - len(state.prefix)
            state.prefix += bytes(data[:need])
            data = data[need:]
            if len(state.prefix) < 5:
                break
            compressed, size = state.prefix[0], int.from_bytes(state.prefix[1:5], "big")
            state.prefix, state.remaining = b"", size
            why = None
            if compressed:
                why = ("compressed request messages are not accepted: inflated, their size is unknown until they are "
                       "in memory; send them uncompressed")
            elif size > self.config.grpc_limit:
                why = too_large(size, self.config.grpc_limit, "this server").replace("request body", "request message")
            if why:
                self.refuse(stream, why)
                return False
        return True

    def refuse(self, stream: int, message: str) -> None:
        self.flush()  # the frames before this one go first
        with self.lock:
            self.refused.add(stream)
            self.open.discard(stream)
            self.messages.pop(stream, None)
        # The client's answer first: cancelled, the server ends the call its own way ("Unable to parse
        # request", INTERNAL), and that must not reach the client before the reason.
        self.inject(grpc_refusal(stream, RESOURCE_EXHAUSTED, message))
        _send(self.upstream, frame(RST_STREAM, 0, stream, CANCEL.to_bytes(4, "big")))

    def inject(self, data: bytes) -> None:
        self.server_spoke.wait(HEADER_TIMEOUT_S)
        with self.to_client:
            _send(self.client, data)

    def idle(self) -> bool:
        """True (and the connection told to go away) when nothing was in flight for the idle timeout."""
        with self.lock:
            busy = bool(self.open)
        if busy or time.monotonic() - self.active < self.config.idle_timeout_s:
            return False
        self.inject(frame(GOAWAY, 0, 0, self.last_stream.to_bytes(4, "big") + NO_ERROR.to_bytes(4, "big")))
        time.sleep(0.5)
        raise _Closed("idle")

    def server_to_client(self) -> None:
        reader = _Reader(self.upstream)
        held = False
        try:
            while True:
                header, kind, flags, stream, payload = _read_frame(reader)
                if kind == HEADERS and not flags & END_HEADERS and not held:
                    self.to_client.acquire()
                    held = True
                if held:
                    _send_parts(self.client, header, payload)
                else:
                    with self.to_client:
                        _send_parts(self.client, header, payload)
                if held and kind in (HEADERS, CONTINUATION) and flags & END_HEADERS:
                    self.to_client.release()
                    held = False
                self.server_spoke.set()
                if (kind == HEADERS and flags & END_STREAM) or kind == RST_STREAM:
                    with self.lock:
                        self.open.discard(stream)
                    self.active = time.monotonic()
        except (_Closed, OSError):
            pass
        finally:
            if held:
                self.to_client.release()
            self.close()


# --- serving, and the watchdog ----------------------------------------------------------------

def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart binds while old connections linger
    sock.bind((host, port))
    sock.listen(128)
    return sock


def serve(sock: socket.socket, handler: type, config: GuardConfig, slots: threading.BoundedSemaphore) -> None:
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
    removing its shared memory."""
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


def main(argv: list[str]) -> int:
    config = GuardConfig.from_json(argv[1])
    sockets = []
    for port in (config.http_port, config.grpc_port):
        try:
            sockets.append(listen(config.host, port))
        except OSError as exc:
            print(f"error: cannot listen on {config.host}:{port}: {exc.strerror}", flush=True)
            return 2
    slots = threading.BoundedSemaphore(config.max_connections)
    for sock, handler in zip(sockets, (HttpConnection, GrpcConnection), strict=True):
        threading.Thread(target=serve, args=(sock, handler, config, slots), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("listening", flush=True)
    watch(config)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
