"""Lists of inputs in a file (``sfdeploy infer --inputs-from FILE``).

An archive of millions of videos is too big for a command line, and listing its folders on shared
storage takes hours: users keep lists instead. Three kinds are read, each entry taken as given
(relative entries are relative to the current directory, like paths on the command line) and
then treated exactly like an input argument (files, or folders to expand):

* ``.csv``: a header row with a ``path`` column (other columns, e.g. labels, are ignored);
* ``.parquet``: a ``path`` column of strings (needs pyarrow: ``sfdeploy[ray]``);
* anything else: text, one path per line; blank lines and lines starting with ``#`` are skipped.

:func:`collect_inputs` expands what the user passed (files and folders) into the videos of one
run, once per run, for every engine.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

from sfdeploy.data.probe import VIDEO_EXTENSIONS
from sfdeploy.errors import EnvironmentProblem, InputError

PATH_COLUMN = "path"


def read_input_list(path: str | Path) -> list[str]:
    """The paths listed in ``path`` (see the module docstring for the formats)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("the input list does not exist", path=path, fix="pass --inputs-from an existing file")
    kind = path.suffix.lower()
    if kind == ".parquet":
        return _parquet_paths(path)
    try:
        with open(path, newline="") as handle:
            if kind == ".csv":
                return _csv_paths(path, csv.DictReader(handle))
            return [s for line in handle if (s := line.strip()) and not s.startswith("#")]
    except UnicodeDecodeError as exc:
        raise InputError("the input list is not text", path=path,
                         fix="one path per line (.txt), a .csv with a 'path' column, or a .parquet file") from exc


def collect_inputs(items: Iterable[str | Path]) -> list[tuple[str, str | None]]:
    """Expand folders into their videos (recursively, sorted); ``(path, error or None)`` per input.
    A missing path or a folder without videos is an input with an error, not a silent skip."""
    found: list[tuple[str, str | None]] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            videos = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
            if not videos:
                found.append((str(path), f"folder has no videos ({', '.join(VIDEO_EXTENSIONS)}); "
                                         "pass a folder with videos, or the video files"))
            found += [(str(v), None) for v in videos]
        elif path.is_file():
            found.append((str(path), None))
        else:
            found.append((str(path), "file not found; check the path"))
    return found


def _csv_paths(path: Path, reader: csv.DictReader) -> list[str]:
    if reader.fieldnames is None or PATH_COLUMN not in reader.fieldnames:
        raise InputError(f"the CSV input list has no '{PATH_COLUMN}' column (columns: "
                         f"{', '.join(reader.fieldnames or []) or 'none'})", path=path,
                         fix=f"add a header row naming the column of paths '{PATH_COLUMN}'")
    return [row[PATH_COLUMN].strip() for row in reader if (row[PATH_COLUMN] or "").strip()]


def require_pyarrow(path: Path, needed_for: str, instead: str) -> None:
    """pyarrow (optional: the ``[ray]`` extra pins it) for Parquet lists and outputs, or a clear error."""
    try:
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise EnvironmentProblem(f"{needed_for} needs pyarrow, which is not installed", path=path,
                                 fix=f"pip install 'sfdeploy[ray]', or {instead}") from exc


def _parquet_paths(path: Path) -> list[str]:
    require_pyarrow(path, "reading a .parquet input list", "list the paths in a .txt")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"cannot read the Parquet input list ({exc})", path=path,
                         fix="pass a valid .parquet file") from exc
    column_type = schema.field(PATH_COLUMN).type if PATH_COLUMN in schema.names else None
    if column_type is None or not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise InputError(f"the Parquet input list has no '{PATH_COLUMN}' column of strings (columns: "
                         f"{', '.join(f'{f.name}: {f.type}' for f in schema)})", path=path,
                         fix=f"name the column of paths '{PATH_COLUMN}'")
    return [p for p in pq.read_table(path, columns=[PATH_COLUMN]).column(PATH_COLUMN).to_pylist() if p]
