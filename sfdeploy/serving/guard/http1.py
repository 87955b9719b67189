"""The HTTP/1.1 half of the server's front (:mod:`sfdeploy.serving.guard`): each request head is
read and checked, a body over its path's limit is refused (``413``) before it is read, a
shared-memory call without the key or from afar is refused (``403``), and what passes is forwarded
to tritonserver with its response, one request after the other (a ``500`` that says the request
could not be parsed passed on as ``400``: :func:`client_fault`)."""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
from typing import Any

from sfdeploy import shmkey
from sfdeploy.endpoints import LOOPBACK
from sfdeploy.serving.guard.budget import retry_later, shared
from sfdeploy.serving.guard.common import (
    BODY_TIMEOUT_S,
    CHUNK,
    DRAIN_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    OTHER_LIMIT,
    Closed,
    GuardConfig,
    Reader,
    Refusal,
    is_shm_path,
    peer_is_loopback,
    recv,
    send,
    shm_refusal,
    take,
    too_large,
)

# tritonserver's 500s that are a request it could not parse (its JSON reader's and field readers' words)
_PARSE_FAILURE = re.compile(r"^(\[request id: [^\]]*\] )?"
                            r"(failed to parse the request JSON buffer|Unable to parse '\w+')")
_SMALL_ERROR = 4096  # a 500 answer to a POST up to this size is read before it is passed on (client_fault)
_INFER_PATH = re.compile(r"^/v2/models/([^/?]+)(?:/versions/[^/?]+)?/infer(?:\?.*)?$")


_REASONS = {400: "Bad Request", 403: "Forbidden", 413: "Payload Too Large", 415: "Unsupported Media Type", 431:
            "Request Header Fields Too Large", 501: "Not Implemented", 503: "Service Unavailable"}


def http_error(status: int, message: str) -> bytes:
    """A response as Triton words its own errors: JSON ``{"error": ...}``, and the connection closes."""
    body = json.dumps({"error": message}).encode()
    retry = "Retry-After: 1\r\n" if status == 503 else ""  # busy, not broken: the client may come back
    return (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n{retry}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def client_fault(head: bytes, body: bytes) -> bytes:
    """The head of tritonserver's ``500`` answer to a POST, as ``400`` when its error says the
    request's JSON could not be parsed (truncated, binary junk, not an object, a field of the wrong
    type): tritonserver 2.51 calls those its own failure, and a client (or its retry policy) must
    know the request is at fault. Decided by the message alone, on small error bodies only."""
    try:
        message = json.loads(body)["error"]
    except (ValueError, TypeError, KeyError):
        return head
    if not isinstance(message, str) or not _PARSE_FAILURE.match(message):
        return head
    return re.sub(rb"^(HTTP/1\.[01]) 500 [^\r]*", rb"\1 400 Bad Request", head, count=1)


def _model(target: str) -> str | None:
    """The model a request target's infer path names (None for any other path)."""
    match = _INFER_PATH.match(target)
    return match.group(1) if match else None


class _FileSink:
    """A file where :meth:`Reader.copy` expects a socket (the spool of a chunked body)."""

    def __init__(self, file: Any) -> None:
        self.sendall = file.write


def send_file(sock: socket.socket, file: Any, length: int) -> None:
    """The first ``length`` bytes of ``file`` to ``sock``, by the kernel (no copy through Python)."""
    offset = 0
    while offset < length:
        try:
            sent = os.sendfile(sock.fileno(), file.fileno(), offset, length - offset)
        except OSError as exc:
            raise Closed(str(exc)) from exc
        if not sent:
            raise Closed("the spooled body ended early")
        offset += sent


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """(start line, [(lower-case name, value)])."""
    lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise Refusal(400, f"malformed header line {line[:80]!r}")
        headers.append((name.lower(), value.strip()))
    return lines[0], headers


def _value(headers: list[tuple[str, str]], name: str) -> str | None:
    values = [v for n, v in headers if n == name]
    if len(values) > 1 and name in ("content-length", "transfer-encoding"):
        raise Refusal(400, f"more than one {name} header")
    return values[0] if values else None


def _body_size(headers: list[tuple[str, str]]) -> tuple[int | None, bool]:
    """(Content-Length or None, chunked)."""
    length, coding = _value(headers, "content-length"), _value(headers, "transfer-encoding")
    if length is not None and coding is not None:
        raise Refusal(400, "both Content-Length and Transfer-Encoding")
    if coding is not None and coding.lower() != "chunked":
        raise Refusal(501, f"Transfer-Encoding {coding!r} is not supported (send the body with Content-Length)")
    if length is not None and not length.isdigit():
        raise Refusal(400, f"bad Content-Length {length!r}")
    return (int(length) if length is not None else None), coding is not None


class HttpConnection:
    """One client connection: requests checked, forwarded to tritonserver, answers sent back."""

    def __init__(self, client: socket.socket, config: GuardConfig) -> None:
        self.client = client
        self.config = config
        self.reader = Reader(client)
        self.upstream: socket.socket | None = None
        self.upstream_reader: Reader | None = None
        self.loopback = peer_is_loopback(client)
        self.budget = shared()
        self.charged = 0  # what the request in hand is charged to the budget

    def limit(self, target: str) -> tuple[int, str]:
        """The largest body ``target`` accepts, and what to call it in an error."""
        match = _INFER_PATH.match(target)
        if match and match.group(1) in self.config.http_limits:
            return self.config.http_limits[match.group(1)], f"model '{match.group(1)}'"
        if match or target.startswith("/v2/repository"):
            return max(self.config.http_limits.values(), default=OTHER_LIMIT), "this server"
        return OTHER_LIMIT, "this endpoint"

    def run(self) -> None:
        """Serve requests on this connection until it ends (the client closes, goes idle, or a
        request is refused), then close both sides."""
        try:
            while self.one_request():
                pass
        except Refusal as refusal:
            self.refuse(refusal, None)
        except Closed:
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
            raise Refusal(400, f"not an HTTP/1.x request line: {start[:80]!r}")
        method, target, version = parts
        length, chunked = _body_size(headers)
        limit, owner = self.limit(target)
        coding = _value(headers, "content-encoding")
        if coding is not None and coding.lower() != "identity":
            raise Refusal(415, f"compressed request bodies (Content-Encoding: {coding}) are not accepted: "
                                    "inflated, their size is unknown until they are in memory; send them uncompressed")
        if length is not None and length > limit:
            self.refuse(Refusal(413, too_large(length, limit, owner)), length)
            return False
        if is_shm_path(target) and (why := shm_refusal(self.config, self.config.http_port, self.loopback,
                                                       _value(headers, shmkey.HEADER))):
            self.refuse(Refusal(403, why), None if chunked else length or 0)  # no body: nothing to drain
            return False
        factor = self.config.costs.get(_model(target) or "", 1.0)
        charge = int((length or 0) * factor)
        if charge and not self.budget.take(charge):
            self.refuse(Refusal(503, retry_later(charge, self.budget)), length)
            return False
        self.charged = charge
        try:
            keep = self.forward(start, headers, method, (length, chunked), (limit, owner, factor))
        finally:
            self.budget.give(self.charged)
            self.charged = 0
        wants_close = (_value(headers, "connection") or "").lower() == "close" or (
            version == "HTTP/1.0" and (_value(headers, "connection") or "").lower() != "keep-alive")
        return keep and not wants_close

    def forward(self, start: str, headers: list[tuple[str, str]], method: str, size: tuple[int | None, bool],
                limits: tuple[int, str, float]) -> bool:
        """Send an admitted request to tritonserver and its answer back; True if the connection may go
        on. A chunked body is spooled first (:meth:`spool_chunks`) and sent with its length."""
        length, chunked = size
        forwarded = [(n, v) for n, v in headers if n != "expect"]
        if any(n == "expect" and v.lower() == "100-continue" for n, v in headers):
            send(self.client, b"HTTP/1.1 100 Continue\r\n\r\n")
        self.client.settimeout(BODY_TIMEOUT_S)
        spool = self.spool_chunks(*limits) if chunked else None
        if spool is not None:
            length = spool.seek(0, os.SEEK_END)
            forwarded = [(n, v) for n, v in forwarded if n != "transfer-encoding"] + [("content-length", str(length))]
        self.connect()
        send(self.upstream, (start + "\r\n" + "".join(f"{n}: {v}\r\n" for n, v in forwarded) + "\r\n").encode(
            "latin-1"))
        if spool is not None:
            with spool:
                send_file(self.upstream, spool, length)
        elif length:
            self.reader.copy(length, self.upstream)
        return self.forward_response(method)

    def spool_chunks(self, limit: int, owner: str, factor: float) -> Any:
        """A chunked body, read into an unlinked temporary file while it is counted: its size is known
        only as it arrives, so it is refused as soon as the running total passes ``limit`` (413) or
        no longer fits the memory budget (503), and tritonserver, which would hold a partial body
        until it ended, never sees any of it. The caller closes the file."""
        spool = tempfile.TemporaryFile(prefix="sfdeploy-guard-")
        try:
            total = 0
            while True:
                line = self.reader.line()
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise Closed("bad chunk size") from None
                total += size
                if total > limit:
                    raise Refusal(413, too_large(total, limit, owner, more=True))
                if not self.budget.take(int(size * factor)):
                    raise Refusal(503, retry_later(int(total * factor), self.budget))
                self.charged += int(size * factor)
                if size == 0:  # trailers (dropped: the body is sent with its length), then a blank line
                    while self.reader.line() != b"\r\n":
                        pass
                    return spool
                self.reader.copy(size, _FileSink(spool))  # type: ignore[arg-type]
                if self.reader.line() != b"\r\n":
                    raise Closed("a chunk does not end with CRLF")
        except BaseException:
            spool.close()
            raise

    def forward_response(self, method: str) -> bool:
        """Copy one response (after any interim 1xx ones); True if the connection may go on."""
        assert self.upstream_reader is not None
        while True:
            head = self.upstream_reader.head(None, None)
            if head is None:
                raise Closed("tritonserver closed the connection")
            start, headers = _parse_head(head)
            status = int(start.split(" ")[1])
            if status >= 200:
                break
            send(self.client, head)
        length, chunked = _body_size(headers)
        if status == 500 and method == "POST" and length is not None and length <= _SMALL_ERROR:
            body = take(self.upstream_reader, length)
            send(self.client, client_fault(head, body) + body)
            return (_value(headers, "connection") or "").lower() != "close"
        send(self.client, head)
        if method == "HEAD" or status in (204, 304):
            pass
        elif chunked:
            while True:
                line = self.upstream_reader.line()
                send(self.client, line)
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while (trailer := self.upstream_reader.line()) != b"\r\n":
                        send(self.client, trailer)
                    send(self.client, b"\r\n")
                    break
                self.upstream_reader.copy(size + 2, self.client)
        elif length is not None:
            self.upstream_reader.copy(length, self.client)
        else:
            self.upstream_reader.rest(self.client)
            return False
        return (_value(headers, "connection") or "").lower() != "close"

    def connect(self) -> None:
        """Open the connection to tritonserver's private HTTP port on first need (one per client
        connection); a 503 refusal when it is not reachable."""
        if self.upstream is None:
            try:
                self.upstream = socket.create_connection((LOOPBACK, self.config.upstream_http), timeout=10)
            except OSError as exc:
                raise Refusal(503, f"tritonserver is not reachable ({exc.strerror})") from exc
            self.upstream.settimeout(None)  # an inference may take long; tritonserver is trusted
            self.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.upstream_reader = Reader(self.upstream)

    def refuse(self, refusal: Refusal, pending: int | None) -> None:
        """Answer with the error, then read (and drop) the rest of the body for a while, so that a
        client still sending it gets to read the answer instead of a reset connection."""
        try:
            send(self.client, http_error(refusal.status, refusal.message))
            self.client.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            left = pending - len(self.reader.buffer) if pending is not None else 1 << 62
            while left > 0 and time.monotonic() < deadline:
                self.client.settimeout(max(0.01, deadline - time.monotonic()))
                left -= len(recv(self.client, min(CHUNK, left)))
        except (Closed, OSError):
            pass


