"""How busy the machine was while a benchmark row was measured, by work other than the benchmark.

The load average cannot say it: it counts the benchmark's own threads, its decode workers and the
server it started (and the training that ran a minute before, for a minute more). On a shared
machine the figure that matters is the CPU time *other* processes took while the row ran, and
that is measured here: the machine's busy CPU time (``/proc/stat``, steal included: a noisy
neighbour of a virtual machine) minus the CPU time of this process and every process under it
(``/proc/<pid>/stat``, children that have exited included), over the row's wall time. A row
during which other work took more than :data:`BUSY_SHARE` of the cores is marked ``busy``: its
figure is low and uneven, and every report says so. Where ``/proc`` is not there (not Linux) only
the load average is recorded.
"""

from __future__ import annotations

import os
import time
from typing import Any

#: other work taking more than this share of the cores makes a row "busy"
BUSY_SHARE = 0.25


def _machine_busy_ticks() -> int:
    """Busy CPU time of the whole machine since boot, in clock ticks (all cores)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal


def _process_ticks() -> tuple[dict[int, int], dict[int, list[int]]]:
    """Every process's CPU time with its waited-for children (ticks), and who is whose child."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
        except OSError:  # gone since the listing
            continue
        fields = text[text.rindex(")") + 2:].split()  # after "pid (name) ": state, ppid, ...
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        ticks[pid] = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return ticks, children


def _tree(root: int, children: dict[int, list[int]]) -> set[int]:
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found


def _sample() -> tuple[float, int, dict[int, int]] | None:
    """(time, the machine's busy ticks, {pid: ticks} of this process's tree)."""
    try:
        ticks, children = _process_ticks()
        return time.monotonic(), _machine_busy_ticks(), {pid: ticks.get(pid, 0)
                                                         for pid in _tree(os.getpid(), children)}
    except (OSError, ValueError, IndexError):
        return None


def _own_ticks(start: dict[int, int], end: dict[int, int]) -> int:
    """The benchmark's own CPU time between two samples: every process of its tree at the end, and
    those of its tree at the start still alive elsewhere (a server's workers, orphaned when the
    server stopped, leave the tree but not the machine), each counted from the start (or from 0 if
    it started since). One that ended counts through the parent that waited for it (cutime)."""
    now, _ = _process_ticks()
    pids = set(end) | {pid for pid in start if pid in now}
    return sum(max(0, now.get(pid, end.get(pid, 0)) - start.get(pid, 0)) for pid in pids)


class LoadMeter:
    """``with LoadMeter() as load: ...`` then ``load.result()``: the other work during the block."""

    def __enter__(self) -> LoadMeter:
        self.start = _sample()
        return self

    def __exit__(self, *exc: object) -> None:
        self.end = _sample()
        try:
            self.own = _own_ticks(self.start[2], self.end[2]) if self.start and self.end else 0
        except (OSError, ValueError, IndexError):
            self.end = None

    def result(self) -> dict[str, Any]:
        """``others_cores`` (cores' worth of CPU other processes used, on average; None where it
        cannot be measured), ``load_average`` (1, 5, 15 min, for comparison) and ``busy``."""
        cores = os.cpu_count() or 1
        others = None
        if self.start and self.end and self.end[0] > self.start[0]:
            ticks = (self.end[1] - self.start[1]) - self.own
            # never more than the machine has: a process of the tree that ended unwaited is unknown
            others = round(min(float(cores), max(0.0, ticks / os.sysconf("SC_CLK_TCK") /
                                                 (self.end[0] - self.start[0]))), 2)
        return {"others_cores": others, "load_average": [round(x, 2) for x in os.getloadavg()],
                "busy": others is not None and others > BUSY_SHARE * cores}


def measure_idle(seconds: float = 1.0) -> dict[str, Any]:
    """The other work on the machine over ``seconds`` of doing nothing (before a run starts)."""
    with LoadMeter() as load:
        time.sleep(seconds)
    return load.result()


def loaded_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose load counts: measured ones with a load measured (a skipped or failed row has
    no figure for other work to spoil)."""
    return [r for r in rows if r.get("status", "ok") == "ok" and r.get("others_cores") is not None]


def describe(rows: list[dict[str, Any]], cores: int) -> str:
    """One sentence on the other work during ``rows`` (those of :func:`loaded_rows`): what a reader
    of the figures must know."""
    rows = loaded_rows(rows)
    measured = [r["others_cores"] for r in rows]
    if not measured:
        return "other work on the machine was not measured (no /proc)"
    busy = sum(bool(r.get("busy")) for r in rows)
    text = f"other work took up to {max(measured):.2f} of {cores} cores while the rows were measured"
    if busy:
        return (f"{text}: BUSY during {busy} of {len(measured)} rows (marked busy), whose figures are low and "
                "uneven")
    return f"{text} (quiet: under {BUSY_SHARE:.0%} of the cores)"
