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

from badvideos import bad_input_matrix, good_video
from conftest import run_cli


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    root = tmp_path_factory.mktemp("matrix") / "videos"
    usable, failing = bad_input_matrix(root)
    return root, usable, failing


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
    assert decoders.pop("narrow_72.mp4") == "pyav" and set(decoders.values()) == {"decord"}
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
