"""A process pool that survives its inputs: one bad file costs one result, never the batch.

Video decoders can crash the process (segfault in native code) or hang on damaged input.
``concurrent.futures.ProcessPoolExecutor`` then breaks as a whole and every pending result is
lost. :func:`imap_isolated` gives each worker process its own pipes: the parent sends it up to
``prefetch`` items, the worker answers them in order. So when a worker dies or overruns
``timeout_s``, the first item it has not answered is the one it was working on: only that item
gets an error (from ``on_failure``), the worker's other items go to the others, and a new worker
takes its place.

**Workers are their own interpreter**, started as ``python -m sfdeploy.workers`` with
:mod:`subprocess`, never with :mod:`multiprocessing`: ``spawn`` and ``forkserver`` re-import the
caller's ``__main__`` in every child (a script without an ``if __name__ == "__main__"`` guard
then starts workers recursively, code read from stdin cannot be re-read at all), and ``fork``
copies the parent's threads (torch, onnxruntime, gRPC) in whatever locked state they are in. A
worker imports ``sfdeploy.workers`` and the modules of ``fn`` and ``init``, nothing else, which
keeps start-up cheap; the caller's main module is never imported. ``fn`` and ``init`` therefore
travel as ``module:qualified.name`` and must be importable functions: a lambda, a nested function
or a function defined in ``__main__`` is refused up front with an :class:`InputError`.

The wire format (length-prefixed messages over the worker's stdin/stdout) and the worker's side
live in :mod:`sfdeploy.worker_protocol`. Pickle is used only between sfdeploy's own parent and the
worker it started, over that private pipe; nothing is unpickled from a file, a socket or anyone
else. The parent never blocks on a
pipe (non-blocking writes from a per-worker queue, reads of whatever is ready), so large items
(the bytes of a video) and large results (decoded frames) in both directions cannot deadlock it,
and a hung worker cannot stop it from noticing timeouts. POSIX only (pipes in a selector).
"""

from __future__ import annotations

import os
import pickle
import re
import selectors
import site
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sfdeploy.errors import EnvironmentProblem, InputError
from sfdeploy.worker_protocol import INDEX, LENGTH, message, resolve

T = TypeVar("T")
R = TypeVar("R")

_POLL_S = 0.2
_START_TIMEOUT_S = 120.0  # from start to "ready": imports and ``init``, not an item's fault
_CHUNK = 1 << 20
_PYTHON_NAME = re.compile(r"(python|pypy)[0-9.]*[dmw]*(\.exe)?")


@dataclass(frozen=True)
class WorkerFailure:
    """Why an item produced no result: ``kind`` is 'crash', 'timeout' or 'error'."""

    kind: str
    detail: str


def python_executable() -> str:
    """The Python interpreter to start workers with.

    Normally ``sys.executable``. Embedded interpreters set it to their host program instead: in
    Triton's python backend it is ``triton_python_backend_stub``, and in some embedding hosts
    (Ray's and uWSGI's among the reported ones) it is a launcher or empty; running that with
    ``-m sfdeploy.workers`` would not start Python. There the interpreter of the same environment
    is ``<sys.prefix>/bin/python3`` (a virtualenv's or conda env's own python: the site-packages
    this process imports from), then the base installation's. ``SFDEPLOY_PYTHON`` overrides all.
    """
    override = os.environ.get("SFDEPLOY_PYTHON")
    if override:
        return override
    if _is_python(sys.executable):
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for prefix in dict.fromkeys((sys.prefix, sys.exec_prefix, sys.base_prefix)):
        for name in (version, "python3", "python"):
            candidate = Path(prefix) / "bin" / name
            if _is_python(str(candidate)):
                return str(candidate)
    raise EnvironmentProblem(
        f"cannot find a Python interpreter to start worker processes (sys.executable is "
        f"{sys.executable!r}, and {Path(sys.prefix) / 'bin' / 'python3'} does not exist)",
        fix="set SFDEPLOY_PYTHON to the python executable of this environment",
    )


def _is_python(path: str | None) -> bool:
    return bool(path) and _PYTHON_NAME.fullmatch(Path(path).name) is not None and os.access(path, os.X_OK)


def callable_ref(fn: Callable[..., Any], what: str = "fn") -> str:
    """``module:qualified.name`` of an importable function, or an :class:`InputError` saying why not."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    name = qualname or repr(fn)
    if not module or not qualname:
        problem = "has no module and qualified name (e.g. a functools.partial or a callable object)"
    elif module == "__main__":
        problem = ("is defined in the caller's main module (a script, stdin, `python -c` or a notebook), "
                   "which worker processes never import")
    elif "<lambda>" in qualname or "<locals>" in qualname:
        problem = "is a lambda or a function defined inside another function"
    elif resolve(qualname, sys.modules.get(module)) is not fn:
        problem = f"is not what {module}.{qualname} names"
    else:
        return f"{module}:{qualname}"
    raise InputError(f"{what} {name!r} cannot run in a worker process: it {problem}",
                     fix="define the function at the top level of an importable module (not __main__) "
                     "and pass that function")


def _child_env() -> dict[str, str]:
    """The parent's environment, plus sfdeploy's location on PYTHONPATH when this process found
    sfdeploy through a ``sys.path`` entry that is not a site dir (a source checkout put on the
    path by hand, or the current directory), so that ``-m sfdeploy.workers`` imports the same
    sfdeploy. Installed copies (site-packages, editable installs) need nothing; site dirs are never
    added, as PYTHONPATH comes before the standard library. The worker then takes the parent's
    whole ``sys.path`` from the handshake."""
    env = dict(os.environ)
    home = Path(__file__).resolve().parents[1]
    on_path = {Path(p or ".").resolve() for p in sys.path}
    sites = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if home in on_path and home not in sites:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(home), env.get("PYTHONPATH")) if p)
    return env


@dataclass
class _Worker:
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
        return self.process.stdin.fileno()  # type: ignore[union-attr]

    @property
    def fd_out(self) -> int:
        return self.process.stdout.fileno()  # type: ignore[union-attr]


class _Pool:
    """The parent's side: worker processes, their pipes and one selector over them."""

    def __init__(self, handshake: bytes) -> None:
        self.handshake = handshake
        self.selector = selectors.DefaultSelector()
        self.workers: list[_Worker] = []
        self.python = python_executable()
        self.env = _child_env()

    def start(self) -> None:
        process = subprocess.Popen([self.python, "-m", "sfdeploy.workers"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, env=self.env, close_fds=True)
        worker = _Worker(process, started=time.monotonic())
        os.set_blocking(worker.fd_in, False)
        os.set_blocking(worker.fd_out, False)
        self.selector.register(worker.fd_out, selectors.EVENT_READ, worker)
        self.workers.append(worker)
        self.send(worker, self.handshake)

    def send(self, worker: _Worker, message: bytes) -> None:
        worker.outgoing.append(memoryview(message))
        self.flush(worker)

    def flush(self, worker: _Worker) -> None:
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

    def receive(self, worker: _Worker) -> None:
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
    def messages(worker: _Worker) -> Iterator[bytes]:
        """Complete messages received from the worker, in order."""
        while len(worker.incoming) >= LENGTH.size:
            (size,) = LENGTH.unpack_from(worker.incoming)
            end = LENGTH.size + size
            if len(worker.incoming) < end:
                return
            body = bytes(worker.incoming[LENGTH.size:end])
            del worker.incoming[:end]
            yield body

    def retire(self, worker: _Worker, kill: bool) -> None:
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


def imap_isolated(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int,
    on_failure: Callable[[T, WorkerFailure], R],
    timeout_s: float | None = None,
    prefetch: int = 2,
    init: Callable[[], None] | None = None,
) -> Iterator[tuple[int, R]]:
    """Yield ``(index, fn(item))`` as results complete, in completion order; every item once.

    ``on_failure(item, failure)`` supplies the result for an item whose worker crashed, timed out,
    or raised. Each worker holds at most ``prefetch`` items, so a slow consumer bounds memory.
    ``init`` runs once in each worker (e.g. to limit its threads). ``fn`` and ``init`` must be
    importable functions (see the module docstring); items and results must pickle. Raises
    :class:`EnvironmentProblem` if a worker cannot start (it cannot import ``fn``, ``init``
    raises, or the interpreter is broken).
    """
    handshake = message(pickle.dumps({
        "sys_path": list(sys.path),
        "fn": callable_ref(fn, "fn"),
        "init": callable_ref(init, "init") if init is not None else None,
    }))
    items = list(items)
    if not items:
        return
    pool = _Pool(handshake)
    todo: deque[int] = deque(range(len(items)))
    done = 0

    def answers(worker: _Worker) -> Iterator[tuple[int, R]]:
        for body in pool.messages(worker):
            if not worker.ready:
                status, detail = pickle.loads(body)
                if status != "ready":
                    raise EnvironmentProblem(f"a worker process could not start: {detail}",
                                             fix="check that the function's module imports in a fresh "
                                             "interpreter (`python -c 'import MODULE'`)")
                worker.ready = True
                worker.since = time.monotonic()
                continue
            (index,) = INDEX.unpack_from(body)
            status, value = pickle.loads(body[INDEX.size:])
            expected = worker.assigned.popleft()
            if index != expected:
                raise RuntimeError(f"worker answered item {index} before item {expected}")  # a protocol bug
            worker.since = time.monotonic()
            yield index, (value if status == "ok" else on_failure(items[index], WorkerFailure("error", value)))

    try:
        for _ in range(max(1, min(workers, len(items)))):
            pool.start()
        while done < len(items):
            for worker in pool.workers:  # top up every worker's queue
                while todo and len(worker.assigned) < max(1, prefetch) and not worker.eof:
                    index = todo.popleft()
                    try:
                        payload = pickle.dumps(items[index], protocol=pickle.HIGHEST_PROTOCOL)
                    except Exception as exc:  # this item cannot travel; the others can
                        done += 1
                        yield index, on_failure(items[index], WorkerFailure(
                            "error", f"cannot send the item to a worker ({type(exc).__name__}: {exc})"))
                        continue
                    if not worker.assigned:
                        worker.since = time.monotonic()
                    worker.assigned.append(index)
                    pool.send(worker, message(INDEX.pack(index) + payload))
            for key, events in pool.selector.select(timeout=_POLL_S):
                worker = key.data
                if worker not in pool.workers:
                    continue
                if events & selectors.EVENT_WRITE:
                    pool.flush(worker)
                if events & selectors.EVENT_READ:
                    pool.receive(worker)
                    for index, result in answers(worker):
                        done += 1
                        yield index, result
            now = time.monotonic()
            for worker in list(pool.workers):
                if worker.ready:
                    stuck = bool(worker.assigned) and timeout_s is not None and now - worker.since > timeout_s
                else:
                    stuck = now - worker.started > _START_TIMEOUT_S
                if not (worker.eof or stuck) and worker.process.poll() is None:
                    continue
                if not stuck:
                    pool.receive(worker)  # it exited: what it wrote before is still in the pipe
                    for index, result in answers(worker):
                        done += 1
                        yield index, result
                pool.retire(worker, kill=stuck)
                if not worker.ready:
                    what = (f"did not start within {_START_TIMEOUT_S:.0f} s" if stuck else
                            f"exited while starting (exit code {worker.process.returncode}; its error is above)")
                    raise EnvironmentProblem(f"a worker process ({pool.python} -m sfdeploy.workers) {what}",
                                             fix="check that this python imports sfdeploy; set SFDEPLOY_PYTHON "
                                             "if it is not the environment's python")
                if worker.assigned:
                    culprit = worker.assigned.popleft()
                    todo.extendleft(reversed(worker.assigned))
                    failure = (WorkerFailure("timeout", f"no result after {timeout_s:.0f} s") if stuck
                               else WorkerFailure("crash", f"worker process died (exit code "
                                                  f"{worker.process.returncode})"))
                    done += 1
                    yield culprit, on_failure(items[culprit], failure)
                if done < len(items) and len(pool.workers) < max(1, min(workers, len(todo))):
                    pool.start()
            if not pool.workers and done < len(items):
                pool.start()
    finally:
        pool.close()


if __name__ == "__main__":  # python -m sfdeploy.workers: a worker
    from sfdeploy.worker_protocol import child_main

    sys.exit(child_main())
