"""Progress bars for long work, on stderr so that stdout stays machine-readable."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


def bar(total: int | None, *, desc: str, unit: str = "it", enabled: bool = True) -> Any:
    """A tqdm bar to ``update()`` by hand (when items finish out of order or in groups)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5)


def progress(items: Iterable[T], *, desc: str, unit: str = "it", total: int | None = None,
             enabled: bool = True) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar (disabled for quiet library calls from tests or scripts)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar(total, desc=desc, unit=unit, enabled=enabled) as shown:
        for item in items:
            yield item
            shown.update(1)


@contextmanager
def elapsed(desc: str, *, enabled: bool = True, every_s: float = 1.0) -> Iterator[None]:
    """A progress line that counts the seconds of one long call that reports no progress of its
    own (an AOTInductor compilation), refreshed from a background thread until the block ends."""
    import threading

    from tqdm import tqdm

    line = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(every_s):
            line.refresh()

    ticker = threading.Thread(target=tick, name="sfdeploy-elapsed", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        line.close()
