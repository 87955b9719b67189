"""Progress bars for long work, on stderr so that stdout stays machine-readable."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(
    items: Iterable[T],
    *,
    desc: str,
    unit: str = "it",
    total: int | None = None,
    enabled: bool = True,
) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar (hidden when disabled or when stderr is not a terminal
    and the work is short), so library calls from tests or scripts stay quiet."""
    from tqdm import tqdm

    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    yield from tqdm(
        items,
        desc=desc,
        unit=unit,
        total=total,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
    )
