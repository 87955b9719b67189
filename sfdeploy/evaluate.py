"""``sfdeploy eval``: accuracy of an exported model on the val split, beside MMAction2's.

The artifact is fed by the client path (parallel decode -> preprocessing -> the backend, through
:mod:`sfdeploy.decode.pool`); the reference is the trained checkpoint in MMAction2, fed by
MMAction2's test pipeline for the same views. Reported: top-1 / top-5 of both, and the share of
videos on which their top-1 predictions are identical. A video that cannot be decoded is counted
and listed, not dropped.

From the same predictions (whatever the backend, Triton included), the model analysis of
:mod:`sfdeploy.analysis`: per-class and mean class accuracy (MMAction2's definition; of the
reference too), the confusion matrix and the most confused pairs, and the most confident
mistakes with the clips the model received, for :func:`write_report` to draw.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sfdeploy.analysis import AnalysisFiles, Mistake, MistakeSheet, analyse, write_files
from sfdeploy.artifacts import Manifest
from sfdeploy.data.layout import PreparedData
from sfdeploy.decode.clips import DecodeFailure
from sfdeploy.decode.pool import decode_many
from sfdeploy.errors import InputError
from sfdeploy.infer_options import InferOptions
from sfdeploy.progress import progress
from sfdeploy.runtime import Predictor
from sfdeploy.target import ModelTarget

if TYPE_CHECKING:
    from sfdeploy.clipspec import ClipSpec

log = logging.getLogger("sfdeploy")


@dataclass
class EvalReport:
    """What ``sfdeploy eval`` found: top-1/top-5 of the model, beside MMAction2's own on the same
    videos when the reference was run, the videos that failed, and one row per video; and the model
    analysis (:func:`sfdeploy.analysis.analyse`): mean class accuracy (also MMAction2's), one row per
    class, the most confused pairs, the confusion matrix, how many videos were misclassified and the
    most confident of them (``clips``: their frames, for :func:`write_report`; not in the JSON)."""

    backend: str
    videos: int
    evaluated: int
    top1: float
    top5: float
    mmaction2_top1: float | None
    mmaction2_top5: float | None
    identical_top1: float | None
    mean_class_accuracy: float = 0.0
    mmaction2_mean_class_accuracy: float | None = None
    # {"class", "videos", "correct", "accuracy" (None: no val video)} (+ "mmaction2_correct", "mmaction2_accuracy")
    per_class: list[dict[str, Any]] = field(default_factory=list)
    confused_pairs: list[dict[str, Any]] = field(default_factory=list)  # {"true", "predicted", "count", "share"}
    confusion: dict[str, Any] = field(default_factory=dict)  # {"classes", "matrix"}: rows true, columns predicted
    misclassified: int = 0
    misclassified_shown: list[dict[str, Any]] = field(default_factory=list)  # Mistake.to_dict() of `clips`
    failed: list[dict[str, str]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    clips: list[Mistake] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """As JSON (``--out``; the command prints it without the long lists), without the frames."""
        data = asdict(replace(self, clips=[]))
        del data["clips"]
        return data

    def analysis(self) -> dict[str, Any]:
        """The model analysis of the model evaluated, as JSON (what ``confusion.json`` holds)."""
        return {"backend": self.backend, "evaluated": self.evaluated, "top1": self.top1,
                "mean_class_accuracy": self.mean_class_accuracy, "per_class": self.per_class,
                "confused_pairs": self.confused_pairs, "confusion": self.confusion}


def _topk(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean()) if len(labels) else 0.0


def val_split(data_dir: Path, class_names: tuple[str, ...]) -> tuple[list[Path], np.ndarray]:
    """The val videos of DATA and their labels in the *model's* class order."""
    data = PreparedData.from_dir(data_dir)
    if data.format != "video":
        videos = data.extra.get("source_videos", "VIDEO_ROOT")  # `data prepare --rawframes` keeps where they were
        raise InputError("eval decodes videos; this DATA lists rawframes", path=data.val.path,
                         fix=f"prepare the videos without --rawframes (the same split): `sfdeploy data prepare "
                             f"{videos} --out DATA_VIDEOS`, and evaluate on that")
    unknown = sorted(set(data.classes) - set(class_names))
    if unknown:
        raise InputError(f"val classes unknown to the model: {', '.join(unknown)} (the model knows "
                         f"{', '.join(class_names)})", path=data.source / "class_index.txt",
                         fix="evaluate on data with the classes the model was trained on")
    to_model = {i: class_names.index(name) for i, name in enumerate(data.classes)}
    videos = data.val_videos()
    paths = [path for path, _ in videos]
    labels = np.array([to_model[label] for _, label in videos])
    return paths, labels


def evaluate(target: ModelTarget, data_dir: Path, *, batch_size: int = InferOptions.batch_size,
             workers: int | None = None, reference: bool = True, work_dir: Path | None = None,
             show_progress: bool = True) -> EvalReport:
    """Evaluate ``target`` on DATA's val split: its export run in this process, or the same model
    served (``backend="triton"``; ``target.export_dir`` is then the export it was served from). The
    MMAction2 reference runs on ``target.device``. The report carries the model analysis whatever the
    backend; :func:`write_report` writes its files."""
    if target.export_dir is None:
        raise InputError("eval compares a model with the export it comes from", fix="pass EXPORT")
    predictor = target.open()
    try:
        return _evaluate(target, data_dir, predictor, batch_size=batch_size, workers=workers, reference=reference,
                         work_dir=work_dir, show_progress=show_progress)
    finally:
        predictor.close()


def _evaluate(target: ModelTarget, data_dir: Path, predictor: Predictor, *, batch_size: int, workers: int | None,
              reference: bool, work_dir: Path | None, show_progress: bool) -> EvalReport:
    export_dir = target.export_dir
    manifest = Manifest.read(export_dir)
    spec = predictor.spec
    if spec != manifest.clip_spec:
        raise InputError("the backend serves a model with another clip spec than this export", path=export_dir,
                         fix="evaluate the export that the server was built from")
    paths, labels = val_split(data_dir, spec.class_names)
    mistakes = MistakeSheet()
    probs, failed = _predict(predictor, spec, paths, labels, mistakes, batch_size=batch_size, workers=workers,
                             show_progress=show_progress)
    done = sorted(probs)
    got = np.stack([probs[i] for i in done]) if done else np.zeros((0, spec.num_classes))
    truth = labels[done]
    rows = [{"path": str(paths[i]), "label": spec.class_names[labels[i]],
             "prediction": spec.class_names[int(got[j].argmax())]} for j, i in enumerate(done)]
    found = analyse(truth, got.argmax(1), spec.class_names)
    kept = mistakes.mistakes()
    report = EvalReport(backend=predictor.name, videos=len(paths), evaluated=len(done), top1=_topk(got, truth, 1),
                        top5=_topk(got, truth, 5), mmaction2_top1=None, mmaction2_top5=None, identical_top1=None,
                        mean_class_accuracy=found["mean_class_accuracy"], per_class=found["per_class"],
                        confused_pairs=found["confused_pairs"], confusion=found["confusion"],
                        misclassified=mistakes.seen, misclassified_shown=[m.to_dict() for m in kept], failed=failed,
                        rows=rows, clips=kept)
    if reference and done:
        _add_reference(report, target, manifest, [paths[i] for i in done], truth, got, work_dir, show_progress)
    return report


def _predict(predictor: Predictor, spec: ClipSpec, paths: list[Path], labels: np.ndarray, mistakes: MistakeSheet,
             *, batch_size: int, workers: int | None, show_progress: bool
             ) -> tuple[dict[int, np.ndarray], list[dict[str, str]]]:
    """The model's probabilities per val index, through the client path, and the videos that failed;
    each misclassified clip is offered to ``mistakes`` while it is still in memory."""
    probs: dict[int, np.ndarray] = {}
    failed: list[dict[str, str]] = []
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        batch = np.stack([clip for _, clip in pending])
        for (index, clip), row in zip(pending, predictor.predict(batch), strict=True):
            probs[index] = row
            predicted = int(row.argmax())
            if predicted != labels[index]:
                mistakes.offer(index, str(paths[index]), clip, spec.class_names[labels[index]],
                               spec.class_names[predicted], float(row[predicted]))
        pending.clear()

    stream = decode_many(paths, spec, workers=workers)
    for index, clip, _ in progress(stream, desc=f"eval: {predictor.name}", unit="video", total=len(paths),
                                enabled=show_progress):
        if isinstance(clip, DecodeFailure):
            failed.append({"path": clip.path, "error": clip.error})
            continue
        pending.append((index, clip))
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    return probs, failed


def _add_reference(report: EvalReport, target: ModelTarget, manifest: Manifest, paths: list[Path],
                   truth: np.ndarray, got: np.ndarray, work_dir: Path | None, show_progress: bool) -> None:
    """Run the trained checkpoint in MMAction2 on the evaluated videos and add its numbers to ``report``."""
    from sfdeploy.export.parity import mmaction_reference
    from sfdeploy.train.trained import load_trained

    spec = manifest.clip_spec
    source = Path(work_dir) if work_dir else Path(manifest.source["work_dir"])
    trained = load_trained(source, Path(manifest.source["checkpoint"]) if not work_dir else None)
    where = target.device.resolve()
    ref = mmaction_reference({where: trained.recognizer.to(where)}, spec, paths, show_progress).probs[where]
    report.mmaction2_top1, report.mmaction2_top5 = _topk(ref, truth, 1), _topk(ref, truth, 5)
    report.identical_top1 = float((ref.argmax(1) == got.argmax(1)).mean())
    for row, ref_row in zip(report.rows, ref, strict=True):
        row["mmaction2_prediction"] = spec.class_names[int(ref_row.argmax())]
    found = analyse(truth, ref.argmax(1), spec.class_names)
    report.mmaction2_mean_class_accuracy = found["mean_class_accuracy"]
    for row, ref_row in zip(report.per_class, found["per_class"], strict=True):
        row["mmaction2_correct"], row["mmaction2_accuracy"] = ref_row["correct"], ref_row["accuracy"]


def write_report(report: EvalReport, out_dir: Path) -> AnalysisFiles:
    """Write the model analysis of ``report`` into ``out_dir``: ``confusion.json``, ``confusion.png``
    and, when any video was misclassified, ``misclassified.png`` (see :func:`sfdeploy.analysis.write_files`)."""
    return write_files(out_dir, report.analysis(), report.clips, misclassified=report.misclassified,
                       title=f"{report.backend}")
