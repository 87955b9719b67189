"""The HTTP/1.1 half of the server's front (:mod:`sfdeploy.serving.guard`): each request head is
read and checked, a body over its path's limit is refused (``413``) before it is read, and what
passes is forwarded to tritonserver with its response, one request after the other."""

from __future__ import annotations

import json
import re
import socket
import time

from sfdeploy.endpoints import LOOPBACK
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
    recv,
    send,
    too_large,
)

_INFER_PATH = re.compile(r"^/v2/models/([^/?]+)(?:/versions/[^/?]+)?/infer(?:\?.*)?$")


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
        forwarded = [(n, v) for n, v in headers if n != "expect"]
        if any(n == "expect" and v.lower() == "100-continue" for n, v in headers):
            send(self.client, b"HTTP/1.1 100 Continue\r\n\r\n")
        self.connect()
        send(self.upstream, (start + "\r\n" + "".join(f"{n}: {v}\r\n" for n, v in forwarded) + "\r\n").encode(
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
        """Forward a chunked body chunk by chunk while counting it: the sizes are known only as they
        arrive, so the request is refused (413) as soon as the running total passes ``limit``, its
        upstream connection dropped with the part already sent."""
        total = 0
        while True:
            line = self.reader.line()
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise Closed("bad chunk size") from None
            total += size
            if total > limit:  # the part sent so far goes nowhere: this upstream connection ends
                self.upstream.close()
                self.upstream = None
                raise Refusal(413, too_large(total, limit, owner, more=True))
            send(self.upstream, line)
            if size == 0:  # trailers, then a blank line
                while (trailer := self.reader.line()) != b"\r\n":
                    send(self.upstream, trailer)
                send(self.upstream, b"\r\n")
                return
            self.reader.copy(size + 2, self.upstream)

    def forward_response(self, method: str) -> bool:
        """Copy one response (after any interim 1xx ones); True if the connection may go on."""
        assert self.upstream_reader is not None
        while True:
            head = self.upstream_reader.head(None, None)
            if head is None:
                raise Closed("tritonserver closed the connection")
            send(self.client, head)
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


