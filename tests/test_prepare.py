"""`sfdeploy data prepare`: scan, probe, split, report; bad input reported, never dropped silently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from sfdeploy.cli import cli
from sfdeploy.data.layout import PreparedData
from sfdeploy.data.prepare import prepare
from sfdeploy.errors import InputError

from badvideos import good_video, no_video_frames, not_a_video, truncated, zero_byte


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_prepared_synthetic_data_is_a_complete_stratified_split(prepared: Path, synth_root: Path) -> None:
    data = PreparedData.from_dir(prepared)
    assert data.classes == sorted(p.name for p in synth_root.iterdir() if p.is_dir())
    assert data.direction_sensitive  # the synthetic set says so; finetune turns Flip off
    train = _lines(prepared / "annotations/train_list.txt")
    val = _lines(prepared / "annotations/val_list.txt")
    assert len(train) + len(val) == 64
    assert not set(train) & set(val)
    for label in range(4):  # every class in both splits, 20% held out
        assert sum(line.endswith(f" {label}") for line in val) == 3
    for line in train + val:  # paths relative to the video root, and they exist
        path, label = line.split()
        assert (synth_root / path).is_file()
        assert path.split("/")[0] == data.classes[int(label)]
    report = json.loads((prepared / "prepare_report.json").read_text())
    assert report["accepted"] == 64 and report["rejected"] == []
    assert {v["frames"] for v in report["videos"]} == {48}
    assert {v["decoder"] for v in report["videos"]} == {"pyav"}  # decord only indexes
    assert report["short"]["count"] == 0 and report["short"]["clip_frames"] == 32  # slowfast_tiny: 16 x 2


def test_split_is_deterministic_by_seed(synth_root: Path, tmp_path: Path) -> None:
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare(synth_root, tmp_path / name, seed=seed, show_progress=False)
    val = {n: _lines(tmp_path / n / "annotations/val_list.txt") for n in "abc"}
    assert val["a"] == val["b"]
    assert val["a"] != val["c"]


def _dataset_with_bad_files(root: Path) -> dict[str, Path]:
    for cls in ("left", "right"):
        for i in range(4):
            good_video(root / cls / f"{cls}_{i}.mp4", frames=40, motion=f"move_{cls}", seed=i)
    bad = {
        "zero_bytes": zero_byte(root / "left" / "empty.mp4"),
        "unreadable": not_a_video(root / "right" / "notes.avi"),
        "truncated": truncated(root / "left" / "cut.mp4", root / "left" / "left_0.mp4"),
        "too_short": good_video(root / "right" / "short.mp4", frames=10),
        "no_frames": no_video_frames(root / "right" / "silent.mp4"),
    }
    (root / "right" / "readme.txt").write_text("not a video")
    good_video(root / "stray.mp4")  # not inside a class folder
    (root / "empty_class").mkdir()
    return bad


def test_bad_files_are_reported_with_reason_and_fix_and_the_rest_is_used(tmp_path: Path) -> None:
    root = tmp_path / "videos"
    bad = _dataset_with_bad_files(root)
    result = prepare(root, tmp_path / "out", min_frames=32, show_progress=False)
    assert result.classes == ["left", "right"]
    assert result.train + result.val == 8
    report = json.loads(result.report_path.read_text())
    reasons = {Path(r["path"]).name: r["reason"] for r in report["rejected"]}
    assert reasons == {"empty.mp4": "zero_bytes", "notes.avi": "unreadable", "cut.mp4": "unreadable",
                       "short.mp4": "too_short", "silent.mp4": "unreadable"}
    assert all(r["fix"] for r in report["rejected"])
    ignored = {Path(i["path"]).name for i in report["ignored"]}
    assert {"readme.txt", "stray.mp4"} <= ignored
    assert [s["class"] for s in report["skipped_classes"]] == ["empty_class"]
    assert any("empty_class" in w for w in result.warnings)
    listed = {line.split()[0] for line in _lines(tmp_path / "out/annotations/train_list.txt")
              + _lines(tmp_path / "out/annotations/val_list.txt")}
    assert not any(Path(p).name in {b.name for b in bad.values()} for p in listed)


def test_presplit_root_keeps_its_split_and_rejects_unknown_val_classes(tmp_path: Path) -> None:
    root = tmp_path / "videos"
    for split, n in (("train", 3), ("val", 1)):
        for cls in ("a", "b"):
            for i in range(n):
                good_video(root / split / cls / f"{i}.mp4", frames=20, seed=i)
    good_video(root / "val" / "c" / "0.mp4", frames=20)  # a class training never saw
    result = prepare(root, tmp_path / "out", show_progress=False)
    assert (result.train, result.val) == (6, 2)
    assert [r["reason"] for r in result.rejected] == ["unknown_class"]
    assert "train/c" in result.rejected[0]["fix"]
    assert all(line.startswith("val/") for line in _lines(tmp_path / "out/annotations/val_list.txt"))


def test_path_with_whitespace_is_rejected_not_mangled(tmp_path: Path) -> None:
    root = tmp_path / "videos"
    for cls in ("a", "b"):
        for i in range(3):
            good_video(root / cls / f"{i}.mp4", frames=20, seed=i)
    good_video(root / "a" / "my clip.mp4", frames=20)
    result = prepare(root, tmp_path / "out", show_progress=False)
    assert [(Path(r["path"]).name, r["reason"]) for r in result.rejected] == [("my clip.mp4", "whitespace_in_path")]


@pytest.mark.parametrize("case", ["missing", "empty", "one_class", "all_rejected"])
def test_unusable_roots_fail_with_the_input_and_the_fix(tmp_path: Path, case: str) -> None:
    root = tmp_path / "videos"
    if case != "missing":
        root.mkdir()
    if case == "one_class":
        for i in range(3):
            good_video(root / "only" / f"{i}.mp4", frames=20, seed=i)
    if case == "all_rejected":
        zero_byte(root / "a" / "x.mp4")
        zero_byte(root / "b" / "y.mp4")
    with pytest.raises(InputError) as info:
        prepare(root, tmp_path / "out", show_progress=False)
    assert str(root) in str(info.value) and info.value.fix
    if case in ("one_class", "all_rejected"):  # the report is written even when the run fails
        report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
        assert report["found"] >= 2


def test_cli_exit_codes_and_messages(tmp_path: Path, synth_root: Path) -> None:
    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(cli, ["data", "prepare", str(empty), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "no videos found" in result.output and "fix:" in result.output
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = runner.invoke(cli, ["data", "prepare", str(synth_root), "--out", str(blocker / "out")])
    assert result.exit_code == 1 and "writable" in result.output
    result = runner.invoke(cli, ["data", "prepare", str(synth_root), "--out", str(tmp_path / "o"),
                                 "--preset", "nope"])
    assert result.exit_code == 1 and "unknown preset" in result.output


def test_short_videos_are_kept_and_reported_by_default(tmp_path: Path, synth_root: Path) -> None:
    """48-frame videos are shorter than one clip of the default R50 4x16 preset (32 x 2 frames):
    MMAction2 trains on them (SampleFrames loops the frames), so they are used and listed as short;
    only an explicit --min-frames rejects by length."""
    root = tmp_path / "videos"
    for cls in ("move_left", "move_right"):
        shutil.copytree(synth_root / cls, root / cls)
    videos = sorted(str(p) for p in root.rglob("*.mp4"))
    result = CliRunner().invoke(cli, ["data", "prepare", str(root), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "prepare_report.json").read_text())
    assert report["rejected"] == [] and report["accepted"] == len(videos) == 32
    assert report["short"]["count"] == 32 and report["short"]["clip_frames"] == 64
    assert sorted(v["path"] for v in report["short"]["videos"]) == videos
    assert {v["frames"] for v in report["short"]["videos"]} == {48}
    listed = _lines(tmp_path / "o/annotations/train_list.txt") + _lines(tmp_path / "o/annotations/val_list.txt")
    assert len(listed) == 32
    assert "(32 short: fewer than the 64 frames of one clip" in result.output
    assert f"short: {videos[0]}: 48 frames" in result.output and "27 more in the report" in result.output
    assert json.loads((tmp_path / "o" / "dataset.json").read_text())["short"] == 32

    result = CliRunner().invoke(cli, ["data", "prepare", str(root), "--out", str(tmp_path / "m"),
                                      "--min-frames", "49"])
    assert result.exit_code == 1  # every video rejected: no classes left
    report = json.loads((tmp_path / "m" / "prepare_report.json").read_text())
    assert {r["reason"] for r in report["rejected"]} == {"too_short"} and len(report["rejected"]) == 32
    assert "48 frames, --min-frames is 49" in report["rejected"][0]["detail"]
