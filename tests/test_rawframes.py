"""`sfdeploy data prepare --rawframes`: the synthetic videos' frames as JPEGs in MMAction2's
RawframeDataset layout, the same split as the video lists, read back by MMAction2's own dataset and
RawFrameDecode with the pixels sfdeploy decodes, and trained on to the videos' accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sfdeploy.cli import cli
from sfdeploy.data.layout import PreparedData
from sfdeploy.data.prepare import prepare
from sfdeploy.data.rawframes import FILENAME_TMPL, MARKER, extract_rawframes
from sfdeploy.decode import open_video
from sfdeploy.errors import InputError

from badvideos import good_video, truncated
from conftest import run_cli


@pytest.fixture(scope="module")
def sets(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(video DATA, rawframes DATA) of the synthetic videos, same seed."""
    base = tmp_path_factory.mktemp("rawframes")
    prepare(synth_root, base / "videos", seed=0, clip_frames=32, preset="slowfast_tiny", show_progress=False)
    prepare(synth_root, base / "frames", seed=0, clip_frames=32, preset="slowfast_tiny", show_progress=False,
            rawframes=True)
    return base / "videos", base / "frames"


def _rgb(path: Path) -> np.ndarray:
    import cv2

    return cv2.imread(str(path))[..., ::-1]


def test_layout_lists_and_split_follow_the_video_prepare(sets: tuple[Path, Path], synth_root: Path) -> None:
    videos, frames = sets
    data = PreparedData.from_dir(frames)
    assert data.format == "rawframes" and data.media_root == frames / "rawframes"
    report = json.loads((frames / "prepare_report.json").read_text())
    probed = {Path(v["path"]).relative_to(synth_root).with_suffix("").as_posix(): v["frames"]
              for v in report["videos"]}
    for split in ("train", "val"):
        video_lines = (videos / f"annotations/{split}_list.txt").read_text().splitlines()
        frame_lines = (frames / f"annotations/{split}_list.txt").read_text().splitlines()
        assert [line.split()[0].rsplit(".", 1)[0] for line in video_lines] == [line.split()[0] for line in frame_lines]
        assert [line.split()[-1] for line in video_lines] == [line.split()[-1] for line in frame_lines]
        for line in frame_lines:  # <frame_dir> <total_frames> <label>, relative to the media root
            frame_dir, total, _ = line.split()
            folder = data.media_root / frame_dir
            assert int(total) == probed[frame_dir] == 48
            assert sorted(p.name for p in folder.glob("*.jpg")) == [FILENAME_TMPL.format(i) for i in range(1, 49)]
    raw = report["rawframes"]
    assert raw["videos"] == 64 and raw["frames"] == 64 * 48 and raw["failed"] == []
    assert raw["bytes"] == sum(p.stat().st_size for p in data.media_root.rglob("*.jpg")) > 0
    assert json.loads((frames / "dataset.json").read_text())["source_videos"] == str(synth_root.resolve())


def test_frames_are_the_pixels_sfdeploy_decodes(sets: tuple[Path, Path], synth_root: Path) -> None:
    _, frames = sets
    name = "move_left/move_left_0003"
    with open_video(synth_root / f"{name}.mp4") as video:
        decoded = video.frames(np.arange(video.num_frames)).astype(np.int16)
    written = np.stack([_rgb(p) for p in sorted((frames / "rawframes" / name).glob("*.jpg"))]).astype(np.int16)
    assert written.shape == decoded.shape
    diff = np.abs(written - decoded)
    # JPEG at quality 95 (4:2:0 chroma, sharp synthetic edges): ~2 levels on average, unbiased; a channel swap ~29
    assert diff.mean() < 3 and np.percentile(diff, 99) < 16 and np.abs((written - decoded).mean()) < 0.5
    assert np.abs(written[..., ::-1] - decoded).mean() > 5 * diff.mean()


def test_mmaction2_rawframe_dataset_and_decode_read_them(sets: tuple[Path, Path], synth_root: Path) -> None:
    from sfdeploy.compat import ensure_mmaction

    ensure_mmaction()
    from mmaction.datasets import RawframeDataset

    _, frames = sets
    data = PreparedData.from_dir(frames)
    pipeline = [dict(type="SampleFrames", clip_len=4, frame_interval=3, num_clips=1, test_mode=True),
                dict(type="RawFrameDecode")]
    dataset = RawframeDataset(**{k: v for k, v in data.mmaction_dataset("val", pipeline=pipeline,
                                                                        test_mode=True).items() if k != "type"})
    sample = dataset[0]
    frame_dir = data.val.names[0]
    with open_video(synth_root / f"{frame_dir}.mp4") as video:
        expected = video.frames(np.asarray(sample["frame_inds"]) - 1).astype(np.int16)  # 1-based on disk
    assert np.abs(np.stack(sample["imgs"]).astype(np.int16) - expected).mean() < 3  # RGB, as decoded
    assert sample["label"] == data.val.labels[0] and sample["total_frames"] == 48


def test_extraction_resumes_and_never_takes_a_partial_folder_for_done(synth_root: Path, tmp_path: Path) -> None:
    videos = sorted((synth_root / "move_up").glob("*.mp4"))[:3]
    root = tmp_path / "rawframes"
    first = extract_rawframes(videos, synth_root, root, show_progress=False)
    assert not any(r["reused"] for r in first.values())
    killed = root / "move_up" / videos[0].stem  # as a run killed mid-video leaves it: no marker, fewer frames
    (killed / MARKER).unlink()
    (killed / "img_00048.jpg").unlink()
    (root / "move_up" / f".{videos[1].stem}.partial").mkdir()
    again = extract_rawframes(videos, synth_root, root, show_progress=False)
    assert [again[v]["reused"] for v in videos] == [False, True, True]
    assert len(list(killed.glob("*.jpg"))) == 48 and not list(root.rglob("*.partial"))
    small = extract_rawframes(videos[:1], synth_root, tmp_path / "small", short_side=48, show_progress=False)
    assert small[videos[0]]["frames"] == 48 and _rgb(tmp_path / "small" / killed.relative_to(root) /
                                                      "img_00001.jpg").shape == (48, 48, 3)


def test_a_video_that_fails_to_decode_is_reported(tmp_path: Path) -> None:
    good = good_video(tmp_path / "v" / "a" / "good.mp4")
    bad = truncated(tmp_path / "v" / "a" / "cut.mp4", good)
    rows = extract_rawframes([good, bad], tmp_path / "v", tmp_path / "f", show_progress=False)
    assert rows[good]["frames"] == 48
    assert rows[bad]["reason"] and rows[bad]["detail"] and "re-encode" in rows[bad]["fix"]
    assert not (tmp_path / "f" / "a" / "cut").exists()


def test_cli_options_and_evals_refusal_read_well(sets: tuple[Path, Path]) -> None:
    _, frames = sets
    result = CliRunner().invoke(cli, ["data", "prepare", "x", "--out", "y", "--frame-short-side", "128"])
    assert result.exit_code == 2 and "pass --rawframes too" in result.output
    assert "--rawframes" in CliRunner().invoke(cli, ["data", "prepare", "--help"]).output
    from sfdeploy.evaluate import val_split

    with pytest.raises(InputError, match="eval decodes videos; this DATA lists rawframes") as caught:
        val_split(frames, ("move_down", "move_left", "move_right", "move_up"))
    assert "sfdeploy data prepare" in caught.value.fix
    assert json.loads((frames / "dataset.json").read_text())["source_videos"] in caught.value.fix  # where they are


def test_training_on_rawframes_reaches_the_videos_accuracy(sets: tuple[Path, Path], tiny_summary: dict,
                                                          tmp_path: Path) -> None:
    """slowfast_tiny for the demo's epochs on the frames (~50 s on 2 cores): the val top-1 of the
    demo's run on the videos."""
    _, frames = sets
    work = tmp_path / "work"
    run_cli("finetune", str(frames), "--work-dir", str(work), "--preset", "slowfast_tiny", "--epochs",
            str(tiny_summary["epochs"]), "--pretrained", "none")
    summary = json.loads((work / "finetune_summary.json").read_text())
    config = (work / "config.py").read_text()
    assert "RawFrameDecode" in config and "SfdeployVideoDecode" not in config
    assert summary["best_top1"] >= tiny_summary["best_top1"] - 1e-6
