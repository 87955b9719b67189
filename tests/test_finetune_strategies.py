"""Finetuning strategies, tested by their effect on real MMAction2 training runs (slowfast_tiny).

The pretrained weights are the suite's tiny_run best checkpoint (trained on the same synthetic
set): it stands in for Kinetics-400 weights, which cannot be downloaded here. Effects are
combined into few short runs to keep the suite's time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sfdeploy.data.layout import PreparedData

from conftest import run_cli

TINY = ("--preset", "slowfast_tiny")


def _state(path: Path | str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _backbone(state: dict) -> dict:
    return {k: v for k, v in state["state_dict"].items() if k.startswith("backbone.")}


def _identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _start(*args: str, env: dict | None = None) -> subprocess.Popen:
    """``sfdeploy ARGS`` in the background (runs that must overlap, or may, to save wall time)."""
    return subprocess.Popen([sys.executable, "-m", "sfdeploy", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{proc.args}\n{out[-2000:]}\n{err[-5000:]}"
    return out


def test_unfreeze_after_backbone_lr_mult_accumulate_and_auto_batch(prepared: Path, tiny_summary: dict,
                                                                   tmp_path: Path) -> None:
    work, mult = tmp_path / "w", 0.1
    pretrained = tiny_summary["best_checkpoint"]
    run_cli("finetune", str(prepared), "--work-dir", str(work), *TINY, "--pretrained", pretrained, "--epochs", "2",
            "--unfreeze-after", "1", "--backbone-lr-mult", str(mult), "--accumulate", "2", "--batch-size", "auto")
    summary = json.loads((work / "finetune_summary.json").read_text())
    if not torch.cuda.is_available():  # --batch-size auto on CPU: the preset's batch
        assert summary["batch_size"] == 8 and summary["batch_size_auto"]["how"] == "preset"
    assert summary["effective_batch"] == summary["batch_size"] * 2
    assert summary["lr"] == pytest.approx(3e-3 * summary["effective_batch"] / 8)  # preset: 3e-3 for 8
    assert (summary["unfreeze_after"], summary["backbone_lr_mult"], summary["accumulate"]) == (1, mult, 2)

    # Gradual unfreezing: head only in epoch 1, everything in epoch 2.
    original, epoch1, epoch2 = _state(pretrained), _state(work / "epoch_1.pth"), _state(work / "epoch_2.pth")
    assert _identical(_backbone(original), _backbone(epoch1))
    changed = [k for k, v in _backbone(epoch2).items() if not torch.equal(v, original["state_dict"][k])]
    assert len(changed) > 0.9 * len(_backbone(epoch2))
    head = "cls_head.fc_cls.weight"
    assert not torch.equal(original["state_dict"][head], epoch1["state_dict"][head])

    # The optimizer of the last checkpoint: param groups in model order (mmengine's constructor).
    from mmaction.registry import MODELS

    from sfdeploy.compat import ensure_mmaction, load_config

    ensure_mmaction()
    cfg = load_config(work / "config.py")
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys == {"backbone": {"lr_mult": mult}}
    assert cfg.optim_wrapper.accumulative_counts == 2
    names = [name for name, _ in MODELS.build(cfg.model).named_parameters()]
    optimizer = epoch2["optimizer"]
    lr = {names[g["params"][0]]: g["lr"] for g in optimizer["param_groups"]}
    head_lr = lr[head]
    assert all(v == pytest.approx(head_lr * mult) for k, v in lr.items() if k.startswith("backbone."))
    assert all(v == head_lr for k, v in lr.items() if k.startswith("cls_head."))
    # Accumulation: one optimizer step per 2 iterations; the backbone was not stepped while frozen.
    iterations = epoch2["meta"]["iter"]
    steps = {names[i]: int(s["step"]) for i, s in optimizer["state"].items()}
    assert steps[head] == iterations // 2
    assert 0 < steps["backbone.slow_path.conv1.conv.weight"] < steps[head]

    # TensorBoard (and the scalar log beside it) shows each module's learning rate.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(work.glob("*/vis_data/events.out.tfevents.*")))).Reload()
    backbone_lr = [e.value for e in events.Scalars("lr_backbone")]
    head_lrs = [e.value for e in events.Scalars("lr_cls_head")]
    assert len(backbone_lr) == len(head_lrs) >= 2
    assert all(b == pytest.approx(h * mult, rel=1e-4) for b, h in zip(backbone_lr, head_lrs, strict=True))


def _imbalanced_lists(prepared: Path, root: Path) -> tuple[list[str], PreparedData]:
    """3 classes: move_right and move_up with all their training videos, move_left (the minority)
    with 2. Val holds only move_left videos (the other ones), so val top-1 is its recall."""
    data = PreparedData.from_dir(prepared)
    classes = ["move_right", "move_up", "move_left"]
    by_class = {c: [n for n, label in zip(data.train.names, data.train.labels, strict=True)
                    if data.classes[label] == c] for c in classes}
    val_left = [n for n, label in zip(data.val.names, data.val.labels, strict=True)
                if data.classes[label] == "move_left"]
    root.mkdir()
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    train = [(n, 0) for n in by_class["move_right"]] + [(n, 1) for n in by_class["move_up"]]
    train += [(n, 2) for n in by_class["move_left"][:2]]
    (root / "train.txt").write_text("".join(f"{n} {label}\n" for n, label in train))
    (root / "val.txt").write_text("".join(f"{n} 2\n" for n in by_class["move_left"][2:] + val_left))
    args = ["--train-list", str(root / "train.txt"), "--val-list", str(root / "val.txt"),
            "--class-index", str(root / "classes.txt"), "--media-root", str(data.media_root)]
    return args, data


def test_class_weights_raise_the_minority_recall(prepared: Path, tiny_summary: dict, tmp_path: Path) -> None:
    """Head-only training (frozen pretrained backbone) on a 13:13:2 set, with and without
    --class-weights auto, same seed: the weighted loss recognises the rare class far more often."""
    lists, _ = _imbalanced_lists(prepared, tmp_path / "lists")
    common = [*TINY, *lists, "--no-flip", "--pretrained", tiny_summary["best_checkpoint"], "--freeze-backbone",
              "--epochs", "8", "--seed", "0"]
    plain = _start("finetune", "--work-dir", str(tmp_path / "plain"), *common)
    weighted = _start("finetune", "--work-dir", str(tmp_path / "weighted"), *common, "--class-weights", "auto")
    _finish(plain), _finish(weighted)
    without = json.loads((tmp_path / "plain" / "finetune_summary.json").read_text())
    with_weights = json.loads((tmp_path / "weighted" / "finetune_summary.json").read_text())

    assert with_weights["class_weights"]["weights"] == pytest.approx(
        {"move_right": 28 / (3 * 13), "move_up": 28 / (3 * 13), "move_left": 28 / (3 * 2)}, rel=1e-5)
    from sfdeploy.compat import load_config

    loss = load_config(tmp_path / "weighted" / "config.py").model.cls_head.loss_cls
    assert loss.type == "CrossEntropyLoss"
    assert loss.class_weight == list(with_weights["class_weights"]["weights"].values())
    assert without["class_weights"] is None
    # Val is the minority class only: top-1 is its recall.
    assert with_weights["last_top1"] > without["last_top1"] + 0.3, (with_weights["val_history"], without["val_history"])
    # The backbone stayed the pretrained one in both runs.
    original = _backbone(_state(tiny_summary["best_checkpoint"]))
    assert _identical(original, _backbone(_state(with_weights["best_checkpoint"])))


def test_two_nodes_train_together_and_rank_0_writes_work(prepared: Path, tiny_summary: dict,
                                                         tmp_path: Path) -> None:
    """Two "machines" (two commands, each with its own WORK) on 127.0.0.1, gloo; also the frozen
    backbone under DDP: bit-identical to the pretrained one, the head trained."""
    from sfdeploy.serving.ports import free_port

    port = free_port()
    pretrained = tiny_summary["best_checkpoint"]
    nodes = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    common = ["finetune", str(prepared), *TINY, "--epochs", "1", "--pretrained", pretrained, "--freeze-backbone",
              *nodes]
    env_one_thread = {"OMP_NUM_THREADS": "1"}  # the two "machines" share this one's cores
    procs = [_start(*common, "--work-dir", str(tmp_path / f"node{r}"), "--node-rank", str(r), env=env_one_thread)
             for r in (0, 1)]
    outputs = [_finish(p) for p in procs]
    summary = json.loads((tmp_path / "node0" / "finetune_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["nnodes"] == 2 and summary["epochs_run"] == 1
    assert json.loads(outputs[1].strip().splitlines()[-1])["node_rank"] == 1
    node1 = tmp_path / "node1"
    assert list((tmp_path / "node0").glob("epoch_1.pth")) and (tmp_path / "node0" / "last_checkpoint").is_file()
    assert not list(node1.glob("epoch_*.pth")) and not list(node1.glob("best_*.pth"))
    assert not (node1 / "last_checkpoint").exists() and not (node1 / "finetune_summary.json").exists()
    # Each node prepared the same config (up to its own WORK path).
    own = (node1 / "config.py").read_text().replace(str(node1), str(tmp_path / "node0"))
    assert own == (tmp_path / "node0" / "config.py").read_text()

    best = _state(summary["best_checkpoint"])
    original = _state(pretrained)
    assert _identical(_backbone(original), _backbone(best))
    head = "cls_head.fc_cls.weight"
    assert not torch.equal(original["state_dict"][head], best["state_dict"][head])


def test_overfit_8_videos_reaches_100_percent(prepared: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    result = run_cli("finetune", str(prepared), "--work-dir", str(work), *TINY, "--overfit", "8")
    summary = json.loads((work / "finetune_summary.json").read_text())
    assert summary["overfit"]["reached_100"] is True and summary["best_top1"] == 1.0
    assert summary["stopped_early"] is True  # mmengine's EarlyStoppingHook, at the threshold
    assert summary["val_history"][-1]["acc/top1"] == 1.0
    assert "overfit check on 8 videos: reached 100%" in result.stderr
    files = summary["overfit"]["files"]
    assert len(files) == 8 and len({f.split("/")[0] for f in files}) == 4  # spread over the classes
    from sfdeploy.compat import load_config

    cfg = load_config(work / "config.py")
    assert cfg.train_dataloader.dataset.indices == cfg.val_dataloader.dataset.indices
    assert cfg.val_dataloader.dataset.ann_file == cfg.train_dataloader.dataset.ann_file


@pytest.mark.gpu
def test_batch_size_auto_probes_the_gpu(prepared: Path, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    work = tmp_path / "w"
    run_cli("finetune", str(prepared), "--work-dir", str(work), *TINY, "--epochs", "1", "--batch-size", "auto")
    summary = json.loads((work / "finetune_summary.json").read_text())
    choice = summary["batch_size_auto"]
    assert choice["how"] == "probe" and choice["reason"] in ("steps-limit", "fits-limit") and choice["why"]
    trials = choice["trials"]
    assert summary["batch_size"] == choice["batch_size"] == max(t["batch"] for t in trials if t["fits"])
    assert all(not t["fits"] for t in trials if t["batch"] > choice["batch_size"])
    assert all(t["peak_gib"] > 0 for t in trials if t["fits"])
    assert summary["epochs_run"] == 1 and summary["best_top1"] is not None
