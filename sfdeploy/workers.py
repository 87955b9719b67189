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

:class:`IsolatedPool` keeps its workers between calls (a server decodes request after request
without starting interpreters each time); :func:`imap_isolated` is one pass over a pool of its own.

The wire format (length-prefixed messages over the worker's stdin/stdout), the worker's side and
the parent's non-blocking pipes live in :mod:`sfdeploy.worker_protocol`. Pickle is used only
between sfdeploy's own parent and the worker it started, over that private pipe; nothing is
unpickled from a file, a socket or anyone else.
"""

from __future__ import annotations

import os
import pickle
import re
import selectors
import site
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from sfdeploy.errors import EnvironmentProblem, InputError
from sfdeploy.worker_protocol import Pipes, Worker, message, pack, resolve, unpack

T = TypeVar("T")
R = TypeVar("R")

_POLL_S = 0.2
_START_TIMEOUT_S = 120.0  # from start to "ready": imports and ``init``, not an item's fault
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


class IsolatedPool(Generic[T, R]):
    """Worker processes for ``fn`` that outlive one batch of items: :meth:`imap` may be called again
    and again (a Triton model instance decodes request after request) without paying each worker's
    start-up (a new interpreter, imports, ``init``) every time. :func:`imap_isolated` is one
    :meth:`imap` on a pool of its own.

    ``on_failure(item, failure)`` supplies the result for an item whose worker crashed, timed out,
    or raised; a crashed or hung worker is replaced. Each worker holds at most ``prefetch`` items,
    so a slow consumer bounds memory. ``init`` runs once in each worker (e.g. to limit its threads).
    ``fn`` and ``init`` must be importable functions (see the module docstring), refused up front
    with an :class:`InputError` if they are not; items and results must pickle. One :meth:`imap`
    at a time (not thread-safe).
    """

    def __init__(self, fn: Callable[[T], R], *, workers: int, on_failure: Callable[[T, WorkerFailure], R],
                 timeout_s: float | None = None, prefetch: int = 2, init: Callable[[], None] | None = None) -> None:
        self._handshake = message(pickle.dumps({
            "sys_path": list(sys.path),
            "fn": callable_ref(fn, "fn"),
            "init": callable_ref(init, "init") if init is not None else None,
        }))
        self.size = max(1, workers)
        self.on_failure, self.timeout_s, self.prefetch = on_failure, timeout_s, max(1, prefetch)
        self._pipes: Pipes | None = None

    @property
    def pipes(self) -> Pipes:
        if self._pipes is None:
            self._pipes = Pipes(self._handshake, python_executable(), _child_env())
        return self._pipes

    def warm(self) -> None:
        """Start every worker now and wait until each has imported ``fn`` and run ``init``; raises
        :class:`EnvironmentProblem` if one cannot (so a server fails at load time, not per request)."""
        while len(self.pipes.workers) < self.size:
            self.pipes.start()
        while not all(worker.ready for worker in self.pipes.workers):
            for _ in self._step([], deque()):
                pass

    def imap(self, items: Iterable[T]) -> Iterator[tuple[int, R]]:
        """Yield ``(index, fn(item))`` as results complete, in completion order; every item once.
        Raises :class:`EnvironmentProblem` if a worker cannot start (it cannot import ``fn``,
        ``init`` raises, or the interpreter is broken)."""
        items = list(items)
        if not items:
            return
        pipes = self.pipes
        for worker in list(pipes.workers):  # died while idle: replaced, and blamed for nothing
            if worker.ready and worker.process.poll() is not None:
                pipes.retire(worker, kill=False)
        while len(pipes.workers) < min(self.size, len(items)):
            pipes.start()
        todo: deque[int] = deque(range(len(items)))
        done = 0
        try:
            while done < len(items):
                for index, result in self._step(items, todo):
                    done += 1
                    yield index, result
        finally:
            for worker in list(pipes.workers):  # left early: answers still due belong to this call
                if worker.assigned:
                    pipes.retire(worker, kill=True)

    def _answers(self, worker: Worker, items: list[T]) -> Iterator[tuple[int, R]]:
        for body in self.pipes.messages(worker):
            if not worker.ready:
                status, detail = pickle.loads(body)
                if status != "ready":
                    raise EnvironmentProblem(f"a worker process could not start: {detail}",
                                             fix="check that the function's module imports in a fresh "
                                             "interpreter (`python -c 'import MODULE'`)")
                worker.ready = True
                worker.since = time.monotonic()
                continue
            index, (status, value) = unpack(body)
            expected = worker.assigned.popleft()
            if index != expected:
                raise RuntimeError(f"worker answered item {index} before item {expected}")  # a protocol bug
            worker.since = time.monotonic()
            yield index, (value if status == "ok" else self.on_failure(items[index], WorkerFailure("error", value)))

    def _step(self, items: list[T], todo: deque[int]) -> Iterator[tuple[int, R]]:
        """Send work, read answers, replace dead or stuck workers: one turn of the loop."""
        pipes = self.pipes
        for worker in pipes.workers:  # top up every worker's queue
            while todo and len(worker.assigned) < self.prefetch and not worker.eof:
                index = todo.popleft()
                try:
                    parts = pack(index, items[index])
                except Exception as exc:  # this item cannot travel; the others can
                    yield index, self.on_failure(items[index], WorkerFailure(
                        "error", f"cannot send the item to a worker ({type(exc).__name__}: {exc})"))
                    continue
                if not worker.assigned:
                    worker.since = time.monotonic()
                worker.assigned.append(index)
                pipes.send(worker, *parts)
        for key, events in pipes.selector.select(timeout=_POLL_S):
            worker = key.data
            if worker not in pipes.workers:
                continue
            if events & selectors.EVENT_WRITE:
                pipes.flush(worker)
            if events & selectors.EVENT_READ:
                pipes.receive(worker)
                yield from self._answers(worker, items)
        now = time.monotonic()
        for worker in list(pipes.workers):
            if worker.ready:
                stuck = bool(worker.assigned) and self.timeout_s is not None and now - worker.since > self.timeout_s
            else:
                stuck = now - worker.started > _START_TIMEOUT_S
            if not (worker.eof or stuck) and worker.process.poll() is None:
                continue
            if not stuck:
                pipes.receive(worker)  # it exited: what it wrote before is still in the pipe
                yield from self._answers(worker, items)
            pipes.retire(worker, kill=stuck)
            if not worker.ready:
                what = (f"did not start within {_START_TIMEOUT_S:.0f} s" if stuck else
                        f"exited while starting (exit code {worker.process.returncode}; its error is above)")
                raise EnvironmentProblem(f"a worker process ({pipes.python} -m sfdeploy.workers) {what}",
                                         fix="check that this python imports sfdeploy; set SFDEPLOY_PYTHON "
                                         "if it is not the environment's python")
            if worker.assigned:
                culprit = worker.assigned.popleft()
                todo.extendleft(reversed(worker.assigned))
                failure = (WorkerFailure("timeout", f"no result after {self.timeout_s:.0f} s") if stuck
                           else WorkerFailure("crash", f"worker process died (exit code "
                                              f"{worker.process.returncode})"))
                yield culprit, self.on_failure(items[culprit], failure)
            if todo and len(pipes.workers) < min(self.size, len(todo)):
                pipes.start()
        if todo and not pipes.workers:
            pipes.start()

    def close(self) -> None:
        """Stop the workers (each exits when idle; killed after a grace period)."""
        if self._pipes is not None:
            self._pipes.close()
            self._pipes = None

    def __enter__(self) -> IsolatedPool[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    """Yield ``(index, fn(item))`` as results complete, in completion order; every item once, from
    a pool of up to ``workers`` processes that ends with the iteration (see :class:`IsolatedPool`
    for the arguments and the guarantees)."""
    pool = IsolatedPool(fn, workers=workers, on_failure=on_failure, timeout_s=timeout_s, prefetch=prefetch,
                        init=init)
    try:
        yield from pool.imap(items)
    finally:
        pool.close()


if __name__ == "__main__":  # python -m sfdeploy.workers: a worker
    from sfdeploy.worker_protocol import child_main

    sys.exit(child_main())
