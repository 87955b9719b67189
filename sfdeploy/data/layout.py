"""The prepared-data folder (``DATA``): file names and how to read them, defined once.

::

    DATA/annotations/train_list.txt   MMAction2 video list: "<path relative to video_root> <label>"
    DATA/annotations/val_list.txt
    DATA/class_index.txt              one class name per line; line i is label i
    DATA/dataset.json                 video_root, annotation format, direction_sensitive, ...
    DATA/prepare_report.json          every file seen: accepted (with its probe) or rejected (why)

``finetune`` also accepts existing MMAction2 annotation files (video or rawframes format) through
:meth:`PreparedData.from_annotations`, so a user's existing lists work without ``prepare``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sfdeploy.errors import InputError

TRAIN_LIST = "annotations/train_list.txt"
VAL_LIST = "annotations/val_list.txt"
CLASS_INDEX = "class_index.txt"
DATASET_JSON = "dataset.json"
REPORT_JSON = "prepare_report.json"


def read_class_index(path: Path) -> list[str]:
    """Class names from a ``class_index.txt`` (line i is label i)."""
    if not path.is_file():
        raise InputError("class index not found", path=path,
                         fix="run `sfdeploy data prepare` or pass --class-index FILE")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) < 2:
        raise InputError(f"class index lists {len(names)} class(es); a classifier needs at least 2",
                         path=path, fix="add videos of at least two classes")
    if len(set(names)) != len(names):
        raise InputError("class index lists a class twice", path=path, fix="make each line unique")
    return names


def spread_by_class(labels: list[int] | tuple[int, ...], n: int) -> list[int]:
    """Indices of ``n`` entries taken round-robin over the classes (the first of each class, then
    the second, ...), in list order: a small, deterministic subset that covers the classes."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    queues = [by_class[label] for label in sorted(by_class)]
    picked: list[int] = []
    depth = 0
    while len(picked) < min(n, len(labels)):
        picked += [queue[depth] for queue in queues if depth < len(queue)][: n - len(picked)]
        depth += 1
    return sorted(picked)


def write_class_index(path: Path, names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name}\n" for name in names))


@dataclass(frozen=True)
class AnnotationList:
    """One MMAction2 annotation file, checked: every line parses and every label is in range."""

    path: Path
    format: str  # "video" (path label) or "rawframes" (frame_dir total_frames label)
    labels: tuple[int, ...]
    names: tuple[str, ...] = ()  # each line's video path or frame dir, as written

    @classmethod
    def read(cls, path: Path, num_classes: int) -> AnnotationList:
        if not path.is_file():
            raise InputError("annotation file not found", path=path,
                             fix="run `sfdeploy data prepare` or pass an existing list")
        lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise InputError("annotation file is empty", path=path,
                             fix="it needs one line per video: '<path> <label>'")
        widths = {len(parts) for parts in lines}
        if widths == {2}:
            fmt = "video"
        elif widths == {3}:
            fmt = "rawframes"
        else:
            raise InputError(
                "annotation lines must all be '<video> <label>' (video format) or all "
                "'<frame_dir> <total_frames> <label>' (rawframes format)",
                path=path, fix="fix the lines; paths with spaces are not supported by MMAction2",
            )
        labels: list[int] = []
        for number, parts in enumerate(lines, 1):
            try:
                label = int(parts[-1])
            except ValueError:
                raise InputError(f"line {number}: label {parts[-1]!r} is not an integer", path=path,
                                 fix="the last field of each line is the class index") from None
            if not 0 <= label < num_classes:
                raise InputError(f"line {number}: label {label} is outside 0..{num_classes - 1}",
                                 path=path, fix="labels index the class list (class_index.txt)")
            labels.append(label)
        return cls(path=path, format=fmt, labels=tuple(labels), names=tuple(parts[0] for parts in lines))

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class PreparedData:
    """A training-ready dataset: two annotation lists, the class names, and where the media is."""

    train: AnnotationList
    val: AnnotationList
    classes: list[str]
    media_root: Path  # prefix for the paths in the lists ('' when they are absolute)
    direction_sensitive: bool = False
    min_frames: int | None = None  # shorter videos were rejected (``data prepare --min-frames``)
    clip_frames: int | None = None  # shorter videos were kept and reported as short
    source: Path | None = None  # the DATA folder, when it came from `data prepare`
    extra: dict = field(default_factory=dict)

    @property
    def format(self) -> str:
        return self.train.format

    def mmaction_dataset(self, split: str) -> dict:
        """Where MMAction2's dataset for ``split`` (train / val) reads: its type for this format,
        the annotation list and the media root."""
        video = self.format == "video"
        ann = self.train if split == "train" else self.val
        return dict(type="VideoDataset" if video else "RawframeDataset", ann_file=str(ann.path.resolve()),
                    data_prefix={"video" if video else "img": str(self.media_root)})

    def val_videos(self) -> list[tuple[Path, int]]:
        """The val split as (video path, label) pairs, paths joined to the media root."""
        return [(self.media_root / name, label) for name, label in zip(self.val.names, self.val.labels, strict=True)]

    @classmethod
    def from_dir(cls, data: Path) -> PreparedData:
        """Read a folder written by ``sfdeploy data prepare``."""
        data = Path(data)
        if not data.is_dir():
            raise InputError("data folder not found", path=data,
                             fix="run `sfdeploy data prepare VIDEO_ROOT --out DATA` first")
        meta_path = data / DATASET_JSON
        if not meta_path.is_file():
            raise InputError(f"not a prepared data folder (no {DATASET_JSON})", path=data,
                             fix="run `sfdeploy data prepare VIDEO_ROOT --out DATA`, or pass "
                             "existing lists with --train-list/--val-list/--class-index")
        try:
            meta = json.loads(meta_path.read_text())
            media_root = Path(meta["video_root"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"not a prepared data folder ({DATASET_JSON} has no video_root)", path=data,
                             fix="run `sfdeploy data prepare VIDEO_ROOT --out DATA`") from exc
        classes = read_class_index(data / CLASS_INDEX)
        return cls(
            train=AnnotationList.read(data / TRAIN_LIST, len(classes)),
            val=AnnotationList.read(data / VAL_LIST, len(classes)),
            classes=classes,
            media_root=media_root,
            direction_sensitive=bool(meta.get("direction_sensitive", False)),
            min_frames=meta.get("min_frames"),
            clip_frames=meta.get("clip_frames"),
            source=data,
            extra=meta,
        )

    @classmethod
    def from_annotations(cls, train_list: Path, val_list: Path, class_index: Path,
                         media_root: Path | None) -> PreparedData:
        """Existing MMAction2 annotation files (video or rawframes format)."""
        classes = read_class_index(Path(class_index))
        train = AnnotationList.read(Path(train_list), len(classes))
        val = AnnotationList.read(Path(val_list), len(classes))
        if train.format != val.format:
            raise InputError(f"train list is in {train.format} format but val list in {val.format}",
                             path=val_list, fix="use the same annotation format for both")
        return cls(train=train, val=val, classes=classes,
                   media_root=Path(media_root) if media_root else Path(""))
