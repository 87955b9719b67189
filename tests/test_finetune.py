"""`sfdeploy finetune`: real MMAction2 training, its outputs, and its error paths."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sfdeploy.data.layout import PreparedData

from conftest import run_cli

NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # a run that must behave as on a CPU machine, wherever the suite runs


def test_tiny_preset_learns_the_synthetic_set(tiny_summary: dict, tiny_run: Path) -> None:
    assert tiny_summary["best_top1"] >= 0.9
    best = Path(tiny_summary["best_checkpoint"])
    assert best.is_file() and best.parent == tiny_run
    assert tiny_summary["preset"] == "slowfast_tiny"
    assert tiny_summary["classes"] == (tiny_run / "class_index.txt").read_text().split()
    assert tiny_summary["epochs_run"] == tiny_summary["epochs"] == 15
    assert tiny_summary["wall_time_s"] > 0
    assert tiny_summary["flip"] is False  # direction-sensitive data: Flip removed
    assert [h["epoch"] for h in tiny_summary["val_history"]] == list(range(1, 16))
    assert list(tiny_run.glob("*/vis_data/events.out.tfevents.*")), "TensorBoard events"


def test_checkpoints_load_with_weights_only(tiny_summary: dict, tiny_run: Path) -> None:
    """Plain torch.load(weights_only=True), no sfdeploy: nothing in them needs unpickling."""
    for path in [Path(tiny_summary["best_checkpoint"]), *tiny_run.glob("epoch_*.pth")]:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert "cls_head.fc_cls.weight" in checkpoint["state_dict"]


def test_mmaction2_init_recognizer_classifies_val_videos(tiny_summary: dict, tiny_run: Path,
                                                         prepared: Path) -> None:
    from sfdeploy.compat import ensure_mmaction

    ensure_mmaction()
    from mmaction.apis import inference_recognizer, init_recognizer

    model = init_recognizer(str(tiny_run / "config.py"), tiny_summary["best_checkpoint"], device="cpu")
    data = PreparedData.from_dir(prepared)
    rows = [line.split() for line in data.val.path.read_text().splitlines()]
    correct = sum(int(inference_recognizer(model, str(data.media_root / path)).pred_score.argmax()) == int(label)
                  for path, label in rows)
    assert correct / len(rows) >= 0.9


def test_pretrained_with_another_class_count_reinitialises_the_head(tiny_summary: dict, tmp_path: Path) -> None:
    videos, data, work = tmp_path / "v", tmp_path / "d", tmp_path / "w"
    run_cli("data", "synth", str(videos), "--classes", "3", "--per-class", "4", "--frames", "40", "--seed", "7")
    run_cli("data", "prepare", str(videos), "--out", str(data), "--preset", "slowfast_tiny")
    source = tiny_summary["best_checkpoint"]
    result = run_cli("finetune", str(data), "--work-dir", str(work), "--preset", "slowfast_tiny",
                     "--pretrained", source, "--epochs", "1")
    assert "classification head re-initialised (checkpoint has 4 classes, the data has 3)" in result.stderr
    info = json.loads((work / "finetune_summary.json").read_text())["pretrained"]
    assert info["reinitialised"] == ["cls_head.fc_cls.bias", "cls_head.fc_cls.weight"]
    assert info["loaded"] == info["total"] - 2 and info["missing"] == []
    kept = torch.load(work / "pretrained.pth", weights_only=True)["state_dict"]
    original = torch.load(source, weights_only=True)["state_dict"]
    key = "backbone.slow_path.conv1.conv.weight"
    assert torch.equal(kept[key], original[key])
    assert "cls_head.fc_cls.weight" not in kept


def test_killed_run_completes_with_resume(prepared: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    command = [sys.executable, "-m", "sfdeploy", "finetune", str(prepared), "--work-dir", str(work),
               "--preset", "slowfast_tiny", "--epochs", "4"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    # last_checkpoint is written once epoch_1.pth is complete; kill right after (in the val of
    # epoch 1, or early in epoch 2): the hardest point to resume from.
    while not (work / "last_checkpoint").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "finetune_summary.json").exists()
    refused = run_cli("finetune", str(prepared), "--work-dir", str(work), "--preset", "slowfast_tiny", check=False)
    assert refused.returncode == 1 and "--resume" in refused.stderr
    changed = run_cli("finetune", "--work-dir", str(work), "--resume", "--epochs", "9", check=False)
    assert changed.returncode == 1 and "4 epochs" in changed.stderr
    run_cli("finetune", "--work-dir", str(work), "--resume")
    summary = json.loads((work / "finetune_summary.json").read_text())
    assert summary["resumed"] is True
    assert summary["epochs_run"] == 4
    assert [h["epoch"] for h in summary["val_history"]] == [1, 2, 3, 4]


def test_two_processes_on_cpu(prepared: Path, tmp_path: Path) -> None:
    """gloo DDP on the CPU, also on a machine with GPUs (hidden from this run)."""
    work = tmp_path / "w"
    result = run_cli("finetune", str(prepared), "--work-dir", str(work), "--preset", "slowfast_tiny",
                     "--epochs", "1", "--gpus", "2", env=NO_GPU)
    assert "--nproc_per_node=2" in result.stderr
    summary = json.loads((work / "finetune_summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["epochs_run"] == 1


@pytest.mark.parametrize("args,message", [
    (["--preset", "slowfast_huge"], "unknown preset 'slowfast_huge'"),
    (["--preset", "slowfast_tiny", "--amp"], "--amp needs a CUDA GPU"),
    (["--preset", "slowfast_tiny", "--resume"], "nothing to resume"),
    (["--preset", "slowfast_tiny", "--cfg-options", "notakeyvalue"], "is not KEY=VALUE"),
])
def test_bad_options_fail_with_a_clear_message(prepared: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli("finetune", str(prepared), "--work-dir", str(tmp_path / "w"), *args, check=False, env=NO_GPU)
    assert result.returncode != 0
    assert message in result.stderr


def test_bad_data_and_work_dirs_fail_with_the_path_and_the_fix(prepared: Path, synth_root: Path,
                                                               tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = [
        ([str(prepared), "--work-dir", str(blocker / "w")], "cannot write the work dir"),
        ([str(synth_root), "--work-dir", str(tmp_path / "w")], "not a prepared data folder"),
        ([str(tmp_path / "missing"), "--work-dir", str(tmp_path / "w")], "data folder not found"),
    ]
    for args, message in cases:
        result = run_cli("finetune", *args, "--preset", "slowfast_tiny", check=False)
        assert result.returncode == 1, args
        assert message in result.stderr and "fix:" in result.stderr


def test_existing_mmaction2_annotation_lists_are_accepted(prepared: Path, tmp_path: Path) -> None:
    data = PreparedData.from_dir(prepared)
    bad = tmp_path / "bad_list.txt"
    bad.write_text("a.mp4 0\nb.mp4 9\n")
    result = run_cli("finetune", "--work-dir", str(tmp_path / "w"), "--preset", "slowfast_tiny",
                     "--train-list", str(bad), "--val-list", str(data.val.path),
                     "--class-index", str(prepared / "class_index.txt"), "--media-root", str(data.media_root),
                     check=False)
    assert result.returncode == 1 and "line 2: label 9 is outside 0..3" in result.stderr
