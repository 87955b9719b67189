"""Model analysis for ``sfdeploy eval``: what the model gets right and wrong, class by class.

Top-1 over all videos hides a class the model never gets right when the val split is imbalanced,
so ``eval`` also reports, from the same predictions (whatever backend made them, Triton included):

- per-class accuracy (recall: the share of a class's val videos predicted as that class) and the
  *mean class accuracy*, exactly MMAction2's ``mean_class_accuracy`` (the ``acc/mean1`` that
  ``finetune`` logs), so the two numbers can be compared;
- the confusion matrix (rows: true class, columns: predicted class, counts) and the most confused
  pairs (true -> predicted), with a PNG that stays readable at 400 classes (:func:`plotted_classes`);
- a contact sheet of misclassified val clips exactly as the model received them
  (:class:`MistakeSheet`), drawn by :mod:`sfdeploy.sheet`.

Pure numpy + matplotlib (Agg, no pyplot state) + PIL: nothing here runs a model.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfdeploy import sheet
from sfdeploy.fsutil import atomic_write_text, ensure_writable_dir, replace_atomically

MAX_PLOT_CLASSES = 30  # a confusion PNG with more rows than this cannot be read; see plotted_classes
TOP_PAIRS = 10  # most confused pairs in the report
MAX_SHEET_CLIPS = 16  # misclassified clips on the sheet (and the most ever held in memory)
MAX_SHEET_FRAMES = 16  # frames drawn per clip (evenly spaced in time when the clip has more)
LABEL_CHARS = 28  # class names on the PNG's axes are cut to this length
CONFUSION_JSON, CONFUSION_PNG, MISCLASSIFIED_PNG = "confusion.json", "confusion.png", "misclassified.png"
PLOT_RULE = (f"all classes when there are at most {MAX_PLOT_CLASSES}; else the {MAX_PLOT_CLASSES} classes with the "
             "most errors (wrong predictions of the class + wrong predictions as the class), in class order")


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[num_classes, num_classes]``: row = true class, column = predicted class, so row i
    sums to the videos of class i and the whole matrix to the videos evaluated."""
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def mean_class_accuracy(matrix: np.ndarray) -> float:
    """MMAction2's ``mean_class_accuracy``, from the confusion matrix: the mean, over the classes
    that occur as a true label *or as a prediction*, of the class's recall, where a class with no
    val video (only predicted) counts as 0. Classes neither in the val labels nor predicted are left
    out. That is MMAction2's own definition (its confusion matrix spans the labels seen in either),
    matched on purpose so this equals the ``acc/mean1`` finetune logs; 0.0 when nothing was evaluated."""
    videos, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    seen = (videos > 0) | (predicted > 0)
    if not seen.any():
        return 0.0
    recall = np.where(videos > 0, np.diag(matrix) / np.maximum(videos, 1), 0.0).astype(float)
    return float(np.mean(recall[seen]))


def per_class_accuracy(matrix: np.ndarray, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per class of the model: its val videos, how many were predicted right, and the
    accuracy (``None`` for a class with no val video: unknown, not 0)."""
    rows = []
    for i, name in enumerate(class_names):
        videos, correct = int(matrix[i].sum()), int(matrix[i, i])
        rows.append({"class": name, "videos": videos, "correct": correct,
                     "accuracy": correct / videos if videos else None})
    return rows


def confused_pairs(matrix: np.ndarray, class_names: Sequence[str], k: int = TOP_PAIRS) -> list[dict[str, Any]]:
    """The ``k`` most frequent mistakes, true -> predicted: the count, and its share of the true
    class's videos. Ordered by count, then share, then class order (deterministic)."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    videos = matrix.sum(axis=1)
    pairs = [(int(off[t, p]), off[t, p] / videos[t], int(t), int(p)) for t, p in np.argwhere(off > 0)]
    pairs.sort(key=lambda pair: (-pair[0], -pair[1], pair[2], pair[3]))
    return [{"true": class_names[t], "predicted": class_names[p], "count": count, "share": float(share)}
            for count, share, t, p in pairs[:k]]


def analyse(labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Everything above from one set of top-1 predictions, as JSON: the confusion matrix with its
    class names, per-class accuracy, mean class accuracy and the most confused pairs."""
    matrix = confusion_matrix(labels, predictions, len(class_names))
    return {"evaluated": int(matrix.sum()), "mean_class_accuracy": mean_class_accuracy(matrix),
            "per_class": per_class_accuracy(matrix, class_names),
            "confused_pairs": confused_pairs(matrix, class_names),
            "confusion": {"classes": list(class_names), "rows": "true class", "columns": "predicted class",
                          "matrix": matrix.tolist()}}


def plotted_classes(matrix: np.ndarray, max_classes: int = MAX_PLOT_CLASSES) -> list[int]:
    """Which classes the PNG draws (see :data:`PLOT_RULE`): all of them up to ``max_classes``, else
    the ``max_classes`` most involved in mistakes (errors as the true class + errors as the predicted
    one; ties: class order), never a class without any mistake; in class order."""
    n = matrix.shape[0]
    if n <= max_classes:
        return list(range(n))
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    errors = off.sum(axis=1) + off.sum(axis=0)
    ranked = sorted((i for i in range(n) if errors[i] > 0), key=lambda i: (-errors[i], i))
    return sorted(ranked[:max_classes])


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: Path,
                   max_classes: int = MAX_PLOT_CLASSES) -> list[str]:
    """Write the confusion matrix of :func:`plotted_classes` as a PNG: counts in the cells, colour =
    share of the true class's videos, true classes as rows. When only some classes are drawn, a last
    column "other classes" holds each row's predictions of the classes left out, so rows still sum
    to the class's videos. Returns the class names drawn (none: the image says there is no mistake)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    chosen = plotted_classes(matrix, max_classes)
    videos = matrix.sum(axis=1)
    counts = matrix[np.ix_(chosen, chosen)]
    other = len(chosen) < matrix.shape[0]
    if other:
        counts = np.concatenate([counts, (videos[chosen] - counts.sum(axis=1))[:, None]], axis=1)
    names = [class_names[i][:LABEL_CHARS] for i in chosen]
    size = 2.5 + 0.42 * max(len(chosen), 4)
    figure = Figure(figsize=(size + 1.5, size), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    title = f"confusion: {len(chosen)} of {matrix.shape[0]} classes, {int(matrix.sum())} videos"
    if not chosen:
        axes.axis("off")
        axes.text(0.5, 0.5, f"no mistakes among the {int(matrix.sum())} videos evaluated",
                  ha="center", va="center", wrap=True)
    else:
        share = counts / np.maximum(videos[chosen], 1)[:, None]
        image = axes.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
        for (row, col), count in np.ndenumerate(counts):
            if count:
                axes.text(col, row, str(int(count)), ha="center", va="center", fontsize=8,
                          color="white" if share[row, col] > 0.5 else "black")
        axes.set_xticks(range(counts.shape[1]), [*names, "other classes"] if other else names, rotation=90,
                        fontsize=8)
        axes.set_yticks(range(len(chosen)), names, fontsize=8)
        axes.set_xlabel("predicted class")
        axes.set_ylabel("true class")
        figure.colorbar(image, ax=axes, label="share of the true class's videos", shrink=0.6)
        if other:
            title += f" (the {len(chosen)} with the most mistakes)"
    axes.set_title(title, fontsize=9)
    replace_atomically(Path(path), lambda tmp: figure.savefig(tmp, format="png"))
    return [class_names[i] for i in chosen]


@dataclass
class Mistake:
    """One misclassified video kept for the sheet: the frames the model received (view 0, at most
    :data:`MAX_SHEET_FRAMES` of them), its true and predicted class, and the model's confidence."""

    index: int  # position in the val split
    path: str
    true: str
    predicted: str
    confidence: float  # the predicted class's probability
    frames: np.ndarray = field(repr=False)  # uint8 [1, T', H, W, 3]
    shown: list[int] = field(default_factory=list)  # which frames of the clip are drawn
    views: int = 1  # views of the clip (only the first is drawn)

    def to_dict(self) -> dict[str, Any]:
        """As JSON (without the frames)."""
        return {"path": self.path, "true": self.true, "predicted": self.predicted, "confidence": self.confidence}


class MistakeSheet:
    """The misclassified clips to draw, at most ``max_clips`` in memory at any time: the most
    confident mistakes (they say the most: a wrong label, or two classes the model cannot tell
    apart), ties broken by val order, so the sheet is the same whatever order decoding finishes in."""

    def __init__(self, max_clips: int = MAX_SHEET_CLIPS, max_frames: int = MAX_SHEET_FRAMES) -> None:
        self.max_clips, self.max_frames = max_clips, max_frames
        self._heap: list[tuple[float, int, Mistake]] = []
        self.seen = 0  # misclassified videos offered

    def offer(self, index: int, path: str, clip: np.ndarray, true: str, predicted: str, confidence: float) -> None:
        """Keep this misclassified clip (``uint8 [V, T, H, W, 3]``) if it is among the most confident."""
        self.seen += 1
        key = (confidence, -index)
        if len(self._heap) >= self.max_clips and key <= self._heap[0][:2]:
            return
        frames = clip.shape[1]
        shown = sorted({int(t) for t in np.linspace(0, frames - 1, min(frames, self.max_frames)).round()})
        kept = np.ascontiguousarray(clip[:1, shown])  # a copy: the decoded batch is not kept alive
        mistake = Mistake(index=index, path=path, true=true, predicted=predicted, confidence=float(confidence),
                          frames=kept, shown=shown, views=clip.shape[0])
        heapq.heappush(self._heap, (*key, mistake))
        if len(self._heap) > self.max_clips:
            heapq.heappop(self._heap)

    def mistakes(self) -> list[Mistake]:
        """The kept mistakes, most confident first."""
        return [item[2] for item in sorted(self._heap, key=lambda item: item[:2], reverse=True)]


def misclassified_sheet(mistakes: Sequence[Mistake], title: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The contact sheet of ``mistakes`` (RGB uint8) and its rows: each clip's video, true and
    predicted class, confidence, and the boxes of its frames (:func:`sfdeploy.sheet.layout`)."""
    if not mistakes:
        raise ValueError("no mistakes to draw")
    clips = [sheet.SheetClip(frames=m.frames, caption=f"true: {m.true}   predicted: {m.predicted} "
                                                        f"({m.confidence:.0%})   {Path(m.path).name}")
             for m in mistakes]
    first = mistakes[0]
    if first.views > 1 or len(first.shown) < first.shown[-1] + 1:
        title += f"   (view 1 of {first.views}, frames {','.join(map(str, first.shown))})"
    image, boxes = sheet.draw(clips, title)
    rows = [{**m.to_dict(), "boxes": clip_boxes} for m, clip_boxes in zip(mistakes, boxes, strict=True)]
    return image, rows


def _as_json(analysis: dict[str, Any]) -> str:
    """Indented JSON with one line per row of the confusion matrix (at 400 classes, one number per line
    would be 160,000 lines)."""
    marker = "@@matrix@@"
    matrix = analysis["confusion"]["matrix"]
    text = json.dumps({**analysis, "confusion": {**analysis["confusion"], "matrix": marker}}, indent=1)
    rows = ",\n".join(f"   {json.dumps(row)}" for row in matrix)
    return text.replace(json.dumps(marker), f"[\n{rows}\n  ]" if matrix else "[]") + "\n"


@dataclass
class AnalysisFiles:
    """What :func:`write_files` wrote: ``misclassified`` is ``None`` when no video was misclassified
    (then no sheet is written, and ``message`` says so); ``plotted`` names the classes on the PNG."""

    confusion_json: Path
    confusion_png: Path
    misclassified: Path | None
    plotted: list[str]
    sheet: list[dict[str, Any]] = field(default_factory=list)  # the sheet's rows (misclassified_sheet)
    message: str = ""


def write_files(out_dir: Path, analysis: dict[str, Any], mistakes: Sequence[Mistake], *, misclassified: int,
                title: str) -> AnalysisFiles:
    """Write ``confusion.json`` (``analysis``: class names, matrix and the numbers derived from it,
    plus which classes the PNG draws and why), ``confusion.png`` and ``misclassified.png`` (of the
    ``misclassified`` videos, the ``mistakes`` kept) into ``out_dir``. Without mistakes no sheet is
    written and one left by an earlier run in ``out_dir`` is removed, so the folder never shows
    another run's mistakes."""
    from PIL import Image

    out = ensure_writable_dir(Path(out_dir), "report folder", "--report-dir")
    classes = analysis["confusion"]["classes"]
    matrix = np.asarray(analysis["confusion"]["matrix"], dtype=np.int64).reshape(len(classes), len(classes))
    plotted = plot_confusion(matrix, classes, out / CONFUSION_PNG)
    atomic_write_text(out / CONFUSION_JSON, _as_json({**analysis, "plotted_classes": plotted, "plot_rule": PLOT_RULE}))
    files = AnalysisFiles(confusion_json=out / CONFUSION_JSON, confusion_png=out / CONFUSION_PNG,
                          misclassified=None, plotted=plotted)
    sheet_path = out / MISCLASSIFIED_PNG
    if not mistakes:
        sheet_path.unlink(missing_ok=True)
        files.message = f"no misclassified videos: {MISCLASSIFIED_PNG} not written"
        return files
    shown = f"the {len(mistakes)} most confident shown" if len(mistakes) < misclassified else "all shown"
    image, files.sheet = misclassified_sheet(
        mistakes, f"{title}: {misclassified} misclassified val videos ({shown}, most confident first), "
                  "as the model received them")
    replace_atomically(sheet_path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
    files.misclassified = sheet_path
    return files
