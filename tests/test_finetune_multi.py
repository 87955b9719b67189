"""Training on several datasets at once, and activation checkpointing (``--checkpointing``).

Two small synthetic sets made here (a few seconds), with overlapping and disjoint class names:
A = move_down, move_left, move_right; B = move_down, move_up, rotate_cw (B's labels 1 and 2 are
A's move_left and move_right by index: only a merge by name gets them right). B has a single
rotate_cw video, which `data prepare` puts in train: a class no val split has.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sfdeploy.compat import ensure_mmaction, load_config
from sfdeploy.data.layout import PreparedData, merge_datasets
from sfdeploy.errors import InputError
from sfdeploy.train.config import FinetuneOptions, build_config
from sfdeploy.train.presets import preset_path

from conftest import run_cli

UNION = ["move_down", "move_left", "move_right", "move_up", "rotate_cw"]
TINY = ("--preset", "slowfast_tiny")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # two runs share 2 cores; CPU as on CI


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sets")
    run_cli("data", "synth", str(root / "va"), "--classes", "3", "--per-class", "4", "--frames", "40", "--size", "64",
            "--seed", "1")
    run_cli("data", "synth", str(root / "vb"), "--classes", "5", "--per-class", "4", "--frames", "40", "--size", "64",
            "--seed", "2")
    for name in ("move_right", "move_left"):
        shutil.rmtree(root / "vb" / name)
    for i in (1, 2, 3):
        (root / "vb" / "rotate_cw" / f"rotate_cw_000{i}.mp4").unlink()
    for name in ("a", "b"):
        run_cli("data", "prepare", str(root / f"v{name}"), "--out", str(root / name.upper()), *TINY)
    return root / "A", root / "B"


def _union(two_sets: tuple[Path, Path], out: Path) -> PreparedData:
    return merge_datasets([PreparedData.from_dir(d, part=True) for d in two_sets], out)


def _folder_classes(data: PreparedData, split: str) -> list[tuple[str, str]]:
    """(class named by the label, class folder of the video) for every line of a split."""
    lst = data.split_list(split)
    return [(data.classes[label], Path(name).parent.name) for name, label in zip(lst.names, lst.labels, strict=True)]


def test_the_union_maps_classes_by_name_into_one_config(two_sets: tuple[Path, Path], tmp_path: Path) -> None:
    union = _union(two_sets, tmp_path / "annotations")
    assert union.classes == UNION
    assert (len(union.train), len(union.val)) == (9 + 7, 3 + 2)
    # Every video's label names its class folder, in both sets: B was remapped by name.
    for split in ("train", "val"):
        pairs = _folder_classes(union, split)
        assert pairs and all(label == folder for label, folder in pairs), pairs
    b_lines = (tmp_path / "annotations" / "B_train.txt").read_text().splitlines()
    assert "move_up/move_up_0001.mp4 3" in b_lines and "rotate_cw/rotate_cw_0000.mp4 4" in b_lines
    assert union.classes_without_val() == ["rotate_cw"]
    assert [d["classes"] for d in union.extra["datasets"]] == [
        {"move_down": 0, "move_left": 1, "move_right": 2}, {"move_down": 0, "move_up": 3, "rotate_cw": 4}]

    ensure_mmaction()
    cfg = build_config(load_config(preset_path("slowfast_tiny")), union,
                       FinetuneOptions(work_dir=tmp_path, preset="slowfast_tiny", batch_size=4))
    assert cfg.model.cls_head.num_classes == 5
    for split in ("train", "val", "test"):
        dataset = cfg[f"{split}_dataloader"].dataset
        assert dataset.type == "ConcatDataset" and len(dataset.datasets) == 2
        assert [d.data_prefix["video"] for d in dataset.datasets] == [str(union.parts[0].media_root),
                                                                        str(union.parts[1].media_root)]
        assert all(d.pipeline == cfg[f"{split}_pipeline"] for d in dataset.datasets)
    # MMAction2 builds the union from the dumped config, with the union's labels.
    cfg.dump(str(tmp_path / "config.py"))
    from mmaction.registry import DATASETS

    train = DATASETS.build(load_config(tmp_path / "config.py").train_dataloader.dataset)
    infos = [train.get_data_info(i) for i in range(len(train))]
    assert len(infos) == 16
    assert all(UNION[info["label"]] == Path(info["filename"]).parent.name for info in infos)
    # --overfit picks from the union: each set gets its own indices.
    overfit = build_config(load_config(preset_path("slowfast_tiny")), union,
                           FinetuneOptions(work_dir=tmp_path, preset="slowfast_tiny", overfit=5))
    picked = [d.indices for d in overfit.train_dataloader.dataset.datasets]
    assert sum(map(len, picked)) == 5 and overfit.val_dataloader.dataset.datasets[0].indices == picked[0]


def test_the_union_refuses_what_it_cannot_merge(two_sets: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = (PreparedData.from_dir(d, part=True) for d in two_sets)
    out = tmp_path / "ann"
    with pytest.raises(InputError, match="given twice"):
        merge_datasets([a, PreparedData.from_dir(two_sets[0], part=True)], out)
    # A set that spells a class of A another way would get a second index for it.
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "classes.txt").write_text("Move-Down\njump\n")
    (lists / "train.txt").write_text("x/1.mp4 0\nx/2.mp4 1\n")
    (lists / "val.txt").write_text("")  # a set may add training videos only
    spelt = PreparedData.from_annotations(lists / "train.txt", lists / "val.txt", lists / "classes.txt", None,
                                          part=True)
    with pytest.raises(InputError, match="'Move-Down' .* and class 'move_down' .* two indices \\(0 and 5\\)"):
        merge_datasets([a, b, spelt], out)
    # Sets with nothing to validate on: an empty union of val splits.
    (lists / "classes2.txt").write_text("jump\nsit\n")
    (lists / "train2.txt").write_text("y/1.mp4 0\ny/2.mp4 1\n")
    train_only = [PreparedData.from_annotations(lists / f"train{s}.txt", lists / "val.txt", lists / "classes2.txt",
                                                None, part=True) for s in ("", "2")]
    with pytest.raises(InputError, match="the union of the 2 sets has no val videos") as empty:
        merge_datasets(train_only, out)
    assert "fix:" in str(empty.value)
    # The same video in one set's train list and another's val list.
    (lists / "val3.txt").write_text(f"{a.media_root / a.train.names[0]} 0\n")
    leak = PreparedData.from_annotations(lists / "train2.txt", lists / "val3.txt", lists / "classes2.txt", None,
                                         part=True)
    with pytest.raises(InputError, match="1 video\\(s\\) are in one set's train list and in a val list"):
        merge_datasets([a, leak], out)
    assert not out.exists()  # refused before anything was written


def test_bad_sets_fail_on_the_command_line(two_sets: tuple[Path, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sfdeploy.cli import cli

    a, b = (str(d) for d in two_sets)
    work = tmp_path / "w"
    cases = [
        ([a, str(tmp_path)], "not a prepared data folder", 1),
        ([a, b, "--train-list", "t.txt"], "one --val-list per --train-list", 2),
        ([a, "--media-root", a], "--media-root goes with --train-list", 2),
    ]
    for args, message, code in cases:
        result = CliRunner().invoke(cli, ["finetune", *args, "--work-dir", str(work), *TINY])
        assert result.exit_code == code and message in result.output, (args, result.output)
    assert not work.exists()


def test_checkpointing_is_a_config_fact_and_keeps_fewer_activations(two_sets: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    """MMAction2's with_cp on both SlowFast pathways; the backward pass then holds less: the bytes
    autograd saves during a forward pass (what a GPU's peak memory is made of) drop."""
    data = PreparedData.from_dir(two_sets[0])
    ensure_mmaction()
    from mmaction.registry import MODELS

    saved = {}
    for checkpointing in (False, True):
        cfg = build_config(load_config(preset_path("slowfast_tiny")), data,
                           FinetuneOptions(work_dir=tmp_path, preset="slowfast_tiny", checkpointing=checkpointing))
        backbone = cfg.model.backbone
        assert [bool(backbone[p].get("with_cp")) for p in ("slow_pathway", "fast_pathway")] == [checkpointing] * 2
        assert ({"type": "CheckpointBatchNormHook"} in cfg.custom_hooks) is checkpointing
        model = MODELS.build(cfg.model).train()
        sizes: list[int] = []

        def pack(tensor: torch.Tensor, sizes: list[int] = sizes) -> torch.Tensor:
            sizes.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            features = model.backbone(torch.randn(2, 3, 16, 64, 64))
        sum(f.mean() for f in features).backward()  # the recomputation runs, and works
        saved[checkpointing] = sum(sizes)
    assert saved[True] < 0.6 * saved[False], saved


def _losses(work: Path) -> list[float]:
    scalars = next(work.glob("*/vis_data/scalars.json")).read_text().splitlines()
    return [row["loss"] for row in map(json.loads, scalars) if "loss" in row]


def test_finetune_on_two_sets_with_and_without_checkpointing_then_export(two_sets: tuple[Path, Path],
                                                                         tmp_path: Path) -> None:
    """One epoch on the union, twice with the same seed: with --checkpointing the losses and the
    weights are the same, and so are the BatchNorm statistics (CheckpointBatchNormHook). The
    Runner trained from WORK/config.py as it is (a ConcatDataset of WORK/annotations lists), and
    the export's parity gate takes the union's val videos."""
    common = ["finetune", *map(str, two_sets), *TINY, "--epochs", "1", "--batch-size", "4", "--seed", "3"]
    runs = {cp: tmp_path / ("cp" if cp else "plain") for cp in (False, True)}
    procs = [subprocess.Popen([sys.executable, "-m", "sfdeploy", *common, "--work-dir", str(work),
                               *(["--checkpointing"] if cp else [])], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD})
             for cp, work in runs.items()]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
    summaries = {cp: json.loads((work / "finetune_summary.json").read_text()) for cp, work in runs.items()}
    summary = summaries[True]
    assert summary["classes"] == UNION and summary["classes_without_val"] == ["rotate_cw"]
    assert [d["name"] for d in summary["datasets"]] == ["A", "B"]
    assert (summary["train_videos"], summary["val_videos"]) == (16, 5)
    assert (summaries[False]["checkpointing"], summary["checkpointing"]) == (False, True)
    assert "rotate_cw" in err  # the warning about classes without val videos

    losses = {cp: _losses(work) for cp, work in runs.items()}
    assert len(losses[True]) == 4 and losses[True] == pytest.approx(losses[False], abs=1e-6)
    states = {cp: torch.load(work / "epoch_1.pth", weights_only=True)["state_dict"] for cp, work in runs.items()}
    for key, value in states[False].items():
        if "num_batches_tracked" not in key:
            assert torch.allclose(value, states[True][key], atol=1e-5), key

    cfg = load_config(runs[True] / "config.py")
    assert cfg.val_dataloader.dataset.type == "ConcatDataset"
    assert all(Path(d.ann_file).parent == runs[True] / "annotations" for d in cfg.train_dataloader.dataset.datasets)

    export = tmp_path / "export"
    run_cli("export", str(runs[True]), "--out", str(export), "--formats", "torchscript", "--parity-videos", "5",
            "--device", "cpu", env=ONE_THREAD)
    parity = json.loads((export / "manifest.json").read_text())["parity"]
    roots = {str(PreparedData.from_dir(d).media_root) for d in two_sets}
    assert {str(Path(v).parent.parent) for v in parity["videos"]} == roots  # both sets' val videos
    assert all(result["passed"] for result in parity["artifacts"].values())


@pytest.mark.gpu
def test_checkpointing_lowers_the_peak_memory_of_a_train_step(two_sets: tuple[Path, Path], tmp_path: Path) -> None:
    """The --batch-size auto probe on the GPU, with and without --checkpointing, at the same batch:
    its record shows the peak memory of the train steps drop."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from sfdeploy.train.autobatch import MIN_STEPS_PER_EPOCH, auto_batch_size

    data = PreparedData.from_dir(two_sets[0])
    batch = 32
    peaks = {}
    for checkpointing in (False, True):
        path = tmp_path / f"config_{checkpointing}.py"
        cfg = build_config(load_config(preset_path("slowfast_tiny")), data,
                           FinetuneOptions(work_dir=tmp_path, preset="slowfast_tiny", checkpointing=checkpointing))
        cfg.dump(str(path))
        choice = auto_batch_size(path, 8, batch * MIN_STEPS_PER_EPOCH, 1)  # the step limit: a batch of 32
        assert (choice.how, choice.reason, choice.batch_size) == ("probe", "steps-limit", batch), choice
        peaks[checkpointing] = choice.trials[0]["peak_gib"]
    assert peaks[True] < 0.8 * peaks[False], peaks
