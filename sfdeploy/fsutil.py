"""Filesystem mechanisms shared by the commands that write folders and files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from sfdeploy.errors import InputError

PARTIAL_SUFFIX = ".partial"  # what a file is called while it is being written


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


def partial_path(path: Path) -> Path:
    """The hidden temporary name ``path`` is written under before :func:`commit` renames it; it
    keeps the suffix, for readers that go by it (torch.export's loader wants ``.pt2``)."""
    path = Path(path)
    return path.with_name(f".{path.stem}{PARTIAL_SUFFIX}{path.suffix}")


def remove_partials(folder: Path) -> None:
    """Delete the temporary files a process killed while writing into ``folder`` left behind
    (:func:`partial_path` and :func:`replace_atomically` names)."""
    for stale in Path(folder).glob(f".*{PARTIAL_SUFFIX}*"):
        stale.unlink(missing_ok=True)


def commit(partial: Path, final: Path) -> None:
    """Rename a finished temporary file onto its final name: atomic on one filesystem, so a reader
    (or a process killed at any moment) sees the old file or the new one, never half of one."""
    os.replace(partial, final)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that no reader ever sees half of it (see :func:`replace_atomically`)."""
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary file next to ``path`` (same suffix, for writers that go by it), then
    rename it over ``path``: readers, and other processes writing the same file (the nodes of a
    multi-node run on a shared filesystem), never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}{PARTIAL_SUFFIX}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
