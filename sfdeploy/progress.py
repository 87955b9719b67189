"""Progress bars for long work, on stderr so that stdout stays machine-readable."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
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
