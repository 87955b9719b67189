"""The bad-input matrix: every awkward input gets a message naming it and the fix; the command
exits non-zero where it cannot go on; every other input is processed.

Covered elsewhere, with the same contract: a port in use, a model not on the server and a
server not running (test_serving.py), val classes unknown to the model (test_export.py).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from badvideos import bad_input_matrix, good_video, growing_stream
from conftest import run_cli

#: what a stream of 64x64 frames that grow to 8192x8192 is refused with, at the decoder
GROWN = ("frames of 8192x8192 (67,108,864 pixels) are over the limit of 8,847,360 pixels from frame 8 on "
         "(the header says 64x64)")


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    root = tmp_path_factory.mktemp("matrix") / "videos"
    usable, failing = bad_input_matrix(root)
    return root, usable, failing


@pytest.fixture(scope="module")
def growing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64x64 in its header and first 8 frames, then 2 frames of 8192x8192 (206 KB)."""
    return growing_stream(tmp_path_factory.mktemp("growing") / "grows_to_8192.ts")


def _spec():  # a small clip spec whose sampled indices reach the last frames of a 10-frame video
    from sfdeploy.clipspec import ClipSpec

    return ClipSpec(clip_len=8, frame_interval=2, num_clips=2, crop_mode="center", short_side=32, crop_size=28,
                    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def test_frames_that_grow_past_the_limit_after_the_header_are_refused_at_the_decoder(growing: Path,
                                                                                     tmp_path: Path) -> None:
    """The header (and the first frames) pass the limit; the first larger frame stops decoding with
    frame_too_large, in process, from bytes, and in the decode pool; a raised limit lets it through."""
    from sfdeploy.decode import DecodeError, open_video
    from sfdeploy.decode.clips import DecodeFailure, load_video
    from sfdeploy.decode.pool import decode_many
    from sfdeploy.preprocess import sample_indices

    spec = _spec()
    with open_video(growing) as video:
        assert (video.width, video.height, video.num_frames) == (64, 64, 10)
        assert video.frames([0, 7]).shape == (2, 64, 64, 3)  # the frames before it decode
        with pytest.raises(DecodeError) as info:
            video.frames(range(video.num_frames))
    assert info.value.reason == "frame_too_large" and GROWN in info.value.message
    assert sample_indices(10, spec).max() >= 8
    with pytest.raises(DecodeError, match=r"frames of 8192x8192 .* from frame 8 on") as info:
        load_video(growing.read_bytes(), spec)
    assert info.value.reason == "frame_too_large" and "--max-video-pixels" in info.value.fix
    [(_, failure, how)] = list(decode_many([str(growing)], spec, workers=1))
    assert isinstance(failure, DecodeFailure) and GROWN in failure.error and how.decoder == ""
    small = growing_stream(tmp_path / "grows_to_256.ts", large=(256, 256))  # a raised limit lets it through
    with pytest.raises(DecodeError, match=r"frames of 256x256 \(65,536 pixels\) are over the limit of 16,384"):
        load_video(small, spec, max_pixels=128 * 128)
    with open_video(small, max_pixels=256 * 256) as video:  # every frame at the header's size, as decord gives
        assert video.frames(range(10)).shape == (10, 64, 64, 3)


_DECODE_MEMORY = """
import resource, sys
import av, decord, numpy  # imported before the first reading: only decoding is measured
from sfdeploy.decode import DecodeError, open_video
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    with open_video(sys.argv[1]) as video:
        video.frames(range(video.num_frames))
except DecodeError as exc:
    print(exc.reason, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_a_stream_that_grows_costs_bounded_memory_to_refuse(growing: Path) -> None:
    """Decoding it in a fresh interpreter: the peak grows by tens of MB (decord, which decoded it
    whole, took 358 MB here, a server's process tree 2.27 GB)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _DECODE_MEMORY, str(growing)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    reason, grown_mb = result.stdout.split()
    assert reason == "frame_too_large" and float(grown_mb) < 150, result.stdout


def test_prepare_uses_the_odd_but_valid_and_reports_the_rest(matrix, tmp_path: Path) -> None:
    root, usable, failing = matrix
    good_video(root / "move_left" / "short.mp4", frames=10)  # fewer frames than a 16x2 clip: kept, looped
    try:
        result = run_cli("data", "prepare", str(root), "--out", str(tmp_path / "d"), "--preset", "slowfast_tiny")
    finally:
        (root / "move_left" / "short.mp4").unlink()
    report = json.loads((tmp_path / "d" / "prepare_report.json").read_text())
    accepted = {Path(v["path"]).name for v in report["videos"]}
    assert accepted == {p.name for p in usable.values()} | {"short.mp4"}
    reasons = {Path(r["path"]).name: r["reason"] for r in report["rejected"]}
    assert reasons == {"corrupt.mp4": "unreadable", "truncated.mp4": "unreadable", "empty.mp4": "zero_bytes",
                       "notes.avi": "unreadable"}
    for rejected in report["rejected"]:
        assert rejected["fix"] and Path(rejected["path"]).name in result.stderr
    assert [Path(v["path"]).name for v in report["short"]["videos"]] == ["short.mp4"]  # 10 < 16 x 2 frames
    assert report["short"]["clip_frames"] == 32 and "short.mp4: 10 frames" in result.stderr
    decoders = {Path(v["path"]).name: v["decoder"] for v in report["videos"]}
    assert set(decoders.values()) == {"pyav"}  # every video, narrow_72.mp4 (a width decord fails on) too
    sizes = {Path(v["path"]).name: (v["width"], v["height"], v["frames"]) for v in report["videos"]}
    assert sizes["odd_97x131.mp4"] == (131, 97, 40) and sizes["portrait.mp4"] == (80, 128, 40)
    assert sizes["long.mp4"][2] == 1500


def test_infer_classifies_the_odd_but_valid_and_rows_every_failure(matrix, triton, tiny_export: Path,
                                                                    tmp_path: Path) -> None:
    from sfdeploy.client import Classifier

    root, usable, failing = matrix
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    missing = tmp_path / "does_not_exist.mp4"
    out = tmp_path / "p.csv"
    result = run_cli("infer", str(root), str(missing), str(empty), "--url", triton.http_url, "--out", str(out),
                     check=False)
    assert result.returncode == 1
    rows = {r["path"]: r for r in csv.DictReader(out.open())}
    assert len(rows) == len(usable) + len(failing) + 2  # one row per input, nothing dropped
    # each odd-but-valid video is classified as the served model classifies it decoded here, in process
    with Classifier.from_export(tiny_export, backend="torchscript") as local:  # the served runtime
        here = {p.path: p for p in local.classify([str(p) for p in usable.values()])}
    for path in usable.values():
        row = rows[str(path)]
        assert row["status"] == "ok" and row["label"] == here[str(path)].label, (row, here[str(path)])
        assert abs(float(row["score"]) - here[str(path)].score) <= 1e-5
    assert (rows[str(usable["plain"])]["label"], rows[str(usable["plain_b"])]["label"]) == ("move_left", "move_right")
    expected = {"corrupt": "cannot decode", "truncated": "cannot decode", "zero_byte": "empty (0 bytes)",
                "not_a_video": "cannot decode"}
    for name, path in failing.items():
        row = rows[str(path)]
        assert row["status"] == "error" and expected[name] in row["error"] and "remove it" in row["error"]
        assert str(path) in result.stderr
    assert rows[str(missing)]["error"].startswith("file not found")
    assert "folder has no videos" in rows[str(empty)]["error"]


def test_failed_inputs_are_said_once_without_a_rate_or_the_decoders_own_lines(matrix, tiny_export: Path,
                                                                              tmp_path: Path) -> None:
    root, usable, failing = matrix
    result = run_cli("infer", *(str(p) for p in failing.values()), "--export", str(tiny_export),
                     "--out", str(tmp_path / "p.csv"), check=False)
    assert result.returncode == 1
    assert "0 classified, 4 failed, 0 already in" in result.stderr and "videos/s" not in result.stderr
    assert "video_reader.cc" not in result.stderr and "moov atom" not in result.stderr
    for path in failing.values():
        line = next(line for line in result.stderr.splitlines() if line.startswith(f"failed: {path}: "))
        said = line.removeprefix(f"failed: {path}: ")
        assert not re.search(r"\([^)]*\(", said), said  # one level of detail, no "(... (... (...)))"
        assert said.count("empty") <= 1 and said.count("cannot") == (0 if path.name == "empty.mp4" else 1), said


@pytest.mark.parametrize("command", ["repo", "infer", "eval"])
def test_a_folder_without_manifest_is_not_an_export(command: str, tmp_path: Path, prepared: Path) -> None:
    not_export = tmp_path / "EXPORT"
    not_export.mkdir()
    args = {"repo": ["repo", str(not_export), "--repo", str(tmp_path / "r")],
            "infer": ["infer", str(tmp_path), "--backend", "onnxruntime", "--export", str(not_export),
                      "--out", str(tmp_path / "p.csv")],
            "eval": ["eval", str(not_export), "--data", str(prepared)]}[command]
    result = run_cli(*args, check=False)
    assert result.returncode == 1
    assert f"no manifest.json in the export folder: {not_export}" in result.stderr
    assert "fix: pass the --out folder of `sfdeploy export`" in result.stderr
