"""The server's memory budget: how much memory the requests in flight may cost, server-wide.

Why. A request costs the server a multiple of its size while it is handled, and the guard is the
one place that sees every request's size before tritonserver holds any of it. Measured on the
demo's repository (2-core VM, the tree's memory with shared pages counted once): a body lives in
tritonserver (1x) and is copied into the python backend's shared memory (1x); a clip model's
instance reads it there in place (DLPack), a ``<name>_video`` instance copies the BYTES items out
(the stub's numpy bridge, 1x) and hands each video to its decode worker (1x). So a clip request
costs ~2x its body and a video request ~4x, and three 250 MB video uploads at once took 4.65 GB
before the budget. Each request is charged ``body x its model's cost factor``
(:attr:`GuardConfig.costs`; other paths 1x) when its size is known (``Content-Length``, a gRPC
message's length prefix; a chunked body as its chunks arrive), and refunded when its answer has
gone out. A request that does not fit while others are in flight is answered at once with HTTP
503 / gRPC UNAVAILABLE and "retry later", before its body is read; a request alone in flight is
always admitted, so any request within its size limit can be served.
"""

from __future__ import annotations

import threading

#: Memory the requests in flight may cost at once, by default (``sfdeploy serve --memory-budget-mb``):
#: one 257 MB upload to ``<name>_video`` (~1 GB at 4x) beside a stream of small ones, or four
#: 154 MB batches of R50 clips (2x) to ``<name>``.
DEFAULT_BUDGET_MB = 1280
#: What a request costs per byte of its body: a clip model's (the body, and its copy in the python
#: backend's shared memory), a video model's (plus the backend's copy and its decode worker's).
CLIP_COST = 2.0
VIDEO_COST = 4.0


class Budget:
    """The memory the requests in flight may cost (``limit`` bytes; 0: no limit), shared by every
    connection of the guard, HTTP and gRPC alike."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, cost: int) -> bool:
        """Charge ``cost``; False (nothing charged) when it does not fit beside what is in flight.
        Alone in flight, a request always fits."""
        with self._lock:
            if self.limit and self.used and self.used + cost > self.limit:
                return False
            self.used += cost
            return True

    def give(self, cost: int) -> None:
        """Refund what :meth:`take` charged, once the request's answer has gone out."""
        with self._lock:
            self.used = max(0, self.used - cost)


_SHARED = Budget(0)


def install(limit: int) -> Budget:
    """Set the guard process's one budget (its ``main`` does, from :attr:`GuardConfig.memory_budget`)."""
    _SHARED.limit = limit
    return _SHARED


def shared() -> Budget:
    """The guard process's budget, which every connection charges."""
    return _SHARED


def retry_later(cost: int, budget: Budget) -> str:
    """Why a request was not admitted, and what the client should do."""
    return (f"the server is busy: the requests in flight may cost {budget.limit / 2**20:.0f} MB of memory and "
            f"{budget.used / 2**20:.0f} MB is taken; this one would cost {cost / 2**20:.0f} MB. Retry later "
            "(or send smaller requests); the server's owner can raise `sfdeploy serve --memory-budget-mb`")
