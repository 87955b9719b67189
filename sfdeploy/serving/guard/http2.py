"""The gRPC (HTTP/2) half of the server's front (:mod:`sfdeploy.serving.guard`): frames are forwarded
both ways as they come; the length prefix of each request message is read before its bytes go on,
and a call whose message is over the limit (or compressed) is answered ``RESOURCE_EXHAUSTED`` with
the reason and cancelled on the server's side, which never receives it. The client's header blocks
are decoded too (each call's ``:path`` and metadata), all through one HPACK decoder per connection,
in order, so that its table stays the server's; their frames still go on unchanged, and a call
refused by its header block (shared memory without the key or from afar, closed model control) is
answered ``PERMISSION_DENIED``, then reset on the server's side after its headers, before its
message. Nothing else is decoded but frame headers and message prefixes; the one header block
written here is HPACK literals, which leave the client's decoding table as the server's encoder
expects it."""

from __future__ import annotations

import socket
import threading
import time

from sfdeploy import shmkey
from sfdeploy.endpoints import LOOPBACK
from sfdeploy.serving.guard.budget import retry_later, shared
from sfdeploy.serving.guard.common import (
    CHUNK,
    HEADER_TIMEOUT_S,
    MAX_HEAD,
    SHM_METHODS,
    Closed,
    GuardConfig,
    Reader,
    peer_is_loopback,
    read_frame,
    send,
    send_parts,
    shm_refusal,
    take,
    too_large,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 7, 8, 9
END_STREAM, END_HEADERS, PADDED, PRIORITY, ACK = 0x1, 0x4, 0x8, 0x20, 0x1
CANCEL, NO_ERROR = 0x8, 0x0
PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNAVAILABLE = 7, 8, 14
HEADER_TABLE_SIZE = 0x1  # the SETTINGS entry that bounds the client's HPACK table
_SERVICE = "/inference.GRPCInferenceService/"
# Calls closed unless model control is open (`serve --allow-model-control`), and calls always closed
# (tritonserver's logging and trace settings can make it write files where a client says).
CONTROL_METHODS = frozenset(_SERVICE + m for m in ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"))
CLOSED_METHODS = frozenset(_SERVICE + m for m in ("LogSettings", "TraceSetting"))


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


def _fragment(flags: int, payload: bytes) -> bytes:
    """The header block fragment of a HEADERS frame: its padding and priority fields stripped."""
    start, end = 0, len(payload)
    if flags & PADDED:
        start, end = 1, len(payload) - (payload[0] if payload else len(payload) + 1)
    if flags & PRIORITY:
        start += 5
    if end < start:
        raise Closed("a HEADERS frame shorter than its padding (a protocol error)")
    return payload[start:end]


def _model_name(message: memoryview) -> str | None:
    """The model a ``ModelInferRequest`` names, from the first bytes of its message (field 1,
    ``model_name``, which protobuf writes first); None when they are not at hand or not that."""
    if len(message) < 2 or message[0] != 0x0A or message[1] > 0x7F or len(message) < 2 + message[1]:
        return None
    return bytes(message[2:2 + message[1]]).decode("utf-8", "replace")


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
        from hpack import Decoder

        self.decoder = Decoder()  # every client header block, in order (see decode)
        self.decoder.max_header_list_size = 1 << 20  # never stricter than the server, which has its own limit
        self.block: list[tuple[bytes, bytes]] = []  # the frames of a client header block not yet ended
        self.fragments: list[bytes] = []  # their header block fragments
        self.block_stream = 0
        self.loopback = peer_is_loopback(client)
        self.budget = shared()
        self.charges: dict[int, int] = {}  # stream -> what its messages are charged to the budget

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
            with self.lock:
                self.budget.give(sum(self.charges.values()))
                self.charges.clear()

    def release(self, stream: int) -> None:
        """Refund what call ``stream`` was charged: it has ended, one way or another."""
        with self.lock:
            self.budget.give(self.charges.pop(stream, 0))

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
        """Forward the client's frames, batched (:meth:`flush`), reading each call's header block
        (:meth:`header_frame`) and following its messages (:meth:`check`), dropping the DATA of
        refused calls; waking every second to close an idle
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
            if kind in (HEADERS, CONTINUATION) or self.block:
                self.header_frame(header, kind, flags, stream, payload)
                continue
            if kind == DATA:
                if stream in self.refused or not self.check(stream, flags, payload):
                    if payload:  # the server never sees these bytes: give the client its window back
                        self.inject(frame(WINDOW_UPDATE, 0, 0, len(payload).to_bytes(4, "big")))
                    continue
            elif kind == RST_STREAM:
                with self.lock:
                    self.open.discard(stream)
                self.release(stream)
            if flags & END_STREAM and kind == DATA or kind == RST_STREAM:
                self.messages.pop(stream, None)
            self.pending += (header, payload)
            self.pending_bytes += len(header) + len(payload)

    def header_frame(self, header: bytes, kind: int, flags: int, stream: int, payload: bytes) -> None:
        """Hold a client header block's frames until its last, decode the block (:meth:`decode`),
        then pass its frames on unchanged, refusing the call it opens when :meth:`call_refusal` says
        so: the server still gets the block first (its HPACK table must see every one, and a stream
        it has not seen cannot be reset), kept open, then reset."""
        if kind == HEADERS and not self.block:
            fragment = _fragment(flags, payload)
        elif kind == CONTINUATION and self.block and stream == self.block_stream:
            fragment = payload
        else:
            raise Closed("a header block interleaved with other frames (a protocol error)")
        self.block.append((header, payload))
        self.fragments.append(fragment)
        self.block_stream = stream
        if sum(len(f) for f in self.fragments) > MAX_HEAD:
            raise Closed("header block over 64 KiB")
        if not flags & END_HEADERS:
            return
        frames, fields = self.block, self.decode(b"".join(self.fragments))
        self.block, self.fragments = [], []
        ends = frames[0][0][4] & END_STREAM  # the call has no message (flag of its HEADERS frame)
        why = None
        if stream > self.last_stream:  # a new call (a block on an older stream is its trailers)
            why = self.call_refusal(fields)
            with self.lock:
                self.open.add(stream)
                self.messages[stream] = _Message()
                self.last_stream = stream
        if why and ends:  # kept open, to be reset: the server must not run a call without its message
            first = frames[0][0]
            frames[0] = (first[:4] + bytes((first[4] & ~END_STREAM,)) + first[5:], frames[0][1])
        elif ends:
            self.messages.pop(stream, None)
        for part in frames:
            self.pending += part
            self.pending_bytes += len(part[0]) + len(part[1])
        if why:
            self.refuse(stream, PERMISSION_DENIED, why)

    def decode(self, block: bytes) -> dict[bytes, bytes]:
        """A client header block's fields, through this connection's one decoder (in order, so that
        its table stays what the client's encoder and the server's decoder hold)."""
        from hpack import HPACKError

        try:
            return dict(self.decoder.decode(block, raw=True))
        except (HPACKError, ValueError, IndexError) as exc:  # the server would end the connection too
            raise Closed(f"undecodable header block ({exc})") from exc

    def call_refusal(self, fields: dict[bytes, bytes]) -> str | None:
        """Why the call a header block opens is refused here, None if it goes on: shared memory from
        afar or without the key (:func:`shm_refusal`), and control calls that are closed."""
        path = fields.get(b":path", b"").decode("latin-1")
        if path.startswith(SHM_METHODS):
            key = fields.get(shmkey.GRPC_HEADER.encode())
            return shm_refusal(self.config, self.config.grpc_port, self.loopback,
                               None if key is None else key.decode("latin-1"))
        if path in CLOSED_METHODS:
            return ("the server's logging and trace settings are closed to clients (they can make it write files "
                    "where a client says); set them where the server is started")
        if path in CONTROL_METHODS and not self.config.allow_model_control:
            return ("model control is closed on this server: clients cannot list, load or unload its models. Start it "
                    "with `sfdeploy serve --allow-model-control` to open the repository API")
        return None

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
                self.refuse(stream, RESOURCE_EXHAUSTED, why)
                return False
            if not self.charge(stream, size, data):
                return False
        return True

    def charge(self, stream: int, size: int, message: memoryview) -> bool:
        """Charge a request message of ``size`` bytes to the memory budget at its length prefix
        (before its bytes go on), at the cost of the model it names (the most costly served one
        when its first bytes are not at hand); False, and the call answered UNAVAILABLE, "retry
        later", when it does not fit beside what is in flight."""
        name = _model_name(message)
        factor = self.config.costs.get(name, 1.0) if name else max(self.config.costs.values(), default=1.0)
        cost = int(size * factor)
        if not self.budget.take(cost):
            self.refuse(stream, UNAVAILABLE, retry_later(cost, self.budget))
            return False
        with self.lock:
            self.charges[stream] = self.charges.get(stream, 0) + cost
        return True

    def refuse(self, stream: int, status: int, message: str) -> None:
        """End call ``stream``: the client gets gRPC ``status`` with ``message`` first, then the
        server's half is reset (CANCEL), so that it never receives the refused message. The call's
        header block must have gone to the server already (a reset of a stream it has not seen
        ends the whole connection)."""
        self.flush()  # the frames before this one go first
        self.release(stream)
        with self.lock:
            self.refused.add(stream)
            self.open.discard(stream)
            self.messages.pop(stream, None)
        # The client's answer first: cancelled, the server ends the call its own way ("Unable to parse
        # request", INTERNAL), and that must not reach the client before the reason.
        self.inject(grpc_refusal(stream, status, message))
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

    def note_settings(self, payload: bytes) -> None:
        """Follow the table size the server allows the client's HPACK encoder, before the client
        hears of it: a larger table the client then announces is what the decoder must accept."""
        for at in range(0, len(payload) - 5, 6):
            if int.from_bytes(payload[at:at + 2], "big") == HEADER_TABLE_SIZE:
                self.decoder.max_allowed_table_size = int.from_bytes(payload[at + 2:at + 6], "big")

    def server_to_client(self) -> None:
        """Forward the server's frames to the client, keeping header blocks whole (no injected frame
        between a HEADERS and its CONTINUATIONs), and note which calls ended, for the idle timeout."""
        reader = Reader(self.upstream)
        held = False
        try:
            while True:
                header, kind, flags, stream, payload = read_frame(reader)
                if kind == SETTINGS and not flags & ACK:
                    self.note_settings(payload)
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
                    self.release(stream)
                    self.active = time.monotonic()
        except (Closed, OSError):
            pass
        finally:
            if held:
                self.to_client.release()
            self.close()


