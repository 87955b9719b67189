"""``sfdeploy eval``'s model analysis (issue 31): per-class and mean class accuracy (MMAction2's own
definition, checked against MMAction2's function), the confusion matrix and its PNG at 400
classes, the most confused pairs, and the contact sheet of misclassified clips as the model
received them, in process and through the served model.

The demo's model gets every val video right, so the end-to-end tests evaluate it on a copy of
DATA whose val list carries wrong labels for a few videos (:func:`relabelled`): the model's
"mistakes" are then known in advance, and one class has no val video left."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sfdeploy import analysis
from sfdeploy.analysis import (
    MistakeSheet,
    analyse,
    confused_pairs,
    confusion_matrix,
    mean_class_accuracy,
    plot_confusion,
    plotted_classes,
)

# val videos of the demo given another (wrong) label: video -> the label DATA will claim
WRONG_LABELS = {"move_up/move_up_0003.mp4": "move_down", "move_up/move_up_0004.mp4": "move_down",
                "move_up/move_up_0012.mp4": "move_down", "move_left/move_left_0003.mp4": "move_right"}


def _mmaction2(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    from mmaction.evaluation.functional import mean_class_accuracy as theirs

    scores = np.eye(num_classes)[predictions]  # what MMAction2 takes: one score row per video
    return float(theirs(list(scores), list(labels)))


def test_mean_class_accuracy_is_mmaction2s_where_it_differs_from_top1() -> None:
    """Imbalanced: class 0 (8 videos, all right) dominates top-1; class 3 has no val video but is
    predicted once (MMAction2 counts it as 0); class 4 is neither (left out)."""
    labels = np.array([0] * 8 + [1, 1, 2])
    predictions = np.array([0] * 8 + [0, 0, 3])
    matrix = confusion_matrix(labels, predictions, 5)
    ours = mean_class_accuracy(matrix)
    assert ours == pytest.approx(_mmaction2(labels, predictions, 5), abs=1e-12)
    assert ours == pytest.approx((1 + 0 + 0 + 0) / 4)
    assert ours != pytest.approx(float((labels == predictions).mean()))  # top-1: 8/11
    rows = {row["class"]: row for row in analyse(labels, predictions, "abcde")["per_class"]}
    assert rows["a"]["accuracy"] == 1.0 and rows["b"]["accuracy"] == 0.0
    assert rows["d"] == {"class": "d", "videos": 0, "correct": 0, "accuracy": None}  # unknown, not 0


@pytest.mark.parametrize("seed", range(5))
def test_mean_class_accuracy_matches_mmaction2_on_random_predictions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.choice(7, size=40, p=[0.4, 0.25, 0.15, 0.1, 0.1, 0, 0])  # classes 5 and 6: no val video
    predictions = np.where(rng.random(40) < 0.6, labels, rng.integers(0, 7, 40))
    assert mean_class_accuracy(confusion_matrix(labels, predictions, 7)) == pytest.approx(
        _mmaction2(labels, predictions, 7), abs=1e-12)


def test_confusion_matrix_and_most_confused_pairs() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    predictions = np.array([0, 1, 1, 2, 1, 0, 2, 2, 1, 1, 1])
    matrix = confusion_matrix(labels, predictions, 3)
    assert matrix.tolist() == [[1, 2, 1], [1, 1, 0], [0, 3, 2]]  # rows: true, columns: predicted
    assert matrix.sum() == len(labels) and matrix.sum(axis=1).tolist() == [4, 2, 5]
    assert confused_pairs(matrix, ["a", "b", "c"], k=3) == [
        {"true": "c", "predicted": "b", "count": 3, "share": 0.6},
        {"true": "a", "predicted": "b", "count": 2, "share": 0.5},
        {"true": "b", "predicted": "a", "count": 1, "share": 0.5},  # before a -> c (1, 0.25): larger share
    ]


def test_the_png_of_400_classes_draws_the_30_most_confused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(400), 3)
    predictions = labels.copy()
    wrong = rng.choice(len(labels), 150, replace=False)
    predictions[wrong] = rng.integers(0, 400, 150)
    matrix = confusion_matrix(labels, predictions, 400)
    chosen = plotted_classes(matrix)
    off = matrix - np.diag(np.diag(matrix))
    errors = off.sum(0) + off.sum(1)
    assert len(chosen) == analysis.MAX_PLOT_CLASSES and chosen == sorted(chosen)
    assert min(errors[chosen]) >= max(np.delete(errors, chosen))  # no class left out has more mistakes
    names = [f"class number {i} with a long Kinetics-like name" for i in range(400)]
    drawn = plot_confusion(matrix, names, tmp_path / "c.png")
    assert drawn == [names[i] for i in chosen]
    width, height = Image.open(tmp_path / "c.png").size
    assert width <= 2000 and height <= 2000
    # few classes: all drawn; no mistake among 400: none drawn, and the image says so
    assert plotted_classes(confusion_matrix(labels[:36] // 3, labels[:36] // 3, 12)) == list(range(12))
    assert plot_confusion(confusion_matrix(labels, labels, 400), names, tmp_path / "none.png") == []
    assert (tmp_path / "none.png").stat().st_size > 0


def test_the_sheet_keeps_the_most_confident_mistakes_in_bounded_memory() -> None:
    sheet = MistakeSheet(max_clips=3, max_frames=8)
    clip = np.zeros((3, 32, 8, 8, 3), np.uint8)
    for index, confidence in enumerate([0.4, 0.9, 0.5, 0.9, 0.3]):
        sheet.offer(index, f"v{index}.mp4", clip, "a", "b", confidence)
        assert len(sheet._heap) <= 3
    kept = sheet.mistakes()
    assert [(m.index, m.confidence) for m in kept] == [(1, 0.9), (3, 0.9), (2, 0.5)]
    assert sheet.seen == 5
    assert kept[0].frames.shape == (1, 8, 8, 8, 3) and not np.shares_memory(kept[0].frames, clip)
    assert kept[0].shown == [0, 4, 9, 13, 18, 22, 27, 31]


def relabelled(prepared: Path, out: Path) -> Path:
    """A copy of DATA whose val list gives the videos of :data:`WRONG_LABELS` their wrong label."""
    shutil.copytree(prepared, out)
    classes = (out / "class_index.txt").read_text().split()
    val = out / "annotations" / "val_list.txt"
    lines = []
    for line in val.read_text().splitlines():
        name, label = line.split()
        lines.append(f"{name} {classes.index(WRONG_LABELS[name]) if name in WRONG_LABELS else label}")
    val.write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def mislabelled(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return relabelled(prepared, tmp_path_factory.mktemp("relabelled") / "data")


@pytest.fixture(scope="module")
def local_report(demo: tuple[Path, dict], mislabelled: Path):
    from sfdeploy.evaluate import evaluate
    from sfdeploy.target import ModelTarget

    return evaluate(ModelTarget(backend="onnxruntime", export_dir=demo[0] / "export", device="cpu"), mislabelled,
                    work_dir=demo[0] / "work", show_progress=False)


def test_the_report_of_the_demos_model(local_report, mislabelled: Path) -> None:
    from sfdeploy.data.layout import PreparedData

    report = local_report
    names = report.confusion["classes"]
    data = PreparedData.from_dir(mislabelled)
    labels = np.array([names.index(data.classes[label]) for _, label in data.val_videos()])
    predictions = np.array([names.index(row["prediction"]) for row in report.rows])
    reference = np.array([names.index(row["mmaction2_prediction"]) for row in report.rows])
    assert report.evaluated == 12 and report.top1 == 8 / 12
    assert report.mean_class_accuracy == pytest.approx(_mmaction2(labels, predictions, 4), abs=1e-12)
    assert report.mmaction2_mean_class_accuracy == pytest.approx(_mmaction2(labels, reference, 4), abs=1e-12)
    assert report.mean_class_accuracy == pytest.approx((3 / 6 + 2 / 2 + 3 / 4 + 0) / 4)  # move_up: no val video
    matrix = np.array(report.confusion["matrix"])
    assert matrix.sum() == 12 and matrix.sum(axis=1).tolist() == [6, 2, 4, 0]
    assert report.confused_pairs[:2] == [
        {"true": "move_down", "predicted": "move_up", "count": 3, "share": 0.5},
        {"true": "move_right", "predicted": "move_left", "count": 1, "share": 0.25}]
    move_up = next(row for row in report.per_class if row["class"] == "move_up")
    assert move_up["accuracy"] is None and move_up["mmaction2_accuracy"] is None
    json.dumps(report.to_dict())  # JSON-able, without the frames


def test_the_sheet_shows_only_the_mistakes_as_the_model_received_them(local_report, demo: tuple[Path, dict],
                                                                       tmp_path: Path) -> None:
    from sfdeploy.artifacts import Manifest
    from sfdeploy.decode.clips import load_video
    from sfdeploy.evaluate import write_report

    report = local_report
    files = write_report(report, tmp_path)
    assert report.misclassified == 4 and files.misclassified == tmp_path / "misclassified.png"
    shown = {Path(row["path"]).relative_to(Path(row["path"]).parents[1]).as_posix(): row for row in files.sheet}
    assert set(shown) == set(WRONG_LABELS)  # every mistake, nothing else
    for name, row in shown.items():
        assert row["true"] == WRONG_LABELS[name] and row["predicted"] == name.split("/")[0]
        assert 0 < row["confidence"] <= 1 and len(row["boxes"]) == 1  # one view drawn
    spec = Manifest.read(demo[0] / "export").clip_spec
    mistake = report.clips[0]
    assert np.array_equal(mistake.frames[0], load_video(mistake.path, spec)[0, mistake.shown])
    assert Image.open(files.misclassified).size[1] > 4 * spec.crop_size
    written = json.loads(files.confusion_json.read_text())
    assert written["confusion"]["matrix"] == report.confusion["matrix"] and written["plotted_classes"] == \
        report.confusion["classes"]
    # no mistake: no sheet (a stale one is removed) and a message that says so
    files = write_report(replace(report, clips=[], misclassified=0), tmp_path)
    assert files.misclassified is None and "no misclassified videos" in files.message
    assert not (tmp_path / "misclassified.png").exists() and files.confusion_png.exists()


def test_the_served_model_gets_the_same_analysis(triton, local_report, demo: tuple[Path, dict],
                                                 mislabelled: Path) -> None:
    from sfdeploy.evaluate import evaluate
    from sfdeploy.target import ModelTarget

    served = evaluate(ModelTarget(backend="triton", export_dir=demo[0] / "export", urls=triton.http_url,
                                  model="slowfast"), mislabelled, reference=False, show_progress=False)
    assert served.backend != local_report.backend
    for name in ("mean_class_accuracy", "confusion", "confused_pairs", "misclassified"):
        assert getattr(served, name) == getattr(local_report, name), name
    assert served.per_class == [{k: v for k, v in row.items() if not k.startswith("mmaction2")}
                                for row in local_report.per_class]  # no reference run here
    assert {m["path"] for m in served.misclassified_shown} == {m["path"] for m in local_report.misclassified_shown}


def test_cli_writes_the_report_folder(demo: tuple[Path, dict], mislabelled: Path, tmp_path: Path) -> None:
    from sfdeploy.cli import cli

    out = tmp_path / "analysis"
    result = CliRunner().invoke(cli, ["eval", str(demo[0] / "export"), "--data", str(mislabelled), "--no-reference",
                                      "--device", "cpu", "--report-dir", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["mean_class_accuracy"] == pytest.approx(0.5625) and "confusion" not in summary
    assert sorted(Path(p).name for p in summary["report_files"]) == ["confusion.json", "confusion.png",
                                                                      "misclassified.png"]
    assert "mean class accuracy 56.2%" in result.stderr and "most confused: move_down -> move_up" in result.stderr


def test_cli_help_and_a_bad_report_dir(demo: tuple[Path, dict], prepared: Path, tmp_path: Path) -> None:
    from sfdeploy.cli import cli

    result = CliRunner().invoke(cli, ["eval", "--help"])
    assert "--report-dir" in result.output and "misclassified.png" in result.output
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(cli, ["eval", str(demo[0] / "export"), "--data", str(prepared),
                                      "--report-dir", str(blocker / "analysis")])
    assert result.exit_code == 1
    assert "cannot write the report folder" in result.output and "--report-dir" in result.output
