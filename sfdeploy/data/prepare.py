"""``sfdeploy data prepare``: a folder of labelled videos -> MMAction2 annotation lists.

Accepted layouts::

    VIDEO_ROOT/<class>/*.mp4                       split here, stratified by class, by seed
    VIDEO_ROOT/train/<class>/*.mp4 + val/<class>/  already split: kept as it is

Every video is probed in parallel worker processes with :mod:`sfdeploy.decode` (the decoder that
training and serving use). Nothing is dropped silently: each file that is not used appears in
``prepare_report.json`` with the reason and the fix, and so does each class folder that ends up
without videos. Videos shorter than the clip (``clip_frames``) are kept, as MMAction2 trains on
them (``SampleFrames`` loops their frames), and listed under ``short``; only ``min_frames``, when
asked for, rejects by length. The run fails (and still writes the report)
only when what is left cannot train a classifier: no videos, or fewer than two classes.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from sfdeploy.data import layout
from sfdeploy.data.probe import VIDEO_EXTENSIONS, VideoProbe, probe_videos
from sfdeploy.data.synth import HINTS_JSON
from sfdeploy.decode import MAX_VIDEO_PIXELS
from sfdeploy.errors import InputError
from sfdeploy.fsutil import ensure_writable_dir

TOO_SHORT_FIX = ("use a longer video, or prepare with a lower --min-frames (videos shorter than the clip are kept "
                 "by default: MMAction2 loops their frames)")


@dataclass
class Candidate:
    """A video file found under the root, before it is probed: its class folder and, for a pre-split root, its split."""

    path: Path
    class_name: str
    split: str | None  # "train"/"val" when the root is already split


@dataclass
class PrepareResult:
    """What ``prepare`` made of the root, for the CLI's summary and for callers: counts and classes, and every file
    or class folder not used, with why (the same as ``prepare_report.json``)."""

    out: Path
    classes: list[str]
    train: int
    val: int
    rejected: list[dict] = field(default_factory=list)
    short: list[dict] = field(default_factory=list)  # accepted, fewer frames than clip_frames
    ignored: list[dict] = field(default_factory=list)
    skipped_classes: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def report_path(self) -> Path:
        """``OUT/prepare_report.json``, which lists every file with the reason it was or was not used."""
        return self.out / layout.REPORT_JSON


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _scan_class_folders(root: Path, split: str | None, ignored: list[dict],
                        empty: list[dict]) -> list[Candidate]:
    candidates: list[Candidate] = []
    for entry in sorted(root.iterdir()):
        if entry.is_file():
            if entry.name != HINTS_JSON or split is not None:
                ignored.append({"path": str(entry), "reason": "not inside a class folder"})
            continue
        if not entry.is_dir():
            continue
        videos = []
        for item in sorted(entry.iterdir()):
            if item.is_file() and _is_video(item):
                videos.append(item)
            else:
                ignored.append({"path": str(item), "reason": "nested folder" if item.is_dir()
                                else f"extension is not one of {', '.join(VIDEO_EXTENSIONS)}"})
        if not videos:
            empty.append({"class": entry.name, "folder": str(entry), "split": split,
                          "reason": "no video files",
                          "fix": f"add {'/'.join(VIDEO_EXTENSIONS)} files or remove the folder"})
        candidates += [Candidate(v, entry.name, split) for v in videos]
    return candidates


def scan(root: Path) -> tuple[list[Candidate], list[dict], list[dict], bool]:
    """Find candidate videos; returns (candidates, ignored files, empty class folders, presplit)."""
    if not root.exists():
        raise InputError("video folder not found", path=root, fix="pass the folder that holds "
                         "one sub-folder per class (or train/ and val/ with class sub-folders)")
    if not root.is_dir():
        raise InputError("not a folder", path=root, fix="pass the folder holding the class folders")
    ignored: list[dict] = []
    empty: list[dict] = []
    presplit = (root / "train").is_dir() and (root / "val").is_dir()
    if presplit:
        candidates = []
        for split in ("train", "val"):
            candidates += _scan_class_folders(root / split, split, ignored, empty)
        for entry in sorted(root.iterdir()):
            if entry.name not in ("train", "val"):
                ignored.append({"path": str(entry), "reason": "pre-split root: only train/ and val/ are used"})
    else:
        candidates = _scan_class_folders(root, None, ignored, empty)
    return candidates, ignored, empty, presplit


def _stratified_split(by_class: dict[str, list[Path]], val_ratio: float, seed: int
                      ) -> tuple[dict[str, list[Path]], dict[str, list[Path]], list[str]]:
    train: dict[str, list[Path]] = {}
    val: dict[str, list[Path]] = {}
    warnings: list[str] = []
    rng = random.Random(seed)
    for name in sorted(by_class):
        videos = sorted(by_class[name])
        rng.shuffle(videos)
        n = len(videos)
        n_val = min(max(round(n * val_ratio), 1), n - 1) if n >= 2 else 0
        if n_val == 0:
            warnings.append(f"class '{name}' has a single usable video: it is used for training "
                            "and the val split has none of this class")
        val[name], train[name] = sorted(videos[:n_val]), sorted(videos[n_val:])
    return train, val, warnings


def prepare(
    video_root: Path,
    out: Path,
    *,
    val_ratio: float = 0.2,
    seed: int = 0,
    min_frames: int = 1,
    clip_frames: int | None = None,
    preset: str | None = None,
    workers: int | None = None,
    show_progress: bool = True,
    max_pixels: int = MAX_VIDEO_PIXELS,
    rawframes: bool = False,
    frame_short_side: int | None = None,
) -> PrepareResult:
    """Scan, probe, split and write ``out`` (see :mod:`sfdeploy.data.layout`).

    ``min_frames`` rejects shorter videos (``too_short``); ``clip_frames`` (the frames one training
    clip spans, :attr:`ClipSpec.min_frames`) only marks the shorter ones as ``short`` in the report;
    ``preset`` (whose clip that is) is recorded, so that what reads DATA later knows it;
    videos with frames of more than ``max_pixels`` are rejected (``frame_too_large``) undecoded.
    ``rawframes``: extract every usable video's frames as JPEGs into ``out/rawframes`` (resized to
    ``frame_short_side``, if given; :mod:`sfdeploy.data.rawframes`) and write rawframes lists of the same
    split; a video whose frames cannot be extracted is rejected (``rejected``, with the reason).
    """
    video_root = Path(video_root).resolve()
    out = Path(out).resolve()
    candidates, ignored, empty, presplit = _find(video_root, out, val_ratio)
    probes = probe_videos([c.path for c in candidates], workers=workers, show_progress=show_progress,
                          max_pixels=max_pixels)
    usable, rejected = _usable(candidates, probes, video_root, min_frames)
    by_split, warnings = _split(usable, presplit, val_ratio, seed)
    probe_of = {cand.path: probe for cand, probe in usable}
    classes, skipped = _classes(by_split, candidates, empty, presplit, probe_of, rejected, warnings)
    entries = _entries(by_split, classes)
    frames = None
    if rawframes and len(classes) >= 2 and entries["val"]:  # else _check_trainable refuses it below
        entries, frames = _extract(entries, video_root, out, frame_short_side, workers, show_progress, max_pixels,
                                   rejected)
    short = [{"path": str(p), "split": split, "frames": probe_of[p].frames}
             for split in ("train", "val") for p, _ in entries[split]
             if clip_frames is not None and probe_of[p].frames < clip_frames]
    settings = {"val_ratio": None if presplit else val_ratio, "seed": seed, "min_frames": min_frames,
                "preset": preset, "clip_frames": clip_frames}
    report = _report(video_root, presplit, settings, classes, entries, probe_of, len(candidates), rejected, short,
                     ignored, skipped, warnings)
    if frames is not None:
        report["rawframes"] = frames
    (out / layout.REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    result = PrepareResult(out=out, classes=classes, train=len(entries["train"]), val=len(entries["val"]),
                           rejected=report["rejected"], short=short, ignored=ignored,
                           skipped_classes=skipped, warnings=warnings)
    _check_trainable(classes, entries, out, video_root)
    _write_data(out, video_root, classes, entries, settings, len(short), frames)
    return result


def _extract(entries: dict[str, list[tuple[Path, int]]], video_root: Path, out: Path, short_side: int | None,
             workers: int | None, show_progress: bool, max_pixels: int, rejected: list[dict]
             ) -> tuple[dict[str, list[tuple[Path, int]]], dict]:
    """The frames of every listed video (:mod:`sfdeploy.data.rawframes`); the videos whose frames could
    not be extracted (or whose frame folder another video of the same name takes) join ``rejected``
    and leave the lists. Returns the lists and the report's ``rawframes`` (with each frame folder)."""
    from sfdeploy.data import rawframes

    videos, taken = [], {}
    for path, _ in entries["train"] + entries["val"]:
        name = rawframes.frame_dir_name(path, video_root)
        if name in taken:
            rejected.append({"path": str(path), "reason": "duplicate_frame_dir",
                             "detail": f"{taken[name]} has the same name without its extension",
                             "fix": "rename one of the two videos"})
            continue
        taken[name] = path
        videos.append(path)
    root = out / rawframes.FRAMES_DIR
    rows = rawframes.extract_rawframes(videos, video_root, root, short_side=short_side, workers=workers,
                                       show_progress=show_progress, max_pixels=max_pixels)
    rejected += [{"path": r["path"], "reason": r["reason"], "detail": f"rawframes: {r['detail']}", "fix": r["fix"]}
                 for r in rows.values() if r.get("reason")]
    kept = {p for p, r in rows.items() if not r.get("reason")}
    entries = {split: [(p, lab) for p, lab in pairs if p in kept] for split, pairs in entries.items()}
    return entries, {**rawframes.summary(rows, root, short_side),
                     "frame_dirs": {str(p): [rows[p]["frame_dir"], rows[p]["frames"]] for p in sorted(kept)}}


def _find(video_root: Path, out: Path, val_ratio: float) -> tuple[list[Candidate], list[dict], list[dict], bool]:
    """:func:`scan`, after the options are checked and before any video is probed: a wrong option,
    an unwritable ``out`` or a root without videos fails at once."""
    if not 0.0 < val_ratio < 1.0:
        raise InputError(f"--val-ratio must be between 0 and 1, got {val_ratio}", fix="use e.g. 0.2")
    candidates, ignored, empty, presplit = scan(video_root)
    ensure_writable_dir(out, "output folder", "--out folder")
    if not candidates:
        raise InputError(
            "no videos found" + (f" ({len(ignored)} other files ignored)" if ignored else ""),
            path=video_root,
            fix=f"put videos ({', '.join(VIDEO_EXTENSIONS)}) in one sub-folder per class: "
            "VIDEO_ROOT/<class>/<video>",
        )
    return candidates, ignored, empty, presplit


def _entries(by_split: dict[str, dict[str, list[Path]]], classes: list[str]) -> dict[str, list[tuple[Path, int]]]:
    """split -> (video, label) in annotation-list order; videos of classes not kept are left out."""
    label = {name: i for i, name in enumerate(classes)}
    return {split: [(p, label[name]) for name, vids in sorted(by_split[split].items())
                    if name in label for p in vids] for split in ("train", "val")}


def _check_trainable(classes: list[str], entries: dict[str, list[tuple[Path, int]]], out: Path,
                     video_root: Path) -> None:
    """Fail (after the report is written, which says why) when what is left cannot train a
    classifier: fewer than two classes, or no val videos."""
    if len(classes) < 2:
        raise InputError(
            f"{len(classes)} class(es) with usable training videos ({', '.join(classes) or 'none'}); "
            f"a classifier needs at least 2 (details in {out / layout.REPORT_JSON})",
            path=video_root,
            fix="add a sub-folder with videos for each class: VIDEO_ROOT/<class>/<video>",
        )
    if not entries["val"]:
        raise InputError(f"the val split is empty (details in {out / layout.REPORT_JSON})", path=video_root,
                         fix="add more videos per class, or pre-split the root into train/ and val/")


def _usable(candidates: list[Candidate], probes: list[VideoProbe], video_root: Path,
            min_frames: int) -> tuple[list[tuple[Candidate, VideoProbe]], list[dict]]:
    """The videos that can be trained on, and the rejected ones with the reason and the fix."""
    rejected = [p.to_dict() for p in probes if not p.ok]
    usable: list[tuple[Candidate, VideoProbe]] = []
    for cand, probe in zip(candidates, probes, strict=True):
        if not probe.ok:
            continue
        if probe.frames < min_frames:
            rejected.append({**probe.to_dict(), "reason": "too_short", "fix": TOO_SHORT_FIX,
                             "detail": f"{probe.frames} frames, --min-frames is {min_frames}"})
            continue
        relative = cand.path.relative_to(video_root).as_posix()
        if any(ch.isspace() for ch in relative):
            rejected.append({**probe.to_dict(), "reason": "whitespace_in_path",
                             "detail": "MMAction2 annotation lists are space-separated",
                             "fix": "rename the file/folder without spaces"})
            continue
        usable.append((cand, probe))
    return usable, rejected


def _split(usable: list[tuple[Candidate, VideoProbe]], presplit: bool, val_ratio: float,
           seed: int) -> tuple[dict[str, dict[str, list[Path]]], list[str]]:
    """split -> class -> videos: as the folders say (pre-split), or stratified by class here."""
    if presplit:
        by_split: dict[str, dict[str, list[Path]]] = {"train": defaultdict(list), "val": defaultdict(list)}
        for cand, _ in usable:
            by_split[cand.split or "train"][cand.class_name].append(cand.path)
        return by_split, []
    by_class: dict[str, list[Path]] = defaultdict(list)
    for cand, _ in usable:
        by_class[cand.class_name].append(cand.path)
    train, val, warnings = _stratified_split(by_class, val_ratio, seed)
    return {"train": train, "val": val}, warnings


def _classes(by_split: dict[str, dict[str, list[Path]]], candidates: list[Candidate], empty: list[dict],
             presplit: bool, probe_of: dict[Path, VideoProbe], rejected: list[dict],
             warnings: list[str]) -> tuple[list[str], list[dict]]:
    """The classes (those with training videos) and the class folders skipped; val videos of a
    class without training videos join ``rejected``, and what is worth saying ``warnings``."""
    classes = sorted(name for name, vids in by_split["train"].items() if vids)
    # An empty val/<class> folder only means no val videos for that class (warned below).
    skipped = [e for e in empty if e["split"] != "val"]
    folder_classes = {c.class_name for c in candidates if c.split in (None, "train")}
    for name in sorted(folder_classes - set(classes) - {e["class"] for e in skipped}):
        skipped.append({"class": name, "reason": "no usable videos (all rejected, see 'rejected')",
                        "fix": "fix or replace the rejected videos of this class"})
    for name, vids in sorted(by_split["val"].items()):
        if vids and name not in classes:
            for path in vids:
                rejected.append({**probe_of[path].to_dict(), "reason": "unknown_class",
                                 "detail": f"class '{name}' has no training videos",
                                 "fix": f"add training videos to train/{name}/ or remove val/{name}/"})
    for name in classes:
        if presplit and not by_split["val"].get(name):
            warnings.append(f"class '{name}' has no val videos")
    warnings += [f"class '{s['class']}' skipped: {s['reason']}" for s in skipped]
    return classes, skipped


def _report(video_root: Path, presplit: bool, settings: dict, classes: list[str],
            entries: dict[str, list[tuple[Path, int]]], probe_of: dict[Path, VideoProbe], found: int,
            rejected: list[dict], short: list[dict], ignored: list[dict], skipped: list[dict],
            warnings: list[str]) -> dict:
    """``prepare_report.json``: every file and class folder, used or not, and why."""
    return {
        "video_root": str(video_root),
        "layout": "train/val folders" if presplit else "class folders",
        **{k: settings[k] for k in ("val_ratio", "seed", "min_frames", "preset")},
        "classes": classes,
        "counts": {split: {name: sum(1 for _, lab in entries[split] if lab == i) for i, name in enumerate(classes)}
                   for split in ("train", "val")},
        "found": found,
        "accepted": len(entries["train"]) + len(entries["val"]),
        "rejected": sorted(rejected, key=lambda r: r["path"]),
        "short": {"count": len(short), "clip_frames": settings["clip_frames"],
                  "note": "kept: fewer frames than one clip spans, MMAction2's SampleFrames loops them",
                  "videos": short},
        "ignored": ignored,
        "skipped_classes": skipped,
        "warnings": warnings,
        "videos": [
            {"path": str(p), "split": split, "label": lab, **{k: v for k, v in probe_of[p].to_dict().items()
                                                           if k in ("frames", "fps", "width", "height", "decoder")}}
            for split in ("train", "val") for p, lab in entries[split]
        ],
    }


def _write_data(out: Path, video_root: Path, classes: list[str], entries: dict[str, list[tuple[Path, int]]],
                settings: dict, short: int, frames: dict | None = None) -> None:
    """The annotation lists, the class index and the dataset's json (what DATA is). With ``frames``
    (``--rawframes``): rawframes lists (``<frame_dir> <total_frames> <label>``) under ``DATA/rawframes``,
    which becomes the media root; the videos' root is kept as ``source_videos``."""
    (out / "annotations").mkdir(exist_ok=True)
    for split, name in (("train", layout.TRAIN_LIST), ("val", layout.VAL_LIST)):
        if frames is None:
            lines = [f"{p.relative_to(video_root).as_posix()} {lab}\n" for p, lab in entries[split]]
        else:
            lines = [f"{' '.join(map(str, frames['frame_dirs'][str(p)]))} {lab}\n" for p, lab in entries[split]]
        (out / name).write_text("".join(lines))
    layout.write_class_index(out / layout.CLASS_INDEX, classes)
    raw = {} if frames is None else {"source_videos": str(video_root), "filename_tmpl": frames["filename_tmpl"],
                                     "frame_short_side": frames["frame_short_side"]}
    (out / layout.DATASET_JSON).write_text(json.dumps({
        "video_root": str(video_root) if frames is None else frames["root"],
        "format": "video" if frames is None else "rawframes",
        **raw,
        "direction_sensitive": _direction_sensitive(video_root),
        "min_frames": settings["min_frames"],
        "clip_frames": settings["clip_frames"],
        "preset": settings["preset"],
        "short": short,
        "classes": classes,
        "train": len(entries["train"]),
        "val": len(entries["val"]),
    }, indent=2) + "\n")


def _direction_sensitive(video_root: Path) -> bool:
    """True when the video folder has a ``sfdeploy_dataset.json`` saying that flipping changes the
    class (``{"direction_sensitive": true}``; the synthetic motion set has one); finetune then
    turns horizontal flips off."""
    meta = video_root / HINTS_JSON
    if not meta.is_file():
        return False
    try:
        return bool(json.loads(meta.read_text()).get("direction_sensitive", False))
    except (OSError, ValueError):
        return False

