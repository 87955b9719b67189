"""``sfdeploy eval``: accuracy of an exported model on the val split, beside MMAction2's.

The artifact is fed by the client path (parallel decode -> preprocessing -> the backend, through
:mod:`sfdeploy.decode.pool`); the reference is the trained checkpoint in MMAction2, fed by
MMAction2's test pipeline for the same views. Reported: top-1 / top-5 of both, and the share of
videos on which their top-1 predictions are identical. A video that cannot be decoded is counted
and listed, not dropped.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfdeploy.artifacts import Manifest
from sfdeploy.data.layout import PreparedData
from sfdeploy.decode.clips import DecodeFailure
from sfdeploy.decode.pool import decode_many
from sfdeploy.errors import InputError
from sfdeploy.infer_options import InferOptions
from sfdeploy.progress import progress
from sfdeploy.runtime import Predictor
from sfdeploy.target import ModelTarget

log = logging.getLogger("sfdeploy")


@dataclass
class EvalReport:
    """What ``sfdeploy eval`` found: top-1/top-5 of the model, beside MMAction2's own on the same
    videos when the reference was run, the videos that failed, and one row per video."""

    backend: str
    videos: int
    evaluated: int
    top1: float
    top5: float
    mmaction2_top1: float | None
    mmaction2_top5: float | None
    identical_top1: float | None
    failed: list[dict[str, str]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """As JSON (what the command prints)."""
        return asdict(self)


def _topk(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean()) if len(labels) else 0.0


def val_split(data_dir: Path, class_names: tuple[str, ...]) -> tuple[list[Path], np.ndarray]:
    """The val videos of DATA and their labels in the *model's* class order."""
    data = PreparedData.from_dir(data_dir)
    if data.format != "video":
        raise InputError("eval decodes videos; this DATA lists rawframes", path=data.val.path,
                         fix="prepare a video val split with `sfdeploy data prepare`")
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
    MMAction2 reference runs on ``target.device``."""
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
    probs: dict[int, np.ndarray] = {}
    failed: list[dict[str, str]] = []
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        batch = np.stack([clip for _, clip in pending])
        for (index, _), row in zip(pending, predictor.predict(batch), strict=True):
            probs[index] = row
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
    done = sorted(probs)
    got = np.stack([probs[i] for i in done]) if done else np.zeros((0, spec.num_classes))
    truth = labels[done]
    mm_top1 = mm_top5 = identical = None
    rows = [{"path": str(paths[i]), "label": spec.class_names[labels[i]],
             "prediction": spec.class_names[int(got[j].argmax())]} for j, i in enumerate(done)]
    if reference and done:
        from sfdeploy.export.parity import mmaction_reference
        from sfdeploy.export.source import load_trained

        source = Path(work_dir) if work_dir else Path(manifest.source["work_dir"])
        trained = load_trained(source, Path(manifest.source["checkpoint"]) if not work_dir else None)
        where = target.device.resolve()
        ref = mmaction_reference({where: trained.recognizer.to(where)}, spec, [paths[i] for i in done],
                                 show_progress).probs[where]
        mm_top1, mm_top5 = _topk(ref, truth, 1), _topk(ref, truth, 5)
        identical = float((ref.argmax(1) == got.argmax(1)).mean())
        for row, ref_row in zip(rows, ref, strict=True):
            row["mmaction2_prediction"] = spec.class_names[int(ref_row.argmax())]
    return EvalReport(backend=predictor.name, videos=len(paths), evaluated=len(done), top1=_topk(got, truth, 1),
                      top5=_topk(got, truth, 5), mmaction2_top1=mm_top1, mmaction2_top5=mm_top5,
                      identical_top1=identical, failed=failed, rows=rows)
