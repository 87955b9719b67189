"""The run's record: one JSON file that grows a row at a time, so a benchmark can stop anywhere.

Every measured row is appended to ``--out`` the moment it exists (written atomically: a reader,
or a run killed at any instant, sees the previous record or the new one, never half a file).
``--resume`` reopens the record, keeps its rows, and the run measures only the rows it lacks.

A row is identified by :data:`sfdeploy.bench.rows.ROW_KEY` (stage, backend, precision, batch,
concurrency). A record belongs to one set of settings and one machine: resuming with other settings
(iterations, batch sizes, model, device, ...) is an error rather than a table that silently mixes
two methods.
Rows that failed or were skipped (an out-of-memory batch, a missing provider) are measured again
on resume and replace the old entry, so every row appears exactly once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sfdeploy.bench.rows import OK, Key, row_key
from sfdeploy.bench.targets import targets
from sfdeploy.errors import InputError
from sfdeploy.fsutil import atomic_write_text

SCHEMA = 2

#: settings added since records were first written, with the value a record without them was measured with
LEGACY_SETTINGS: dict[str, Any] = {"min_time": 0.0}

#: device_info fields that must not change within one record (another GPU, another torch...)
_MACHINE_FIELDS = ("device", "gpu", "cpu", "cpu_cores", "python", "packages")

class Record:
    """The record file and its rows. :meth:`add` persists each row before returning."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = Path(path)
        self.data = data

    @classmethod
    def open(cls, path: Path, header: dict[str, Any], *, resume: bool) -> Record:
        """Start a record at ``path``, or continue the one there (``resume``) after checking that
        it was measured with the same ``header`` (settings, model, clip spec, machine)."""
        path = Path(path)
        header = json.loads(json.dumps(header))  # as the record file will hold it (tuples -> lists)
        if not path.is_file():
            record = cls(path, {"schema": SCHEMA, **header, "rows": [], "targets": []})
            record.save()
            return record
        if not resume:
            raise InputError("a benchmark record already exists here", path=path,
                             fix="pass --resume to continue it (its rows are kept), or choose another --out")
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise InputError(f"the record is not valid JSON ({exc})", path=path,
                             fix="choose another --out (the file was not written by sfdeploy bench)") from exc
        if data.get("schema") != SCHEMA or not isinstance(data.get("rows"), list):
            raise InputError(f"the record has schema {data.get('schema')}, this sfdeploy writes {SCHEMA}",
                             path=path, fix="start a new record with another --out")
        differences = _differences(data, header)
        if differences:
            raise InputError("--resume with settings that differ from the record's: " + "; ".join(differences),
                             path=path, fix="resume with the record's settings (see its 'settings'), or start a "
                                            "new record with another --out")
        added = added_packages(data, header)
        if added:  # kept in the record: its later rows ran beside these
            data["device_info"]["packages"].update(added)
            data.setdefault("packages_added_on_resume", []).append(
                {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "packages": added})
        return cls(path, data)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The measured rows, in the order they were measured."""
        return self.data["rows"]

    def done(self, key: Key) -> bool:
        """Whether ``key`` has a successful row (failed or skipped rows are tried again)."""
        return any(row_key(r) == key and r.get("status", OK) == OK for r in self.rows)

    def add(self, row: dict[str, Any]) -> None:
        """Append ``row`` (replacing an earlier failed/skipped try of the same key) and persist."""
        key = row_key(row)
        row = {**row, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.data["rows"] = [r for r in self.rows if row_key(r) != key] + [row]
        self.save()

    def save(self) -> None:
        """Write the record atomically, with its targets recomputed from the rows: a run killed at any point
        leaves a readable record."""
        self.data["targets"] = targets(self.data)
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")


def _differences(data: dict[str, Any], header: dict[str, Any]) -> list[str]:
    out = []
    for name in ("profile", "model", "clip_spec", "served"):
        if data.get(name) != header.get(name):
            out.append(f"{name}: record {data.get(name)!r}, now {header.get(name)!r}")
    recorded, now = ({**LEGACY_SETTINGS, **settings} for settings in (data.get("settings", {}), header["settings"]))
    for name in sorted(set(recorded) | set(now)):
        if recorded.get(name) != now.get(name):
            out.append(f"--{name.replace('_', '-')}: record {recorded.get(name)!r}, now {now.get(name)!r}")
    for name in _MACHINE_FIELDS:
        a, b = data.get("device_info", {}).get(name), header["device_info"].get(name)
        if name == "packages" and isinstance(a, dict) and isinstance(b, dict):
            # A package installed since the record began (the server, added to a host in a second
            # step) changes none of the rows measured before it: only a changed or removed one does.
            changed = {dist: (a[dist], b.get(dist)) for dist in a if a[dist] != b.get(dist)}
            if changed:
                out.append("machine packages: " + ", ".join(f"{d} record {v!r}, now {w!r}"
                                                            for d, (v, w) in sorted(changed.items())))
            continue
        if a != b:
            out.append(f"machine {name}: record {a!r}, now {b!r}")
    return out


def added_packages(data: dict[str, Any], header: dict[str, Any]) -> dict[str, str]:
    """Packages present now that the record's machine did not have when it began."""
    recorded = data.get("device_info", {}).get("packages", {})
    return {d: v for d, v in header["device_info"].get("packages", {}).items() if d not in recorded}
