"""The wire format between :mod:`sfdeploy.workers` and its worker processes, and both ends of it:
the worker's side (:func:`child_main`) and the parent's pipes (:class:`Pipes`).

A worker is ``python -m sfdeploy.workers``; it talks to the parent over its stdin and stdout.
Before anything else it moves its own stdout to stderr and its stdin to /dev/null, so whatever
``fn`` or a native library prints cannot corrupt the protocol. Every message is an 8-byte
big-endian length followed by that many bytes:

* parent -> worker: a handshake ``pickle({sys_path, fn, init})`` (``fn`` and ``init`` as
  ``module:qualified.name``; the worker takes the parent's ``sys.path`` so it imports the same
  modules); then one message per item (:func:`pack`); closing the pipe tells the worker to exit.
* worker -> parent: ``pickle(("ready", None))`` or ``pickle(("fatal", reason))`` once ``fn``
  and ``init`` are imported and ``init`` has run; then one message per item, in order,
  ``pack(index, ("ok", result) | ("error", "Type: message"))``. An item that does not unpickle,
  or a result that does not pickle, is that item's error.

An item or result message is ``index (8 bytes), n (4 bytes), n buffer sizes (8 bytes each), the
pickle (protocol 5), the n buffers``. Large buffers cross out of band, never copied into a
pickle: numpy arrays (decoded clips) by their own protocol-5 support, and ``bytes`` of at least
:data:`OUT_OF_BAND` (an encoded video, sent as a ``memoryview``) by :class:`_Pickler`; they arrive as
views of the one buffer the message was read into (a read-only ``memoryview``). Why: a Triton
``<name>_video`` instance hands each upload to its worker, and joined copies (pickle, index,
length prefix, the slices on the way back) made a 250 MB upload cost 1.25 GB in the instance and
0.75 GB in the worker; it now costs the upload itself on each side.

Pickle only ever crosses this private pipe between sfdeploy's own parent and the worker it
started: nothing is unpickled from a file, a socket or anyone else.

The parent never blocks on a pipe (non-blocking writes from a per-worker queue, reads of whatever
is ready), so large items (the bytes of a video) and large results (decoded frames) in both
directions cannot deadlock it, and a hung worker cannot stop it from noticing timeouts. POSIX only
(pipes in a selector).
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import selectors
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

LENGTH = struct.Struct(">Q")
INDEX = struct.Struct(">Q")
COUNT = struct.Struct(">I")
_CHUNK = 1 << 20
OUT_OF_BAND = 1 << 16  # a ``bytes`` object this large crosses as a buffer of its own, not inside the pickle

Part = bytes | memoryview


def message(body: bytes) -> bytes:
    """``body`` framed for the pipe: its 8-byte big-endian length, then the bytes (see the module docstring)."""
    return LENGTH.pack(len(body)) + body


def resolve(qualname: str, module: Any) -> Any:
    """``module.<qualname>`` (dotted), or None."""
    target = module
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return target


def import_ref(ref: str) -> Callable[..., Any]:
    """The callable a ``module:qualified.name`` reference names, imported in the worker (functions cross the pipe by
    name, never pickled); an ``ImportError`` when it names no callable."""
    module_name, qualname = ref.split(":", 1)
    target = resolve(qualname, importlib.import_module(module_name))
    if not callable(target):
        raise ImportError(f"{ref} is not a callable in the worker")
    return target


def _as_view(buffer: Any) -> memoryview:
    """How a large ``bytes`` object arrives: a read-only view of the message it came in (no copy)."""
    return memoryview(buffer).toreadonly()


class _Pickler(pickle.Pickler):
    """Protocol 5, with memoryviews (and ``bytes`` subclasses, such as numpy's ``bytes_``) of at
    least :data:`OUT_OF_BAND` sent out of band, as numpy arrays already are; smaller views as
    ``bytes``. Exact ``bytes`` never reach this hook (pickle's fast path copies them into the
    stream): a sender that wants a large one out of band passes ``memoryview(data)``."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (memoryview, bytes)):
            if memoryview(obj).nbytes >= OUT_OF_BAND:
                return _as_view, (pickle.PickleBuffer(obj),)
            return bytes, (bytes(obj),)
        return NotImplemented


def pack(index: int, obj: Any) -> list[Part]:
    """The framed message of item or result ``index`` holding ``obj``, as parts to write one after
    the other (see the module docstring): the large buffers are ``obj``'s own memory, not copies."""
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    _Pickler(stream, protocol=5, buffer_callback=buffers.append).dump(obj)
    data = stream.getbuffer()
    raws = [buffer.raw() for buffer in buffers]
    head = INDEX.pack(index) + COUNT.pack(len(raws)) + b"".join(LENGTH.pack(raw.nbytes) for raw in raws)
    size = len(head) + data.nbytes + sum(raw.nbytes for raw in raws)
    return [LENGTH.pack(size) + head, data, *raws]


def unpack(body: bytearray | memoryview) -> tuple[int, Any]:
    """``(index, obj)`` of a message body made by :func:`pack`; the large buffers in ``obj`` are
    views of ``body``."""
    view = memoryview(body)
    (index,) = INDEX.unpack_from(view)
    (count,) = COUNT.unpack_from(view, INDEX.size)
    at = INDEX.size + COUNT.size
    sizes = [LENGTH.unpack_from(view, at + i * LENGTH.size)[0] for i in range(count)]
    at += count * LENGTH.size
    end = len(view) - sum(sizes)
    buffers, start = [], end
    for size in sizes:
        buffers.append(view[start:start + size])
        start += size
    return index, pickle.loads(view[at:end], buffers=buffers)


def _read_message(stream: Any) -> bytearray | None:
    """The next message's body, read into one buffer of its size (None when the parent closed the pipe)."""
    header = stream.read(LENGTH.size)
    if not header:
        return None
    if len(header) != LENGTH.size:
        raise EOFError("the parent closed the pipe mid-message")
    body = bytearray(LENGTH.unpack(header)[0])
    view, got = memoryview(body), 0
    while got < len(body):
        step = stream.readinto(view[got:])
        if not step:
            raise EOFError(f"the parent closed the pipe mid-message ({got} of {len(body)} bytes)")
        got += step
    return body


def child_main() -> int:
    """Serve the parent until it closes the pipe; 0 on a clean end, 1 if ``fn``/``init`` failed."""
    reply = os.fdopen(os.dup(1), "wb")
    requests = os.fdopen(os.dup(0), "rb")
    os.dup2(2, 1)  # prints of fn and of native code go to stderr, never into the protocol
    sys.stdout = sys.stderr
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)

    def send(*parts: Part) -> None:
        for part in parts:
            reply.write(part)
        reply.flush()

    hello = _read_message(requests)
    if hello is None:
        return 0
    setup = pickle.loads(hello)
    sys.path[:] = setup["sys_path"]
    try:
        fn = import_ref(setup["fn"])
        if setup["init"]:
            import_ref(setup["init"])()
    except BaseException as exc:  # reported to the parent, which raises it as an EnvironmentProblem
        send(message(pickle.dumps(("fatal", f"{type(exc).__name__}: {exc}"))))
        return 1
    send(message(pickle.dumps(("ready", None))))
    while (body := _read_message(requests)) is not None:
        (index,) = INDEX.unpack_from(body)
        try:
            parts = pack(index, ("ok", fn(unpack(body)[1])))
        except Exception as exc:  # reported to the parent as this item's failure
            parts = pack(index, ("error", f"{type(exc).__name__}: {exc}"))
        del body  # the item's memory goes before the next one is read
        send(*parts)
    return 0


@dataclass
class Worker:
    """The parent's view of one worker process: its process, the bytes still to write and the bytes read but not yet
    a whole message, and which items it owes answers for, in order (for timeouts and for blaming the right item when
    it dies)."""

    process: subprocess.Popen
    outgoing: deque[memoryview] = field(default_factory=deque)
    incoming: bytearray = field(default_factory=bytearray)
    assigned: deque[int] = field(default_factory=deque)  # answered in this order
    since: float = 0.0  # when the item at assigned[0] started (or was sent, if the worker was idle)
    started: float = 0.0
    ready: bool = False
    eof: bool = False
    writing: bool = False

    @property
    def fd_in(self) -> int:
        """The worker's stdin pipe (the parent writes requests to it, non-blocking)."""
        return self.process.stdin.fileno()  # type: ignore[union-attr]

    @property
    def fd_out(self) -> int:
        """The worker's stdout pipe (the parent reads answers from it, through the selector)."""
        return self.process.stdout.fileno()  # type: ignore[union-attr]


class Pipes:
    """The parent's side: worker processes (``python -m sfdeploy.workers``), their pipes and one
    selector over them. Every worker started gets ``handshake`` first."""

    def __init__(self, handshake: bytes, python: str, env: dict[str, str]) -> None:
        self.handshake = handshake
        self.selector = selectors.DefaultSelector()
        self.workers: list[Worker] = []
        self.python = python
        self.env = env

    def start(self) -> None:
        """Start one more worker process and queue its handshake; it counts as ready only once it answers."""
        process = subprocess.Popen([self.python, "-m", "sfdeploy.workers"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, env=self.env, close_fds=True)
        worker = Worker(process, started=time.monotonic())
        os.set_blocking(worker.fd_in, False)
        os.set_blocking(worker.fd_out, False)
        self.selector.register(worker.fd_out, selectors.EVENT_READ, worker)
        self.workers.append(worker)
        self.send(worker, self.handshake)

    def send(self, worker: Worker, *parts: Part) -> None:
        """Queue a framed message (in ``parts``, written one after the other, never joined) for
        ``worker`` and write what its pipe takes now, without blocking."""
        worker.outgoing.extend(memoryview(part).cast("B") for part in parts)
        self.flush(worker)

    def flush(self, worker: Worker) -> None:
        """Write what the pipe takes now; the selector says when it takes more."""
        while worker.outgoing and not worker.eof:
            head = worker.outgoing[0]
            try:
                written = os.write(worker.fd_in, head[:_CHUNK])
            except BlockingIOError:
                break
            except OSError:  # the worker is gone (EPIPE); its closed stdout reports it
                worker.outgoing.clear()
                break
            if written == len(head):
                worker.outgoing.popleft()
            else:
                worker.outgoing[0] = head[written:]
        want = bool(worker.outgoing) and not worker.eof
        if want != worker.writing:
            if want:
                self.selector.register(worker.fd_in, selectors.EVENT_WRITE, worker)
            else:
                self.selector.unregister(worker.fd_in)
            worker.writing = want

    def receive(self, worker: Worker) -> None:
        """Read everything the worker has written so far; notes its end of output."""
        while True:
            try:
                chunk = os.read(worker.fd_out, _CHUNK)
            except BlockingIOError:
                return
            if not chunk:
                worker.eof = True
                return
            worker.incoming += chunk

    @staticmethod
    def messages(worker: Worker) -> Iterator[bytearray]:
        """Complete messages received from the worker, in order (each body a buffer of its own,
        which the arrays of a result then view)."""
        while len(worker.incoming) >= LENGTH.size:
            (size,) = LENGTH.unpack_from(worker.incoming)
            end = LENGTH.size + size
            if len(worker.incoming) < end:
                return
            body = worker.incoming[LENGTH.size:end]
            del worker.incoming[:end]
            yield body

    def retire(self, worker: Worker, kill: bool) -> None:
        """Stop ``worker`` and forget it: ``kill`` it at once (stuck, or owing answers no longer
        wanted), or close its input and let it exit (killed after 5 s)."""
        if kill:
            worker.process.kill()
        self.selector.unregister(worker.fd_out)
        if worker.writing:
            self.selector.unregister(worker.fd_in)
        worker.process.stdin.close()  # type: ignore[union-attr]
        try:
            worker.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
        worker.process.stdout.close()  # type: ignore[union-attr]
        self.workers.remove(worker)

    def close(self) -> None:
        """Close every worker's input (it exits when idle), then kill what is still running."""
        for worker in self.workers:
            worker.process.stdin.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + 5
        for worker in self.workers:
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            worker.process.stdout.close()  # type: ignore[union-attr]
        self.workers.clear()
        self.selector.close()
