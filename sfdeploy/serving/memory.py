"""What a server's process tree holds in memory: now, and at its peak while something runs.

Used by tests and benchmarks that hold the server to memory targets (a hostile upload, a soak):
the tree is tritonserver's process group (the server, its python-backend stubs, their decode
workers) and the guard. Shared memory is the trap in measuring it: tritonserver and each stub map
the stub's shared-memory region, so summing RSS counts those pages twice; PSS counts each page
once (a page two processes share is half in each), which is the memory the tree takes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path


def _pss_kb(proc: Path) -> int:
    """A process's proportional set size: its private pages, and its share of each page it maps
    with others (``/proc/<pid>/smaps_rollup``)."""
    for line in (proc / "smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def process_group_memory(*pgids: int) -> dict[str, float]:
    """Memory of every process in the groups ``pgids``, in MB: ``rss`` now; ``pss`` now, the tree's
    memory with each shared page counted once; and ``peak``, the sum of each process's high-water
    mark of RSS (an upper bound: shared pages twice, peaks of different moments added)."""
    rss = peak = pss = 0
    processes = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) not in pgids:
                continue
            status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
            share = _pss_kb(proc)
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        processes += 1
        rss += int(status.get("VmRSS", "0 kB").split()[0])
        peak += int(status.get("VmHWM", "0 kB").split()[0])
        pss += share
    return {"processes": processes, "rss_mb": round(rss / 1024, 1), "pss_mb": round(pss / 1024, 1),
            "peak_mb": round(peak / 1024, 1)}


class MemoryWatch:
    """The highest ``pss_mb`` a reader (:meth:`TritonServer.memory <sfdeploy.serving.server.TritonServer.memory>`)
    gives while the block runs, polled every ``interval_s`` (the kernel keeps no high-water mark of
    PSS): ``with MemoryWatch(server.memory) as watch: ...``, then ``watch.grown_mb``."""

    def __init__(self, read: Callable[[], dict[str, float]], interval_s: float = 0.1) -> None:
        self.read, self.interval_s = read, interval_s
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True, name="memory-watch")

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, self.read()["pss_mb"])

    def __enter__(self) -> MemoryWatch:
        self.start_mb = self.peak_mb = self.read()["pss_mb"]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.read()["pss_mb"])

    @property
    def grown_mb(self) -> float:
        """How far the peak rose above the reading before the block."""
        return self.peak_mb - self.start_mb
