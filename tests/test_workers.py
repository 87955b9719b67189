"""The isolated worker pool: a crash or a hang costs one item, not the batch."""

from __future__ import annotations

import os
import signal
import time

from sfdeploy.workers import WorkerFailure, imap_isolated


def square_or_misbehave(x: int) -> int:
    if x == 3:
        os.kill(os.getpid(), signal.SIGSEGV)  # what a decoder bug does to the process
    if x == 5:
        time.sleep(60)
    if x == 7:
        raise ValueError("bad item")
    return x * x


def _failed(x: int, failure: WorkerFailure) -> str:
    return failure.kind


def test_crash_hang_and_error_are_isolated_to_their_items() -> None:
    results = dict(imap_isolated(square_or_misbehave, range(12), workers=2, on_failure=_failed, timeout_s=3))
    assert results.pop(3) == "crash"
    assert results.pop(5) == "timeout"
    assert results.pop(7) == "error"
    assert results == {i: i * i for i in range(12) if i not in (3, 5, 7)}


def test_empty_input_yields_nothing() -> None:
    assert list(imap_isolated(square_or_misbehave, [], workers=2, on_failure=_failed)) == []


def crash_on_multiples_of_7(x: int) -> int:
    if x and x % 7 == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return -x


def test_every_item_answered_exactly_once_across_many_crashes() -> None:
    """Results finished just before a crash must not be lost with the crashed worker."""
    seen = list(imap_isolated(crash_on_multiples_of_7, range(60), workers=2, prefetch=3, on_failure=_failed))
    assert sorted(i for i, _ in seen) == list(range(60))
    for index, result in seen:
        assert result == ("crash" if index and index % 7 == 0 else -index)
