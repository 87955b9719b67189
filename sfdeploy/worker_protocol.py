"""The wire format between :mod:`sfdeploy.workers` and its worker processes, and the worker's side.

A worker is ``python -m sfdeploy.workers``; it talks to the parent over its stdin and stdout.
Before anything else it moves its own stdout to stderr and its stdin to /dev/null, so whatever
``fn`` or a native library prints cannot corrupt the protocol. Every message is an 8-byte
big-endian length followed by that many bytes:

* parent -> worker: a handshake ``pickle({sys_path, fn, init})`` (``fn`` and ``init`` as
  ``module:qualified.name``; the worker takes the parent's ``sys.path`` so it imports the same
  modules); then one message per item, ``index (8 bytes) + pickle(item)``; closing the pipe
  tells the worker to exit.
* worker -> parent: ``pickle(("ready", None))`` or ``pickle(("fatal", reason))`` once ``fn``
  and ``init`` are imported and ``init`` has run; then one message per item, in order,
  ``index (8 bytes) + pickle(("ok", result) | ("error", "Type: message"))``. An item that does
  not unpickle, or a result that does not pickle, is that item's error.

Pickle only ever crosses this private pipe between sfdeploy's own parent and the worker it
started: nothing is unpickled from a file, a socket or anyone else.
"""

from __future__ import annotations

import importlib
import os
import pickle
import struct
import sys
from collections.abc import Callable
from typing import Any

LENGTH = struct.Struct(">Q")
INDEX = struct.Struct(">Q")


def message(body: bytes) -> bytes:
    return LENGTH.pack(len(body)) + body


def resolve(qualname: str, module: Any) -> Any:
    """``module.<qualname>`` (dotted), or None."""
    target = module
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return target


def import_ref(ref: str) -> Callable[..., Any]:
    module_name, qualname = ref.split(":", 1)
    target = resolve(qualname, importlib.import_module(module_name))
    if not callable(target):
        raise ImportError(f"{ref} is not a callable in the worker")
    return target


def _read_exact(stream: Any, size: int) -> bytes | None:
    data = stream.read(size)
    if not data:
        return None
    if len(data) != size:
        raise EOFError(f"the parent closed the pipe mid-message ({len(data)} of {size} bytes)")
    return data


def _read_message(stream: Any) -> bytes | None:
    header = _read_exact(stream, LENGTH.size)
    if header is None:
        return None
    return _read_exact(stream, LENGTH.unpack(header)[0]) or b""


def child_main() -> int:
    """Serve the parent until it closes the pipe; 0 on a clean end, 1 if ``fn``/``init`` failed."""
    reply = os.fdopen(os.dup(1), "wb")
    requests = os.fdopen(os.dup(0), "rb")
    os.dup2(2, 1)  # prints of fn and of native code go to stderr, never into the protocol
    sys.stdout = sys.stderr
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)

    def send(body: bytes) -> None:
        reply.write(message(body))
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
        send(pickle.dumps(("fatal", f"{type(exc).__name__}: {exc}")))
        return 1
    send(pickle.dumps(("ready", None)))
    while (body := _read_message(requests)) is not None:
        try:
            outcome: Any = ("ok", fn(pickle.loads(body[INDEX.size:])))
            payload = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # reported to the parent as this item's failure
            payload = pickle.dumps(("error", f"{type(exc).__name__}: {exc}"))
        send(body[:INDEX.size] + payload)
    return 0
