"""Keep one known, harmless Ray line off the console of an ``--engine ray`` run.

Ray Data creates its model actors with ``max_restarts=-1`` (a lost actor is restarted) and hands
them their constructor (the stage, its options and Ray Data's own context) as object references
it ``ray.put``s itself. Ray core then logs, at ERROR level and from C++ straight to file
descriptor 2, ``Actor ... 'MapWorker(MapBatches(PredictStage))' ... has constructor arguments in
the object store and max_restarts > 0`` on every run (ray-project/ray#53727, #57733). What it
warns about cannot happen here: those references belong to this driver for the whole run, and
their one copy lives on the driver's node, whose loss ends the run anyway. sfdeploy's own options
are small strings already, and no public Ray Data setting passes the constructor by value.

So the line is dropped from this process's stderr while the run lasts; every other line, Ray's
other errors included, passes through unchanged and at once (progress bars too), and Ray still
writes the line to its driver log (``python-core-driver-*.log`` in the session's logs).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator

HARMLESS = b"has constructor arguments in the object store and max_restarts > 0"
# One line of Ray's C++ log: "[2026-12-04 17:10:18,737 E 19398 19398] core_worker.cc:2465: ..." (or a
# JSON object with RAY_BACKEND_LOG_JSON=1). It may follow a progress bar's text on the terminal's line.
_LINE = rb'(?:\[\d{4}-\d\d-\d\d [^\]\n]*\] |\{")[^\n]*?%s[^\n]*\n?'


@contextlib.contextmanager
def without_harmless_ray_line(marker: bytes = HARMLESS) -> Iterator[None]:
    """While the block runs, the Ray log line that contains ``marker`` is dropped from fd 2.

    fd 2 becomes a pipe read by a thread that writes everything else to the real stderr. A
    logger writes a line at once, and a pipe keeps writes of up to 4 KiB whole, so the line is
    never split across two reads.
    """
    try:
        real = os.dup(2)
    except OSError:  # no stderr to filter
        yield
        return
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    pattern = re.compile(_LINE % re.escape(marker))
    pump = threading.Thread(target=_pump, args=(read_end, real, marker, pattern), name="sfdeploy-stderr",
                            daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last writer is gone: the pump drains it, reads its end and exits
        pump.join(timeout=5)


def _pump(read_end: int, real: int, marker: bytes, pattern: re.Pattern[bytes]) -> None:
    try:
        while chunk := os.read(read_end, 1 << 16):
            if marker in chunk:
                chunk = pattern.sub(b"", chunk)
                if marker in chunk:  # another format: drop the line that holds it
                    chunk = b"".join(line for line in chunk.splitlines(keepends=True) if marker not in line)
            while chunk:
                chunk = chunk[os.write(real, chunk):]
    finally:
        os.close(read_end)
        os.close(real)
