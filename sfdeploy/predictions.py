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
from typing import TYPE_CHECKING, Any

import numpy as np

from sfdeploy.errors import InputError
from sfdeploy.inputs import require_pyarrow

if TYPE_CHECKING:
    from sfdeploy.gpudecode.pool import DecodedBy

OUTPUT_FIELDS = ("path", "status", "label", "score", "top_k", "error", "decoder", "decoder_reason")


@dataclass(frozen=True)
class Prediction:
    path: str
    status: str  # "ok" or "error"
    label: str | None = None
    score: float | None = None
    top_k: tuple[tuple[str, float], ...] = ()
    error: str | None = None
    decoder: str | None = None  # which decoder read the video (nvdec:<backend>, decord, pyav) ...
    decoder_reason: str | None = None  # ... and why that one (sfdeploy.gpudecode.select)

    @property
    def ok(self) -> bool:
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
    import pyarrow as pa

    return pa.Table.from_pylist([p.to_arrow_row() for p in predictions], schema=arrow_schema())


def top_k(probs: np.ndarray, classes: Sequence[str], k: int) -> tuple[tuple[str, float], ...]:
    order = np.argsort(-probs)[: max(1, k)]
    return tuple((classes[i], float(probs[i])) for i in order)


class PredictionWriter:
    """Appends predictions to ``.csv``, ``.jsonl`` or ``.parquet`` as they arrive (flushed per row),
    so a killed run keeps every finished row; with ``resume`` the paths already written are skipped.

    Parquet cannot be appended to, and a file cut off by a kill has no footer: its rows go to a
    JSON Lines journal beside it (``<out>.partial.jsonl``) as they arrive, and :meth:`close` folds
    the journal into ``<out>`` (written to a temporary file, then renamed: never half a file).
    """

    def __init__(self, path: Path, resume: bool = False) -> None:
        self.path = Path(path)
        self.format = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}.get(self.path.suffix.lower())
        if self.format is None:
            raise InputError(f"unsupported output type '{self.path.suffix}'", path=self.path,
                             fix="name the output .csv, .jsonl (JSON Lines: one JSON object per input) or .parquet")
        if self.format == "parquet":
            require_pyarrow(self.path, "writing .parquet", "write .csv / .jsonl")
        self.journal = self.path.with_name(self.path.name + ".partial.jsonl") if self.format == "parquet" else self.path
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
        # a file begun by an earlier sfdeploy keeps its columns (rows written under its own header)
        fields = self._csv_header() or OUTPUT_FIELDS
        self.csv = csv.DictWriter(self.handle, fieldnames=fields, extrasaction="ignore") if self.format == "csv" else None
        if self.csv and self.handle.tell() == 0:
            self.csv.writeheader()
            self.handle.flush()

    def _csv_header(self) -> list[str] | None:
        """The columns of the CSV being continued, when they are a subset of :data:`OUTPUT_FIELDS`."""
        if self.format != "csv" or not self.path.is_file() or self.path.stat().st_size == 0:
            return None
        with open(self.path, newline="") as existing:
            header = next(csv.reader(existing), [])
        return header if header and set(header) <= set(OUTPUT_FIELDS) else None

    def _read_done(self) -> set[str]:
        """Paths of the complete rows; a row cut off by a kill (no final newline) is dropped."""
        done: set[str] = set()
        if self.format == "parquet" and self.path.exists():
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                done = set(pq.read_table(self.path, columns=["path"]).column("path").to_pylist())
            except (pa.ArrowInvalid, KeyError, OSError) as exc:
                raise InputError(f"cannot continue the output: it is not a predictions table ({exc})", path=self.path,
                                 fix="choose another --out (or move this file away to start over)") from exc
        if not self.journal.exists():
            return done
        text = self.journal.read_text()
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
            self.journal.write_text(text)
        if self.format == "csv":
            return done | {row["path"] for row in csv.DictReader(text.splitlines())}
        return done | {json.loads(line)["path"] for line in text.splitlines() if line.strip()}

    def write(self, prediction: Prediction) -> None:
        row = asdict(prediction)
        if self.csv:
            row["top_k"] = json.dumps([list(pair) for pair in prediction.top_k]) if prediction.top_k else ""
            self.csv.writerow({k: ("" if row[k] is None else row[k]) for k in OUTPUT_FIELDS})
        else:
            row["top_k"] = [list(pair) for pair in prediction.top_k]
            self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()
        self.done.add(prediction.path)

    def close(self) -> None:
        self.handle.close()
        if self.format == "parquet":
            self._fold_journal()

    def _fold_journal(self, chunk: int = 65536) -> None:
        """``<out>`` (rows of earlier runs) + the journal -> a new ``<out>``, streamed in chunks."""
        import pyarrow.parquet as pq

        partial = self.path.with_name(self.path.name + ".partial.parquet")
        with pq.ParquetWriter(partial, arrow_schema()) as parquet:
            if self.path.exists():
                for batch in pq.ParquetFile(self.path).iter_batches(batch_size=chunk):
                    if batch.schema.equals(parquet.schema):
                        parquet.write_batch(batch)
                    else:  # a file begun by an earlier sfdeploy (fewer columns): its rows as rows of this one
                        parquet.write_table(predictions_to_arrow(Prediction.from_arrow_row(r) for r in batch.to_pylist()))
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
