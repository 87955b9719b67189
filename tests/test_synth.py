"""`sfdeploy data synth`: real, decodable, deterministic videos whose classes differ in motion."""

from __future__ import annotations

import json
from pathlib import Path

import decord
import numpy as np
import pytest
from click.testing import CliRunner

from sfdeploy.cli import cli
from sfdeploy.data.synth import MOTIONS, SynthOptions, synthesize
from sfdeploy.errors import InputError


def _frames(path: Path) -> np.ndarray:
    reader = decord.VideoReader(str(path))
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def _centroid(frame: np.ndarray) -> np.ndarray:
    mask = frame.max(axis=2) > 140  # the shape is bright, the background dark
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def _area(frame: np.ndarray) -> int:
    return int((frame.max(axis=2) > 140).sum())


@pytest.fixture(scope="module")
def all_motions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("motions")
    synthesize(out, SynthOptions(classes=8, per_class=2, frames=24, size=64, seed=3), show_progress=False)
    return out


def test_writes_one_folder_per_class_of_decodable_mp4(all_motions: Path) -> None:
    meta = json.loads((all_motions / "sfdeploy_dataset.json").read_text())
    assert meta["classes"] == list(MOTIONS)
    assert meta["direction_sensitive"] is True
    for name in MOTIONS:
        files = sorted((all_motions / name).glob("*.mp4"))
        assert len(files) == 2
        frames = _frames(files[0])
        assert frames.shape == (24, 64, 64, 3)


@pytest.mark.parametrize("name,axis,sign", [("move_right", 0, 1), ("move_left", 0, -1),
                                             ("move_down", 1, 1), ("move_up", 1, -1)])
def test_translation_classes_move_the_shape_their_way(all_motions: Path, name: str, axis: int, sign: int) -> None:
    for video in (all_motions / name).glob("*.mp4"):
        frames = _frames(video)
        shift = _centroid(frames[-1]) - _centroid(frames[0])
        assert sign * shift[axis] > 10, (video, shift)
        assert abs(shift[1 - axis]) < 4, (video, shift)


def test_grow_and_shrink_change_the_area(all_motions: Path) -> None:
    for name, sign in (("grow", 1), ("shrink", -1)):
        for video in (all_motions / name).glob("*.mp4"):
            frames = _frames(video)
            assert sign * (_area(frames[-1]) - _area(frames[0])) > 50, video


def test_same_seed_same_videos_other_seed_other_videos(tmp_path: Path) -> None:
    opts = SynthOptions(classes=2, per_class=1, frames=12, size=32, seed=5)
    synthesize(tmp_path / "a", opts, show_progress=False)
    synthesize(tmp_path / "b", opts, show_progress=False)
    synthesize(tmp_path / "c", SynthOptions(classes=2, per_class=1, frames=12, size=32, seed=6), show_progress=False)
    name = "move_right/move_right_0000.mp4"
    a, b, c = (_frames(tmp_path / x / name) for x in "abc")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_rejects_impossible_options(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--classes"):
        synthesize(tmp_path, SynthOptions(classes=9), show_progress=False)
    result = CliRunner().invoke(cli, ["data", "synth", str(tmp_path / "x"), "--size", "33"])
    assert result.exit_code == 2
    assert "even" in result.output
