"""A process pool that survives its inputs: one bad file costs one result, never the batch.

Video decoders can crash the process (segfault in native code) or hang on damaged input.
``concurrent.futures.ProcessPoolExecutor`` then breaks as a whole and every pending result is
lost. :func:`imap_isolated` gives each worker process its own pipe: the parent sends it up to
``prefetch`` items, the worker answers them in order, and a pipe send is complete when it returns
(no background feeder thread that a crash could cut off). So when a worker dies or overruns
``timeout_s``, the first item it has not answered is the one it was working on: only that item
gets an error (from ``on_failure``), the worker's other items go to the others, and a new worker
takes its place.

Workers are started with ``spawn``: the parent may hold threads (torch, onnxruntime, gRPC) that
``fork`` would copy in a locked state. ``fn`` must be a module-level function.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_POLL_S = 0.2


@dataclass(frozen=True)
class WorkerFailure:
    """Why an item produced no result: ``kind`` is 'crash', 'timeout' or 'error'."""

    kind: str
    detail: str


def _worker_main(fn: Callable[[Any], Any], conn: Connection, init: Callable[[], None] | None) -> None:
    if init is not None:
        init()
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        index, item = task
        try:
            outcome: Any = ("ok", fn(item))
        except Exception as exc:  # reported to the parent as this item's failure
            outcome = ("error", f"{type(exc).__name__}: {exc}")
        conn.send((index, outcome))


@dataclass
class _Worker:
    process: Any
    conn: Connection
    assigned: deque[int] = field(default_factory=deque)  # answered in this order
    since: float = 0.0  # when the item at assigned[0] started (or was sent, if the worker was idle)


def _answers(worker: _Worker, items: list, on_failure: Callable) -> Iterator[tuple[int, Any]]:
    """Every answer already in the worker's pipe, in order."""
    while worker.assigned:
        try:
            if not worker.conn.poll():
                return
            index, (status, value) = worker.conn.recv()
        except (EOFError, OSError):
            return  # the process is gone; the caller deals with its unanswered items
        worker.assigned.popleft()
        worker.since = time.monotonic()
        yield index, (value if status == "ok" else on_failure(items[index], WorkerFailure("error", value)))


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
    """Yield ``(index, fn(item))`` as results complete, in completion order.

    ``on_failure(item, failure)`` supplies the result for an item whose worker crashed, timed out,
    or raised. Each worker holds at most ``prefetch`` items, so a slow consumer bounds memory.
    ``init`` runs once in each worker (e.g. to limit its threads).
    """
    items = list(items)
    if not items:
        return
    ctx = mp.get_context("spawn")
    pool: list[_Worker] = []
    todo: deque[int] = deque(range(len(items)))
    done = 0

    def start_worker() -> None:
        parent, child = ctx.Pipe(duplex=True)
        process = ctx.Process(target=_worker_main, args=(fn, child, init), daemon=True)
        process.start()
        child.close()
        pool.append(_Worker(process, parent))

    def retire(worker: _Worker, kill: bool) -> None:
        if kill:
            worker.process.kill()
        worker.process.join(timeout=5)
        worker.conn.close()
        pool.remove(worker)

    for _ in range(max(1, min(workers, len(items)))):
        start_worker()
    try:
        while done < len(items):
            for worker in pool:  # top up every worker's pipe
                while todo and len(worker.assigned) < max(1, prefetch):
                    index = todo.popleft()
                    if not worker.assigned:
                        worker.since = time.monotonic()
                    worker.assigned.append(index)  # if the send fails, the item is re-queued below
                    try:
                        worker.conn.send((index, items[index]))
                    except OSError:
                        break  # the worker died; its sentinel reports it
            by_conn = {w.conn: w for w in pool}
            by_sentinel = {w.process.sentinel: w for w in pool}
            for ready in wait([*by_conn, *by_sentinel], timeout=_POLL_S):
                worker = by_conn.get(ready) or by_sentinel.get(ready)  # type: ignore[arg-type]
                if worker is not None and worker in pool:
                    for index, result in _answers(worker, items, on_failure):
                        done += 1
                        yield index, result
            now = time.monotonic()
            for worker in list(pool):
                alive = worker.process.is_alive()
                stuck = alive and worker.assigned and timeout_s is not None and now - worker.since > timeout_s
                if alive and not stuck:
                    continue
                for index, result in _answers(worker, items, on_failure):  # sent before it died
                    done += 1
                    yield index, result
                retire(worker, kill=bool(stuck))
                if worker.assigned:
                    culprit = worker.assigned.popleft()
                    todo.extendleft(reversed(worker.assigned))
                    failure = (WorkerFailure("timeout", f"no result after {timeout_s:.0f} s") if stuck
                               else WorkerFailure("crash", f"worker process died (exit code "
                                                  f"{worker.process.exitcode})"))
                    done += 1
                    yield culprit, on_failure(items[culprit], failure)
                if done < len(items):
                    start_worker()
    finally:
        for worker in pool:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for worker in pool:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
            worker.conn.close()
