"""The gRPC (HTTP/2) half of the server's front (:mod:`sfdeploy.serving.guard`): frames are forwarded
both ways as they come; the length prefix of each request message is read before its bytes go on,
and a call whose message is over the limit (or compressed) is answered ``RESOURCE_EXHAUSTED`` with
the reason and cancelled on the server's side, which never receives it. Nothing is decoded but
frame headers and those prefixes; the one header block written here is HPACK literals, which leave
the client's decoding table as the server's encoder expects it."""

from __future__ import annotations

import socket
import threading
import time

from sfdeploy.endpoints import LOOPBACK
from sfdeploy.serving.guard.common import (
    CHUNK,
    HEADER_TIMEOUT_S,
    Closed,
    GuardConfig,
    Reader,
    read_frame,
    send,
    send_parts,
    take,
    too_large,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 7, 8, 9
END_STREAM, END_HEADERS, PADDED = 0x1, 0x4, 0x8
CANCEL, NO_ERROR = 0x8, 0x0
RESOURCE_EXHAUSTED = 8


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """One HTTP/2 frame: 9-byte header (length, type, flags, stream) then ``payload``."""
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
        """Check the client's connection preface, connect to tritonserver's private gRPC port, and
        forward both ways (server to client on a thread of its own) until either side ends; then
        close both."""
        reader = Reader(self.client)
        try:
            self.client.settimeout(min(HEADER_TIMEOUT_S, self.config.idle_timeout_s))
            if take(reader, len(PREFACE)) != PREFACE:
                return
            self.upstream = socket.create_connection((LOOPBACK, self.config.upstream_grpc), timeout=10)
            self.upstream.settimeout(None)
            self.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            send(self.upstream, PREFACE)
            threading.Thread(target=self.server_to_client, daemon=True, name="guard-grpc-s2c").start()
            self.client_to_server(reader)
        except (Closed, OSError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        """Shut both sockets down, which also ends the other direction's thread."""
        for sock in (self.client, self.upstream):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def client_to_server(self, reader: Reader) -> None:
        """Forward the client's frames, batched (:meth:`flush`), following each request's messages
        (:meth:`check`) and dropping the DATA of refused calls; waking every second to close an idle
        connection (:meth:`idle`)."""
        self.client.settimeout(1.0)  # a tick to check for idleness
        while True:
            if len(reader.buffer) < 9 or self.pending_bytes > CHUNK or len(self.pending) > 500:  # a read may wait
                self.flush()
            try:
                header, kind, flags, stream, payload = read_frame(reader)
            except Closed as exc:
                if "timed out" not in str(exc):
                    raise
                self.idle()  # raises Closed once nothing was in flight for the idle timeout
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
            send_parts(self.upstream, *self.pending)
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
        """End call ``stream``: the client gets RESOURCE_EXHAUSTED with ``message`` first, then the
        server's half is reset (CANCEL), so that it never receives the oversized message."""
        self.flush()  # the frames before this one go first
        with self.lock:
            self.refused.add(stream)
            self.open.discard(stream)
            self.messages.pop(stream, None)
        # The client's answer first: cancelled, the server ends the call its own way ("Unable to parse
        # request", INTERNAL), and that must not reach the client before the reason.
        self.inject(grpc_refusal(stream, RESOURCE_EXHAUSTED, message))
        send(self.upstream, frame(RST_STREAM, 0, stream, CANCEL.to_bytes(4, "big")))

    def inject(self, data: bytes) -> None:
        """Send frames of our own to the client: only after the server's SETTINGS went first, and
        never inside a header block of the server's (HPACK state is shared)."""
        self.server_spoke.wait(HEADER_TIMEOUT_S)
        with self.to_client:
            send(self.client, data)

    def idle(self) -> bool:
        """True (and the connection told to go away) when nothing was in flight for the idle timeout."""
        with self.lock:
            busy = bool(self.open)
        if busy or time.monotonic() - self.active < self.config.idle_timeout_s:
            return False
        self.inject(frame(GOAWAY, 0, 0, self.last_stream.to_bytes(4, "big") + NO_ERROR.to_bytes(4, "big")))
        time.sleep(0.5)
        raise Closed("idle")

    def server_to_client(self) -> None:
        """Forward the server's frames to the client, keeping header blocks whole (no injected frame
        between a HEADERS and its CONTINUATIONs), and note which calls ended, for the idle timeout."""
        reader = Reader(self.upstream)
        held = False
        try:
            while True:
                header, kind, flags, stream, payload = read_frame(reader)
                if kind == HEADERS and not flags & END_HEADERS and not held:
                    self.to_client.acquire()
                    held = True
                if held:
                    send_parts(self.client, header, payload)
                else:
                    with self.to_client:
                        send_parts(self.client, header, payload)
                if held and kind in (HEADERS, CONTINUATION) and flags & END_HEADERS:
                    self.to_client.release()
                    held = False
                self.server_spoke.set()
                if (kind == HEADERS and flags & END_STREAM) or kind == RST_STREAM:
                    with self.lock:
                        self.open.discard(stream)
                    self.active = time.monotonic()
        except (Closed, OSError):
            pass
        finally:
            if held:
                self.to_client.release()
            self.close()


