"""The output of an inference run, whichever engine classifies: one row per input, and a summary.

:func:`write_predictions` expands the inputs (once per run), skips those already in the output
(``--resume``), writes the rows of the inputs that cannot be classified (a missing file, a folder
without videos) itself, and writes the engine's predictions as they arrive. The local engine
(:func:`sfdeploy.client.infer`) and the Ray engine (:func:`sfdeploy.scale.engine.infer_ray`) both
run through it, so they write the same files and summaries, and resume each other's runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from sfdeploy.errors import ServingError
from sfdeploy.inputs import collect_inputs
from sfdeploy.predictions import Prediction, PredictionWriter


@dataclass
class InferSummary:
    """What one run did: the counts ``sfdeploy infer`` prints as its JSON line (scripts parse
    it), and the failed inputs with their errors (printed one per line)."""

    out: str
    inputs: int
    skipped: int  # already in the output (--resume)
    ok: int = 0
    failed: int = 0
    wall_time_s: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)

    @property
    def videos_per_s(self) -> float:
        """Inputs answered per second of the run (failed ones too: they cost a decode)."""
        return (self.ok + self.failed) / self.wall_time_s if self.wall_time_s else 0.0

    def describe(self) -> str:
        """The run in one line; a rate only when videos were classified (failures are no throughput)."""
        line = f"{self.ok} classified, {self.failed} failed, {self.skipped} already in {self.out}"
        return line + (f"; {self.videos_per_s:.1f} videos/s" if self.ok else "")

    def count(self, prediction: Prediction) -> None:
        """Count one written row."""
        if prediction.ok:
            self.ok += 1
        else:
            self.failed += 1
            self.failures.append({"path": prediction.path, "error": prediction.error or ""})


def write_predictions(inputs: Sequence[str | Path], out: str | Path,
                      classify: Callable[[list[str]], Iterable[Prediction]], *, resume: bool = False) -> InferSummary:
    """Expand ``inputs``, skip those already in ``out`` (``resume``), and write one row per input
    as it arrives: an error row for an input that is not a video file, and ``classify(videos)``'s
    predictions for the video files (expanded already: ``classify`` expands nothing).

    A path that arrives twice (an engine that retries work, like Ray) is written once. On a
    backend failure the rows so far are kept and a :class:`ServingError` says how to continue.
    """
    writer = PredictionWriter(Path(out), resume=resume)
    started = time.monotonic()
    expanded: dict[str, str | None] = {}  # path -> why it cannot be classified (None: a video file)
    for path, error in collect_inputs(inputs):
        expanded.setdefault(path, error)
    todo = {path: error for path, error in expanded.items() if path not in writer.done}
    summary = InferSummary(out=str(out), inputs=len(expanded), skipped=len(expanded) - len(todo))
    unusable = [Prediction(path, "error", error=error) for path, error in todo.items() if error]
    try:
        for prediction in chain(unusable, classify([path for path, error in todo.items() if not error])):
            if prediction.path in writer.done:
                continue
            writer.write(prediction)
            summary.count(prediction)
    except ServingError as exc:
        raise ServingError(f"{exc.message}; {summary.ok + summary.failed} of {len(todo)} rows were written "
                           f"before it", path=out, fix=f"{exc.fix or 'restart the server'}, then run the same "
                           "command with --resume (finished rows are kept and skipped)") from exc
    finally:
        writer.close()
        summary.wall_time_s = round(time.monotonic() - started, 3)
    return summary

