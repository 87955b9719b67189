"""Training speed as the finetuning guide measures it: per-epoch videos/s, data-wait share and peak
memory in the log and `finetune_summary.json` (surviving --resume), and `bench --stage train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sfdeploy.train.speed import HUB_KEY, SpeedHook, overall

from conftest import run_cli

EPOCH_FIELDS = {"epoch", "iters", "videos", "train_s", "step_s", "data_wait_s", "videos_per_s", "data_wait_share",
                "device", "world_size"}


@pytest.fixture(scope="module")
def short_run(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """finetune slowfast_tiny for 2 epochs on the demo's DATA (~15 s)."""
    work = tmp_path_factory.mktemp("speed") / "work"
    run_cli("finetune", str(prepared), "--work-dir", str(work), "--preset", "slowfast_tiny", "--epochs", "2",
            "--pretrained", "none")
    return work


def test_summary_and_log_have_each_epochs_speed(short_run: Path) -> None:
    summary = json.loads((short_run / "finetune_summary.json").read_text())
    speed = summary["speed"]
    assert [e["epoch"] for e in speed["epochs"]] == [1, 2]
    for epoch in speed["epochs"]:
        assert EPOCH_FIELDS <= set(epoch) and epoch["device"] == "cpu"
        assert epoch["videos"] == summary["train_videos"] and epoch["iters"] == 7  # 52 videos at batch 8
        assert epoch["videos_per_s"] > 0 and 0 <= epoch["data_wait_share"] <= 1
        assert epoch["peak_rss_mb"] > 0 and "peak_gpu_mem_mb" not in epoch  # CPU: the process's peak RSS
        assert epoch["step_s"] <= epoch["train_s"] + 0.01
    assert speed["videos"] == 104 and speed["videos_per_s"] == pytest.approx(104 / speed["train_s"], rel=1e-3)
    assert 0 <= speed["data_wait_share"] <= 1 and speed["peak_rss_mb"] == max(e["peak_rss_mb"] for e in speed["epochs"])
    log = next(short_run.glob("*/*.log")).read_text()
    assert "epoch 1 speed: " in log and "epoch 2 speed: " in log and "videos/s, data wait" in log


def test_overall_figures_weigh_epochs_by_their_time() -> None:
    epochs = [{"epoch": 1, "videos": 10, "train_s": 1.0, "step_s": 1.0, "data_wait_s": 0.5, "peak_gpu_mem_mb": 10.0,
               "device": "cuda:0", "world_size": 2},
              {"epoch": 2, "videos": 30, "train_s": 1.0, "step_s": 1.0, "data_wait_s": 0.1, "peak_gpu_mem_mb": 30.0,
               "device": "cuda:0", "world_size": 2}]
    result = overall(epochs)
    assert result["videos_per_s"] == 20.0 and result["data_wait_share"] == 0.3 and result["peak_gpu_mem_mb"] == 30.0
    assert overall([]) == {}


def test_a_resumed_run_keeps_the_epochs_its_checkpoint_holds() -> None:
    """The figures ride in the message hub's resumed info (saved in every checkpoint): a run resumed
    after epoch 2 starts from epochs 1 and 2 (not a later epoch 3 of the killed run)."""
    from mmengine.logging import MessageHub

    saved = MessageHub("speed-saved")
    saved.update_info(HUB_KEY, [{"epoch": e, "videos": 8} for e in (1, 2, 3)], resumed=True)
    hub = MessageHub("speed-resumed")
    hub.load_state_dict(saved.state_dict())

    class Runner:
        epoch, message_hub = 2, hub

    hook = SpeedHook()
    hook.before_train(Runner())
    assert [e["epoch"] for e in hook._epochs] == [1, 2]


def test_bench_train_stage_rows_and_report(tmp_path: Path) -> None:
    """--stage train on the CPU, small profile, 1 step an epoch: measured rows (videos and raw
    frames) with their fields, the guide's reference rows, and the report's section."""
    out = tmp_path / "train.json"
    run_cli("bench", "--stage", "train", "--iters", "1", "--workers", "1", "--out", str(out), timeout=300)
    rows = {r["backend"]: r for r in json.loads(out.read_text())["rows"]}
    measured = [rows["finetune:slowfast_tiny"], rows["finetune:slowfast_tiny rawframes"]]
    for row in measured:
        assert row["status"] == "ok" and not row["reference"] and row["kind"] == "train"
        assert row["videos_per_s"] > 0 and 0 <= row["data_wait_share"] <= 1 and row["peak_mem_mb"] > 0
        assert row["device"] == "cpu" and row["batch"] == 8 and row["steps"] == 1 and row["disk_bytes"] > 0
        assert row["workers"] == 1 and "RSS" in row["peak_mem_what"]
    assert [r["media"] for r in measured] == ["videos", "rawframes"]
    references = {name: r for name, r in rows.items() if r.get("reference")}
    assert {n: (r["batch"], r["videos_per_s"]) for n, r in references.items()} == {
        "reference:rtx-3090": (8, 40.0), "reference:v100": (8, 35.0), "reference:rtx-2080ti": (4, 18.0)}
    assert not any(" workers=" in name for name in rows)  # --workers given: no loader sweep
    md = out.with_suffix(".md").read_text()
    assert "## Training speed" in md and "reference:rtx-3090 (reference)" in md and "Raw frames vs videos:" in md
