"""One prediction per input video, and the files they are written to as they arrive.

:class:`Prediction` is what :class:`sfdeploy.client.Classifier` yields and the Ray engine sends
back; :class:`PredictionWriter` writes the rows to ``.csv``, ``.jsonl`` or ``.parquet`` so that a
killed run keeps every finished row and ``--resume`` continues it; :func:`arrow_schema` is the
row as Arrow (the ``.parquet`` output, and the rows Ray workers send back to the driver).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from sfdeploy.errors import InputError
from sfdeploy.inputs import require_pyarrow

if TYPE_CHECKING:
    from sfdeploy.decode.clips import DecodedBy

OUTPUT_FIELDS = ("path", "status", "label", "score", "top_k", "error", "decoder", "decoder_reason")


@dataclass(frozen=True)
class Prediction:
    """The one row of one input: its label and top classes, or why it could not be classified.
    Every input gets exactly one, so that a run's output accounts for every file it was given."""

    path: str
    status: str  # "ok" or "error"
    label: str | None = None
    score: float | None = None
    top_k: tuple[tuple[str, float], ...] = ()
    error: str | None = None
    decoder: str | None = None  # which decoder read the video (nvdec:<backend>, decord, pyav) ...
    decoder_reason: str | None = None  # ... and why that one (sfdeploy.decode.gpu.select)

    @property
    def ok(self) -> bool:
        """Whether the input was classified (else :attr:`error` says why not)."""
        return self.status == "ok"

    @classmethod
    def from_probs(cls, path: str, probs: np.ndarray, classes: Sequence[str], k: int,
                   decoded_by: DecodedBy | None = None) -> Prediction:
        """The row of a classified video from its probabilities ``[num_classes]``."""
        best = top_k(probs, classes, k)
        return cls(path, "ok", label=best[0][0], score=best[0][1], top_k=best, **_decoder_fields(decoded_by))

    def to_arrow_row(self) -> dict[str, Any]:
        """This row in :func:`arrow_schema` (``top_k`` as label/score records)."""
        return {**asdict(self), "top_k": [{"label": label, "score": score} for label, score in self.top_k]}

    @classmethod
    def from_arrow_row(cls, row: dict[str, Any]) -> Prediction:
        """The row back from :meth:`to_arrow_row` (a Ray worker's, or a Parquet file's; columns an
        older sfdeploy did not write are None)."""
        return cls(row["path"], row["status"], row["label"], row["score"],
                   tuple((pair["label"], pair["score"]) for pair in row["top_k"] or ()), row["error"],
                   row.get("decoder"), row.get("decoder_reason"))


def _decoder_fields(decoded_by: DecodedBy | None) -> dict[str, str | None]:
    if decoded_by is None or not decoded_by.decoder:
        return {}
    return {"decoder": decoded_by.decoder, "decoder_reason": decoded_by.reason}


def arrow_schema() -> Any:
    """The row as Arrow: the ``.parquet`` output, and the rows Ray workers send back to the driver.
    Scores are float64, so a float32 probability survives every format unchanged."""
    import pyarrow as pa

    pair = pa.struct([("label", pa.string()), ("score", pa.float64())])
    return pa.schema([("path", pa.string()), ("status", pa.string()), ("label", pa.string()),
                      ("score", pa.float64()), ("top_k", pa.list_(pair)), ("error", pa.string()),
                      ("decoder", pa.string()), ("decoder_reason", pa.string())])


def predictions_to_arrow(predictions: Iterable[Prediction]) -> Any:
    """Rows as an Arrow table of :func:`arrow_schema` (a Ray batch, a Parquet chunk)."""
    import pyarrow as pa

    return pa.Table.from_pylist([p.to_arrow_row() for p in predictions], schema=arrow_schema())


def top_k(probs: np.ndarray, classes: Sequence[str], k: int) -> tuple[tuple[str, float], ...]:
    """The ``k`` most probable ``(class, probability)`` pairs, best first (at least one: a row always
    has its label)."""
    order = np.argsort(-probs)[: max(1, k)]
    return tuple((classes[i], float(probs[i])) for i in order)


class _Rows:
    """How rows of one output format go to disk: the file they are appended to as they arrive
    (:attr:`journal`), how one is written, which paths a file begun earlier holds (``--resume``),
    and what becomes of the journal at the end. This one: JSON Lines, one object per row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.journal = path

    def earlier(self) -> set[str]:
        """Paths of the rows kept outside the journal (by an earlier run)."""
        return set()

    def paths(self, text: str) -> set[str]:
        """Paths of the complete rows in ``text``, the journal's."""
        return {json.loads(line)["path"] for line in text.splitlines() if line.strip()}

    def begin(self, handle: IO[str]) -> None:
        """Start writing to the open journal (a header where a new file needs one)."""

    def write(self, handle: IO[str], prediction: Prediction) -> None:
        """Append ``prediction`` to the journal."""
        row = asdict(prediction)
        row["top_k"] = [list(pair) for pair in prediction.top_k]
        handle.write(json.dumps(row) + "\n")

    def finish(self) -> None:
        """Make the output of the closed journal."""


class _CsvRows(_Rows):
    """CSV: one line per row, ``top_k`` as a JSON list in its column. A file begun by an earlier
    sfdeploy keeps its columns (rows written under its own header)."""

    writer: csv.DictWriter

    def paths(self, text: str) -> set[str]:
        """Paths of the complete rows in ``text``, the journal's."""
        return {row["path"] for row in csv.DictReader(text.splitlines())}

    def begin(self, handle: IO[str]) -> None:
        """The writer, under the columns of the CSV being continued, or a header for a new file."""
        self.writer = csv.DictWriter(handle, fieldnames=self._header() or OUTPUT_FIELDS, extrasaction="ignore")
        if handle.tell() == 0:
            self.writer.writeheader()

    def _header(self) -> list[str] | None:
        """The columns of the CSV being continued, when they are a subset of :data:`OUTPUT_FIELDS`."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return None
        with open(self.path, newline="") as existing:
            header = next(csv.reader(existing), [])
        return header if header and set(header) <= set(OUTPUT_FIELDS) else None

    def write(self, handle: IO[str], prediction: Prediction) -> None:
        """Append ``prediction`` as a CSV line (None as an empty field)."""
        row = asdict(prediction)
        row["top_k"] = json.dumps([list(pair) for pair in prediction.top_k]) if prediction.top_k else ""
        self.writer.writerow({k: ("" if row[k] is None else row[k]) for k in OUTPUT_FIELDS})


class _ParquetRows(_Rows):
    """Parquet cannot be appended to, and a file cut off by a kill has no footer: rows go to a JSON
    Lines journal beside it (``<out>.partial.jsonl``) as they arrive, and :meth:`finish` folds the
    journal into ``<out>`` (written to a temporary file, then renamed: never half a file)."""

    def __init__(self, path: Path) -> None:
        require_pyarrow(path, "writing .parquet", "write .csv / .jsonl")
        super().__init__(path)
        self.journal = path.with_name(path.name + ".partial.jsonl")

    def earlier(self) -> set[str]:
        """Paths of the finished Parquet file's rows, or an error when it is no predictions table."""
        if not self.path.exists():
            return set()
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return set(pq.read_table(self.path, columns=["path"]).column("path").to_pylist())
        except (pa.ArrowInvalid, KeyError, OSError) as exc:
            raise InputError(f"cannot continue the output: it is not a predictions table ({exc})", path=self.path,
                             fix="choose another --out (or move this file away to start over)") from exc

    def finish(self, chunk: int = 65536) -> None:
        """``<out>`` (rows of earlier runs) + the journal -> a new ``<out>``, streamed in chunks."""
        import pyarrow.parquet as pq

        partial = self.path.with_name(self.path.name + ".partial.parquet")
        with pq.ParquetWriter(partial, arrow_schema()) as parquet:
            if self.path.exists():
                for batch in pq.ParquetFile(self.path).iter_batches(batch_size=chunk):
                    if batch.schema.equals(parquet.schema):
                        parquet.write_batch(batch)
                    else:  # a file begun by an earlier sfdeploy (fewer columns): its rows as rows of this one
                        old = (Prediction.from_arrow_row(r) for r in batch.to_pylist())
                        parquet.write_table(predictions_to_arrow(old))
            with open(self.journal) as lines:
                rows: list[Prediction] = []
                for line in lines:
                    row = json.loads(line)
                    rows.append(Prediction(**{**row, "top_k": tuple(tuple(pair) for pair in row["top_k"])}))
                    if len(rows) == chunk:
                        parquet.write_table(predictions_to_arrow(rows))
                        rows.clear()
                if rows:
                    parquet.write_table(predictions_to_arrow(rows))
        os.replace(partial, self.path)
        self.journal.unlink()


#: The output formats, by file suffix.
OUTPUT_FORMATS: dict[str, type[_Rows]] = {".csv": _CsvRows, ".jsonl": _Rows, ".parquet": _ParquetRows}


class PredictionWriter:
    """Appends predictions to ``.csv``, ``.jsonl`` or ``.parquet`` as they arrive (flushed per row),
    so a killed run keeps every finished row; with ``resume`` the paths already written are skipped.
    Each format is a small writer of its own (:data:`OUTPUT_FORMATS`; ``.parquet`` keeps its rows
    in a journal until :meth:`close`).
    """

    def __init__(self, path: Path, resume: bool = False) -> None:
        self.path = Path(path)
        kind = OUTPUT_FORMATS.get(self.path.suffix.lower())
        if kind is None:
            raise InputError(f"unsupported output type '{self.path.suffix}'", path=self.path,
                             fix="name the output .csv, .jsonl (JSON Lines: one JSON object per input) or .parquet")
        self.rows = kind(self.path)
        self.journal = self.rows.journal
        self.done: set[str] = set()
        if self.path.exists() or self.journal.exists():
            if not resume:
                raise InputError("the output file exists", path=self.path if self.path.exists() else self.journal,
                                 fix="pass --resume to continue it, or choose another --out")
            self.done = self._read_done()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.journal, "a", newline="")
        except OSError as exc:
            raise InputError(f"cannot write the output ({exc.strerror})", path=self.path,
                             fix="choose a writable --out") from exc
        self.rows.begin(self.handle)
        self.handle.flush()

    def _read_done(self) -> set[str]:
        """Paths of the complete rows; a row cut off by a kill (no final newline) is dropped."""
        done = self.rows.earlier()
        if not self.journal.exists():
            return done
        text = self.journal.read_text()
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
            self.journal.write_text(text)
        return done | self.rows.paths(text)

    def write(self, prediction: Prediction) -> None:
        """Append one row, flushed, so that a kill after this call keeps it."""
        self.rows.write(self.handle, prediction)
        self.handle.flush()
        self.done.add(prediction.path)

    def close(self) -> None:
        """Close the output (a ``.parquet`` one is made from its journal now)."""
        self.handle.close()
        self.rows.finish()
