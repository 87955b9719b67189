"""Filesystem checks shared by the commands that write folders."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from sfdeploy.errors import InputError


def ensure_writable_dir(path: Path, what: str, option: str) -> Path:
    """Create ``path`` and prove it is writable before any long work starts, so a typo'd or
    read-only output fails in a second with the fix, not after an hour of training."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".sfdeploy_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"cannot write the {what} ({exc.strerror})", path=path,
                         fix=f"choose a writable {option}") from exc
    return path


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary file next to ``path`` (same suffix, for writers that go by it), then
    rename it over ``path``: readers, and other processes writing the same file (the nodes of a
    multi-node run on a shared filesystem), never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
