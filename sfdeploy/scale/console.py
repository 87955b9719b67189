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
import uuid
from collections.abc import Iterator

HARMLESS = b"has constructor arguments in the object store and max_restarts > 0"
# Where a line of Ray's C++ log starts: "[2026-12-04 17:10:18,737 E 19398 19398] core_worker.cc:2465: ..."
# (a JSON object with RAY_BACKEND_LOG_JSON=1). It may follow a progress bar's text on a terminal line.
_RAY_LINE_START = rb'\[\d{4}-\d\d-\d\d [^\]\n]*\] |\{"'
HOLD_S = 0.1  # how long the start of a Ray line may wait for its end before it is passed on as it is


@contextlib.contextmanager
def without_harmless_ray_line(marker: bytes = HARMLESS) -> Iterator[None]:
    """While the block runs, the Ray log line that contains ``marker`` is dropped from fd 2.

    fd 2 becomes a pipe (a pseudo-terminal of the same size when stderr is a terminal, so progress
    bars still see one) read by a thread that writes everything else to the real stderr at once.
    At the end a unique last word goes through it: the thread has then passed on everything
    written before (a pseudo-terminal may drop what is unread when its writer closes).
    """
    try:
        real = os.dup(2)
    except OSError:  # no stderr to filter
        yield
        return
    sys.stderr.flush()
    read_end, write_end = _terminal_like(real) or os.pipe()
    os.dup2(write_end, 2)
    last_word = b"\0sfdeploy-end-%s\0" % uuid.uuid4().hex.encode()
    pump = threading.Thread(target=_pump, args=(read_end, real, marker, last_word), name="sfdeploy-stderr",
                            daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)
        _write(write_end, last_word)
        pump.join(timeout=5)
        os.close(write_end)


def _terminal_like(real: int) -> tuple[int, int] | None:
    """A pseudo-terminal as big as the terminal ``real``, passing bytes as written (raw); None
    when ``real`` is no terminal (or no pseudo-terminal can be had)."""
    import fcntl
    import pty
    import termios
    import tty

    if not os.isatty(real):
        return None
    try:
        reader, writer = pty.openpty()
    except OSError:
        return None
    tty.setraw(writer)
    with contextlib.suppress(OSError):
        fcntl.ioctl(writer, termios.TIOCSWINSZ, fcntl.ioctl(real, termios.TIOCGWINSZ, b"\0" * 8))
    return reader, writer


def _pump(read_end: int, real: int, marker: bytes, last_word: bytes) -> None:
    """Copy ``read_end`` to ``real`` without the lines holding ``marker``, until ``last_word``.

    A chunk that ends inside a Ray log line (or inside the last word) keeps that part back until
    the rest comes, or :data:`HOLD_S` passes, so what was split across two reads is seen whole.
    """
    import select

    harmless = re.compile(rb"(?:%s)[^\n]*?%s[^\n]*\n?" % (_RAY_LINE_START, re.escape(marker)))
    starts = re.compile(_RAY_LINE_START)
    held = b""
    try:
        while True:
            if held and not select.select([read_end], [], [], HOLD_S)[0]:
                _write(real, held)
                held = b""
                continue
            try:
                chunk = os.read(read_end, 1 << 16)
            except OSError:  # a pseudo-terminal whose writers are gone
                chunk = b""
            data, end, _ = (held + chunk).partition(last_word)
            data = harmless.sub(b"", data)
            if marker in data:  # the line in another format: drop the line that holds it
                data = b"".join(line for line in data.splitlines(keepends=True) if marker not in line)
            if end or not chunk:
                _write(real, data)
                return
            found = list(starts.finditer(data))
            last = found[-1] if found else None  # the last line start in the held data
            cut = last.start() if last and b"\n" not in data[last.start():] else len(data)
            cut = min(cut, next((len(data) - n for n in range(len(last_word) - 1, 0, -1)
                                 if data.endswith(last_word[:n])), len(data)))
            _write(real, data[:cut])
            held = data[cut:]
    finally:
        os.close(read_end)
        os.close(real)


def _write(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]
