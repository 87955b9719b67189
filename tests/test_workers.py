"""The isolated worker pool: a crash or a hang costs one item, not the batch; workers are their own
interpreter (``python -m sfdeploy.workers``) that imports only the function's module."""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
import types
from pathlib import Path

import pytest

from sfdeploy.errors import EnvironmentProblem, InputError
from sfdeploy.workers import IsolatedPool, WorkerFailure, imap_isolated, python_executable


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


def pid_or_crash(x: int) -> int:
    if x < 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def test_a_pool_keeps_its_workers_between_calls_and_replaces_dead_ones() -> None:
    """What a Triton model instance does: request after request on the same warm workers."""
    with IsolatedPool(pid_or_crash, workers=2, on_failure=_failed, timeout_s=30) as pool:
        pool.warm()
        started = {w.process.pid for w in pool.pipes.workers}
        assert len(started) == 2 and all(w.ready for w in pool.pipes.workers)
        for _ in range(3):
            assert set(dict(pool.imap(range(6))).values()) <= started  # no new interpreter per call
        assert dict(pool.imap([1, -1, 2]))[1] == "crash"  # a crash costs its item ...
        assert len(dict(pool.imap(range(4)))) == 4  # ... and the next call has every worker back
        idle = pool.pipes.workers[0].process
        idle.kill()  # dies while idle: replaced, and no item of the next call is blamed for it
        idle.wait()
        assert all(isinstance(r, int) for r in dict(pool.imap(range(4))).values())
        results = pool.imap(range(50))
        next(results)
        results.close()  # the caller stops early: workers still busy with its items are stopped
        assert len(dict(pool.imap(range(4)))) == 4
    assert pool._pipes is None


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


def shout_and_echo(x: bytes) -> bytes:
    print("noise on stdout", flush=True)  # a chatty fn (or native library) must not corrupt the protocol
    os.write(1, b"raw noise on fd 1\n")
    return x[::-1]


def test_large_items_and_results_both_ways_and_prints_do_not_break_the_pipe() -> None:
    items = [bytes([i]) * (3_000_000 + i) for i in range(6)]  # far larger than a pipe's buffer
    results = dict(imap_isolated(shout_and_echo, items, workers=2, prefetch=3, on_failure=_failed))
    assert results == {i: item[::-1] for i, item in enumerate(items)}


def _nested_is_refused() -> None:
    def local(x: int) -> int:
        return x

    with pytest.raises(InputError, match="inside another function") as info:
        list(imap_isolated(local, [1], workers=1, on_failure=_failed))
    assert "top level of an importable module" in info.value.fix


def test_functions_that_cannot_be_imported_are_refused_up_front() -> None:
    with pytest.raises(InputError, match="lambda"):
        list(imap_isolated(lambda x: x, [1], workers=1, on_failure=_failed))
    _nested_is_refused()
    with pytest.raises(InputError, match="no module and qualified name"):
        list(imap_isolated(functools.partial(square_or_misbehave), [1], workers=1, on_failure=_failed))
    main_function = types.FunctionType(square_or_misbehave.__code__, {"__name__": "__main__"}, "script_fn")
    with pytest.raises(InputError, match="main module"):
        list(imap_isolated(main_function, [1], workers=1, on_failure=_failed))
    with pytest.raises(InputError, match="init"):
        list(imap_isolated(square_or_misbehave, [1], workers=1, on_failure=_failed, init=lambda: None))


def failing_init() -> None:
    raise RuntimeError("no decoder here")


def test_a_worker_that_cannot_start_is_an_environment_error() -> None:
    with pytest.raises(EnvironmentProblem, match="no decoder here"):
        list(imap_isolated(square_or_misbehave, range(4), workers=2, on_failure=_failed, init=failing_init))


def test_embedded_interpreter_falls_back_to_the_environments_python(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    """In Triton's python backend sys.executable is the stub binary, not a Python."""
    stub = tmp_path / "triton_python_backend_stub"
    stub.write_text("#!/bin/sh\nexit 3\n")
    stub.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(stub))
    monkeypatch.delenv("SFDEPLOY_PYTHON", raising=False)
    python = python_executable()
    assert Path(python).parent == Path(sys.prefix) / "bin" and Path(python).name.startswith("python3")
    assert dict(imap_isolated(square_or_misbehave, [2, 4], workers=1, on_failure=_failed)) == {0: 4, 1: 16}
    monkeypatch.setenv("SFDEPLOY_PYTHON", str(stub))
    assert python_executable() == str(stub)
    with pytest.raises(EnvironmentProblem, match="exited while starting"):
        list(imap_isolated(square_or_misbehave, [2], workers=1, on_failure=_failed))
