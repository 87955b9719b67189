"""The prepared-data folder (``DATA``): file names and how to read them, defined once.

::

    DATA/annotations/train_list.txt   MMAction2 video list: "<path relative to video_root> <label>"
    DATA/annotations/val_list.txt
    DATA/class_index.txt              one class name per line; line i is label i
    DATA/dataset.json                 video_root, annotation format, direction_sensitive, ...
    DATA/prepare_report.json          every file seen: accepted (with its probe) or rejected (why)

``finetune`` also accepts existing MMAction2 annotation files (video or rawframes format) through
:meth:`PreparedData.from_annotations`, so a user's existing lists work without ``prepare``, and
several sets at once: :func:`merge_datasets` makes their union (one class index, by class name).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from sfdeploy.errors import InputError

TRAIN_LIST = "annotations/train_list.txt"
VAL_LIST = "annotations/val_list.txt"
CLASS_INDEX = "class_index.txt"
DATASET_JSON = "dataset.json"
REPORT_JSON = "prepare_report.json"


def read_class_index(path: Path, min_classes: int = 2) -> list[str]:
    """Class names from a ``class_index.txt`` (line i is label i). One set of several may hold a
    single class (``min_classes=1``): the union is what must have two."""
    if not path.is_file():
        raise InputError("class index not found", path=path,
                         fix="run `sfdeploy data prepare` or pass --class-index FILE")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) < min_classes:
        need = "a classifier needs at least 2" if min_classes > 1 else "a set needs at least one"
        raise InputError(f"class index lists {len(names)} class(es); {need}", path=path,
                         fix="add videos of at least two classes")
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


def leaf_datasets(dataset: Mapping) -> list[Mapping]:
    """The datasets of an MMAction2 dataset config that read annotation lists: itself, or those
    inside mmengine's wrappers (``ConcatDataset.datasets``, ``RepeatDataset.dataset``, ...)."""
    if "datasets" in dataset:
        return [leaf for inner in dataset["datasets"] for leaf in leaf_datasets(inner)]
    if "dataset" in dataset:
        return leaf_datasets(dataset["dataset"])
    return [dataset]


def write_class_index(path: Path, names: list[str]) -> None:
    """``class_index.txt``: one class name per line, line *i* naming label *i* of the annotation lists (what export
    and the client map outputs back with)."""
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
    def read(cls, path: Path, num_classes: int, allow_empty: bool = False) -> AnnotationList:
        """``allow_empty``: for one set of several (a set may add train videos only); the union is
        checked for emptiness instead (:func:`merge_datasets`)."""
        if not path.is_file():
            raise InputError("annotation file not found", path=path,
                             fix="run `sfdeploy data prepare` or pass an existing list")
        lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
        if not lines and not allow_empty:
            raise InputError("annotation file is empty", path=path,
                             fix="it needs one line per video: '<path> <label>'")
        widths = {len(parts) for parts in lines}
        if not lines:
            fmt = "empty"
        elif widths == {2}:
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

    def relabelled(self, mapping: Sequence[int], out: Path, num_classes: int) -> AnnotationList:
        """This list with label ``i`` replaced by ``mapping[i]``, written to ``out`` (every other
        field as it was) and read back."""
        lines = [line.split() for line in self.path.read_text().splitlines() if line.strip()]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(" ".join([*parts[:-1], str(mapping[int(parts[-1])])]) + "\n" for parts in lines))
        return AnnotationList.read(out, num_classes, allow_empty=True)


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
    preset: str | None = None  # the finetune preset it was prepared for (`data prepare --preset`)
    source: Path | None = None  # the DATA folder, or the train list of a --train-list set
    extra: dict = field(default_factory=dict)
    # A union of several sets (merge_datasets): each part's lists are rewritten in the union's
    # class index; the union's own train/val lists concatenate them, with full paths as names.
    parts: tuple[PreparedData, ...] = ()
    name: str = ""  # a part's name: WORK/annotations/<name>_{train,val}.txt

    @property
    def format(self) -> str:
        """``video`` or ``rawframes``: how MMAction2 must read the lists (taken from the train list, or the val list
        when training has none)."""
        return self.train.format if self.train.format != "empty" else self.val.format

    def split_list(self, split: str) -> AnnotationList:
        """The annotation list MMAction2's ``split`` dataset reads (test reads the val list)."""
        return self.train if split == "train" else self.val

    def mmaction_dataset(self, split: str, indices: Sequence[int] | None = None, **settings: object) -> dict:
        """MMAction2's dataset for ``split`` (train / val / test): its type for this format, the
        annotation list and the media root, plus ``settings`` (pipeline, test_mode). A union is a
        ``ConcatDataset`` of its parts' datasets (sets without videos in the split left out), as
        MMAction2's multi-dataset training has it. ``indices`` (into :meth:`split_list`) keep a
        subset; in a union each part gets its own share."""
        if self.parts:
            datasets, offset = [], 0
            for part in self.parts:
                size = len(part.split_list(split))
                own = None if indices is None else [i - offset for i in indices if offset <= i < offset + size]
                if size and (own is None or own):
                    datasets.append(part.mmaction_dataset(split, own, **settings))
                offset += size
            return dict(type="ConcatDataset", datasets=datasets)
        video = self.format == "video"
        dataset = dict(type="VideoDataset" if video else "RawframeDataset",
                       ann_file=str(self.split_list(split).path.resolve()),
                       data_prefix={"video" if video else "img": str(self.media_root)}, **settings)
        if indices is not None:
            dataset["indices"] = list(indices)
        return dataset

    def val_videos(self) -> list[tuple[Path, int]]:
        """The val split as (video path, label) pairs, paths joined to the media root."""
        return [(self.media_root / name, label) for name, label in zip(self.val.names, self.val.labels, strict=True)]

    def classes_without_val(self) -> list[str]:
        """Classes with training videos but none to validate on: their val accuracy is unknown."""
        train, val = set(self.train.labels), set(self.val.labels)
        return [name for i, name in enumerate(self.classes) if i in train and i not in val]

    def describe(self) -> str:
        """How an error names this set: its DATA folder or train list."""
        return str(self.source) if self.source else f"the set of {self.train.path}"

    @classmethod
    def from_dir(cls, data: Path, part: bool = False) -> PreparedData:
        """Read a folder written by ``sfdeploy data prepare``; ``part``: as one set of several
        (see :meth:`from_annotations`)."""
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
        classes = read_class_index(data / CLASS_INDEX, 1 if part else 2)
        return cls(
            train=AnnotationList.read(data / TRAIN_LIST, len(classes), allow_empty=part),
            val=AnnotationList.read(data / VAL_LIST, len(classes), allow_empty=part),
            classes=classes,
            media_root=media_root,
            direction_sensitive=bool(meta.get("direction_sensitive", False)),
            min_frames=meta.get("min_frames"),
            clip_frames=meta.get("clip_frames"),
            preset=meta.get("preset"),
            source=data,
            extra=meta,
        )

    @classmethod
    def from_annotations(cls, train_list: Path, val_list: Path, class_index: Path,
                         media_root: Path | None, part: bool = False) -> PreparedData:
        """Existing MMAction2 annotation files (video or rawframes format). ``part``: one set of
        several (:func:`merge_datasets`), which may have one class, or an empty list (a set that
        only adds training videos); the union must not."""
        classes = read_class_index(Path(class_index), 1 if part else 2)
        train = AnnotationList.read(Path(train_list), len(classes), allow_empty=part)
        val = AnnotationList.read(Path(val_list), len(classes), allow_empty=part)
        if "empty" not in (train.format, val.format) and train.format != val.format:
            raise InputError(f"train list is in {train.format} format but val list in {val.format}",
                             path=val_list, fix="use the same annotation format for both")
        return cls(train=train, val=val, classes=classes,
                   media_root=Path(media_root) if media_root else Path(""),
                   source=Path(train_list) if part else None)


def class_key(name: str) -> str:
    """What two spellings of one class name share: case, and runs of spaces, '-' and '_', aside."""
    return re.sub(r"[\s_\-]+", "_", name.strip().casefold())


def union_classes(sets: Sequence[PreparedData]) -> list[str]:
    """One class index for several sets, by name: the first set's classes in its order, then each
    later set's new ones in theirs (so the first set keeps its indices). A name spelt two ways
    (``Move-Left`` / ``move_left``) would become two indices for what is surely one class: refused."""
    order: list[str] = []
    first: dict[str, tuple[str, PreparedData]] = {}  # class_key -> (spelling, set)
    for data in sets:
        for name in data.classes:
            key = class_key(name)
            if key not in first:
                first[key] = (name, data)
                order.append(name)
            elif first[key][0] != name:
                spelling, other = first[key]
                raise InputError(
                    f"class '{name}' of {data.describe()} and class '{spelling}' of {other.describe()} are one "
                    f"name spelt two ways: merged by name they would get two indices "
                    f"({order.index(spelling)} and {len(order)})", path=data.source or data.train.path,
                    fix=f"spell it the same way in every set (rename '{name}' to '{spelling}' in its class index "
                        "and folder, or the reverse)")
    return order


def _part_names(sets: Sequence[PreparedData]) -> list[str]:
    """A file-name-safe, unique name per set: its DATA folder's name (or its train list's stem)."""
    names: list[str] = []
    for data in sets:
        source = data.source or data.train.path
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", (source.name if data.source and source.is_dir() else source.stem))
        name, n = base or "set", 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def merge_datasets(sets: Sequence[PreparedData], out: Path) -> PreparedData:
    """The union of several sets, as one :class:`PreparedData` whose ``parts`` MMAction2 reads as a
    ``ConcatDataset``. Classes are merged by name (:func:`union_classes`), never by index: each
    set's lists are rewritten with the union's labels into ``out/<name>_{train,val}.txt`` (so the
    training config needs nothing but ``out``). Everything is checked before anything is written."""
    if not sets:
        raise InputError("no datasets given: the union is empty", fix="pass DATA folders or --train-list sets")
    sources = [(d.source or d.train.path).resolve() for d in sets]
    twice = sorted({str(s) for s in sources if sources.count(s) > 1})
    if twice:
        raise InputError("the same set is given twice (its videos would count double)", path=twice[0],
                         fix="pass each DATA folder (or --train-list) once")
    formats = {d.format for d in sets} - {"empty"}
    if len(formats) > 1:
        raise InputError(f"the sets mix annotation formats ({', '.join(sorted(formats))}); one training "
                         "pipeline decodes them all", fix="convert them to one format (videos, or rawframes)")
    classes = union_classes(sets)
    index = {name: i for i, name in enumerate(classes)}
    empty = [split for split in ("train", "val") if not any(len(d.split_list(split)) for d in sets)]
    if empty or len(classes) < 2:
        what = f"no {' and no '.join(empty)} videos" if empty else "a single class"
        raise InputError(f"the union of the {len(sets)} sets has {what}: nothing to train and validate on",
                         path=sets[0].source or sets[0].train.path,
                         fix="add sets with train and val videos of at least two classes")
    train_paths = {d.media_root / n for d in sets for n in d.train.names}
    leaked = sorted(str(d.media_root / n) for d in sets for n in d.val.names if d.media_root / n in train_paths)
    if leaked:
        raise InputError(f"{len(leaked)} video(s) are in one set's train list and in a val list (e.g. {leaked[0]}): "
                         "validation would score videos the model trained on", fix="remove them from one of the sets")
    fmt = formats.pop() if formats else "video"
    parts, facts = [], []
    for data, name in zip(sets, _part_names(sets), strict=True):
        mapping = [index[c] for c in data.classes]
        lists = {split: data.split_list(split).relabelled(mapping, Path(out) / f"{name}_{split}.txt", len(classes))
                 for split in ("train", "val")}
        parts.append(replace(data, train=lists["train"], val=lists["val"], classes=classes, name=name))
        facts.append({"name": name, "source": str(data.source or data.train.path), "media_root": str(data.media_root),
                      "classes": {c: index[c] for c in data.classes},
                      **{f"{split}_list": str(lists[split].path) for split in lists},
                      **{f"{split}_videos": len(lists[split]) for split in lists}})

    def concat(split: str) -> AnnotationList:
        lists = [(p.media_root, p.split_list(split)) for p in parts]
        return AnnotationList(path=Path(out), format=fmt, labels=tuple(lb for _, lst in lists for lb in lst.labels),
                              names=tuple(str(root / n) for root, lst in lists for n in lst.names))

    clip_frames = [d.clip_frames for d in sets if d.clip_frames is not None]
    return PreparedData(train=concat("train"), val=concat("val"), classes=classes, media_root=Path(""),
                        direction_sensitive=any(d.direction_sensitive for d in sets),
                        clip_frames=min(clip_frames) if clip_frames else None,
                        extra={"datasets": facts}, parts=tuple(parts))
