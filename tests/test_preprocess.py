"""The client preprocessing equals MMAction2's test pipeline, pixel for pixel; the decode pool's
CPU path decodes paths and bytes, reports failures in place, and needs no GPU code."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sfdeploy.clipspec import ClipSpec
from sfdeploy.decode import DecodeError
from sfdeploy.decode.clips import DecodeFailure, load_video
from sfdeploy.decode.pool import decode_many
from sfdeploy.errors import InputError
from sfdeploy.preprocess import sample_indices

from badvideos import encoded_video, good_video

BASE = ClipSpec(clip_len=8, frame_interval=2, num_clips=1, crop_mode="center", short_side=64, crop_size=56,
                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), class_names=("a", "b"))


def _mmaction(spec: ClipSpec, path: Path) -> np.ndarray:
    from mmengine.dataset import Compose
    from mmengine.registry import init_default_scope

    from sfdeploy.compat import ensure_mmaction

    ensure_mmaction()
    init_default_scope("mmaction")
    data = Compose(spec.mmaction_pipeline())(dict(filename=str(path), label=-1, start_index=0, modality="RGB"))
    return data["inputs"].permute(0, 2, 3, 4, 1).numpy()  # [V, 3, T, H, W] -> [V, T, H, W, 3]


@pytest.mark.parametrize("total", [1, 5, 15, 16, 17, 40, 301])
@pytest.mark.parametrize("clip_len,interval,clips", [(8, 2, 1), (16, 2, 2), (32, 2, 10), (4, 8, 3)])
def test_frame_indices_match_sampleframes(total: int, clip_len: int, interval: int, clips: int) -> None:
    from mmaction.datasets.transforms import SampleFrames

    from sfdeploy.compat import ensure_mmaction

    ensure_mmaction()
    spec = replace(BASE, clip_len=clip_len, frame_interval=interval, num_clips=clips)
    theirs = SampleFrames(clip_len, interval, clips, test_mode=True)(dict(total_frames=total, start_index=0))
    assert np.array_equal(sample_indices(total, spec).reshape(-1), theirs["frame_inds"])


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pre")
    return {
        "square": good_video(root / "square.mp4", frames=48, size=96),
        "odd_landscape": encoded_video(root / "odd.mp4", 131, 97, frames=30),
        "odd_portrait": encoded_video(root / "portrait.mkv", 97, 131, frames=30, codec="ffv1"),
        "short": good_video(root / "short.mp4", frames=9, size=64),
        "gray": encoded_video(root / "gray.mkv", 80, 60, frames=20, codec="ffv1", gray=True),
        "vfr": encoded_video(root / "vfr.mp4", 96, 72, frames=40, vfr=True),
    }


@pytest.mark.parametrize("name", ["square", "odd_landscape", "odd_portrait", "short", "gray", "vfr"])
@pytest.mark.parametrize("views", [(1, "center"), (2, "three"), (3, "center")])
def test_views_equal_mmaction2_pipeline(videos: dict[str, Path], name: str, views: tuple[int, str]) -> None:
    spec = replace(BASE, num_clips=views[0], crop_mode=views[1])
    if spec.crop_mode == "three":
        spec = replace(spec, crop_size=spec.short_side)  # ThreeCrop takes the short side whole
    ours = load_video(str(videos[name]), spec)
    assert ours.shape == (spec.views, *spec.input_shape[1:]) and ours.dtype == np.uint8
    assert np.array_equal(ours, _mmaction(spec, videos[name]))


def test_bytes_of_a_file_give_the_views_of_its_path(videos: dict[str, Path]) -> None:
    """Server-side decoding receives encoded bytes, not paths: the same views, every awkward case."""
    for path in videos.values():
        assert np.array_equal(load_video(path.read_bytes(), BASE), load_video(path, BASE))


@pytest.mark.parametrize("source", ["missing", "empty_bytes", "garbage_bytes", "garbage_file"])
def test_a_bad_source_is_an_input_error_naming_it(source: str, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 50)
    arg = {"missing": tmp_path / "nope.mp4", "empty_bytes": b"", "garbage_bytes": b"not a video" * 50,
           "garbage_file": garbage}[source]
    with pytest.raises(DecodeError) as info:
        load_video(arg, BASE)
    assert info.value.reason == {"missing": "not_found", "empty_bytes": "zero_bytes"}.get(source, "unreadable")
    assert isinstance(info.value, InputError) and info.value.fix
    assert info.value.path == (str(arg) if isinstance(arg, Path) else f"<{len(arg)} bytes of an encoded video>")


def test_decode_many_takes_bytes(videos: dict[str, Path]) -> None:
    sources = [videos["square"].read_bytes(), b"not a video" * 50, videos["vfr"]]
    results = {index: clip for index, clip, _ in decode_many(sources, BASE, workers=2)}
    assert np.array_equal(results[0], load_video(videos["square"], BASE))
    assert isinstance(results[1], DecodeFailure) and results[1].path == "<550 bytes of an encoded video>"
    assert "cannot decode" in results[1].error and "re-encode it" in results[1].error
    assert results[2].shape == (1, 8, 56, 56, 3)


def test_decode_many_reports_failures_in_place(videos: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    paths = [videos["square"], bad, tmp_path / "missing.mp4", videos["vfr"]]
    results = {index: clip for index, clip, _ in decode_many(paths, BASE, workers=2)}
    assert sorted(results) == [0, 1, 2, 3]
    assert isinstance(results[1], DecodeFailure) and isinstance(results[2], DecodeFailure)
    assert results[1].path == str(bad) and "cannot decode" in results[1].error
    assert results[2].error.startswith("file not found")
    for failure in (results[1], results[2]):  # one level of detail: no "cannot decode (cannot open (...))"
        assert not re.search(r"\([^)]*\(", failure.error), failure.error
    assert results[0].shape == results[3].shape == (1, 8, 56, 56, 3)


_CPU_ONLY = """
import sys
from sfdeploy.clipspec import ClipSpec
from sfdeploy.decode.pool import _decode_task, decode_many
spec, path = ClipSpec.from_json(sys.argv[1]), sys.argv[2]
clip, how = _decode_task((path, spec, 10**8, None, ""))  # what a worker runs for a job without a GPU plan
[(_, pooled, _)] = list(decode_many([path], spec, workers=1))
assert (clip == pooled).all() and how.decoder == "pyav", how
print(sorted(m for m in sys.modules if m.startswith("sfdeploy.decode.gpu") or m.split(".")[0] == "torch"))
"""


def test_the_cpu_path_needs_no_gpu_code(videos: dict[str, Path]) -> None:
    """A decode without a GPU plan imports nothing of the GPU decoding (nor torch), in the caller
    or in the task its workers run."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _CPU_ONLY, BASE.to_json(), str(videos["square"])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
