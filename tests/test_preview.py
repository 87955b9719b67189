"""`sfdeploy data preview`: the sheet's pixels are the training pipeline's output.

The reference frames come from MMAction2's own ``Compose`` of the config's pipeline, run here on
the same video (and, for the random train pipeline, after the same seeding); they must equal the
blocks of the PNG at the places the sheet's index says.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sfdeploy.compat import ensure_mmaction, load_config
from sfdeploy.data.layout import PreparedData
from sfdeploy.train.config import FinetuneOptions, build_config
from sfdeploy.train.presets import preset_path

from conftest import run_cli


def _pipeline_frames(pipeline: list, video: Path, label: int, seed: int | None) -> np.ndarray:
    """[V, T, H, W, 3] from MMAction2's Compose, given what VideoDataset hands it."""
    ensure_mmaction()
    from mmengine.dataset import Compose

    import sfdeploy.train.transforms  # noqa: F401 - registers SfdeployVideoInit/Decode, as custom_imports does

    if seed is not None:
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    out = Compose(pipeline)(dict(filename=str(video), label=label, start_index=0, modality="RGB"))
    return out["inputs"].permute(0, 2, 3, 4, 1).numpy()


def _assert_sheet_is_the_pipeline(png: Path, index: dict, pipeline: list, seed: int | None) -> None:
    sheet = np.asarray(Image.open(png).convert("RGB"))
    for k, row in enumerate(index["rows"]):
        expected = _pipeline_frames(pipeline, Path(row["video"]), row["label"],
                                    None if seed is None else seed + k)
        assert len(row["boxes"]) == expected.shape[0]
        for view, boxes in enumerate(row["boxes"]):
            assert len(boxes) == expected.shape[1]
            for t, (y, x, h, w) in enumerate(boxes):
                np.testing.assert_array_equal(sheet[y:y + h, x:x + w], expected[view, t])


def test_sheet_pixels_are_the_pipeline_output(prepared: Path, tmp_path: Path) -> None:
    data = PreparedData.from_dir(prepared)
    cfg = build_config(load_config(preset_path("slowfast_tiny")), data,
                       FinetuneOptions(work_dir=tmp_path, preset="slowfast_tiny"))

    # val (deterministic crop), through the CLI, with the GIF
    out = tmp_path / "sheet" / "val.png"
    run_cli("data", "preview", str(prepared), "--preset", "slowfast_tiny", "--split", "val", "--n", "4",
            "--out", str(out), "--gif")
    index = json.loads(out.with_suffix(".json").read_text())
    assert len(index["rows"]) == 4 and len({r["class"] for r in index["rows"]}) == 4
    assert index["rows"][0]["slow"] == [0, 4, 8, 12] and index["rows"][0]["fast"] == list(range(16))
    _assert_sheet_is_the_pipeline(out, index, cfg.val_pipeline, seed=None)
    gif = Image.open(out.with_suffix(".gif"))
    assert gif.n_frames == 16  # one per frame of the clip

    # train (random crop), through the library: same seeding, same pixels
    from sfdeploy.train.preview import write_preview

    result = write_preview(data, tmp_path / "train.png", split="train", n=3, seed=5, preset="slowfast_tiny")
    index = json.loads(result.index.read_text())
    _assert_sheet_is_the_pipeline(result.png, index, cfg.train_pipeline, seed=5)
    assert not any(step["type"] == "Flip" for step in cfg.train_pipeline)  # as finetune trains this data


def test_preview_with_a_trained_runs_config(prepared: Path, tiny_run: Path, tmp_path: Path) -> None:
    from sfdeploy.train.preview import preview_clips

    clips = preview_clips(PreparedData.from_dir(prepared), split="val", n=2, work=tiny_run)
    assert [c.frames.shape for c in clips] == [(1, 16, 64, 64, 3)] * 2
    assert all(c.frames.dtype == np.uint8 for c in clips)


@pytest.mark.parametrize("make,message", [
    (lambda tmp, synth: tmp / "missing", "data folder not found"),
    (lambda tmp, synth: synth, "not a prepared data folder"),
])
def test_bad_data_gives_the_usual_clear_error(make, message: str, synth_root: Path, tmp_path: Path) -> None:
    result = run_cli("data", "preview", str(make(tmp_path, synth_root)), "--out", str(tmp_path / "p.png"),
                     check=False)
    assert result.returncode == 1
    assert message in result.stderr and "fix:" in result.stderr
    assert not (tmp_path / "p.png").exists()


def test_without_preset_the_preview_is_of_the_preset_data_was_prepared_for(prepared: Path, tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """DATA prepared with `--preset slowfast_tiny` (the demo's) previews slowfast_tiny's pipelines,
    not the default R50's (a 7244x2012 px sheet of 224 px crops of 64 px videos)."""
    import logging

    from sfdeploy.train.presets import DEFAULT_PRESET
    from sfdeploy.train.preview import previewed_preset

    data = PreparedData.from_dir(prepared)
    assert data.preset == "slowfast_tiny"
    out = tmp_path / "sheet.png"
    result = run_cli("data", "preview", str(prepared), "--split", "val", "--n", "2", "--out", str(out))
    assert "pipeline of preset slowfast_tiny" in result.stdout
    index = json.loads(out.with_suffix(".json").read_text())
    assert index["source"] == "preset slowfast_tiny"
    assert {(h, w) for row in index["rows"] for boxes in row["boxes"] for _, _, h, w in boxes} == {(64, 64)}
    # DATA from before the preset was recorded: the default, and the log says why
    logging.getLogger("sfdeploy").addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="sfdeploy"):
            assert previewed_preset(replace(data, preset=None)) == DEFAULT_PRESET
    finally:
        logging.getLogger("sfdeploy").removeHandler(caplog.handler)
    assert "DATA records no preset" in caplog.text
    assert previewed_preset(replace(data, preset=None), "slowfast_r50_8x8") == "slowfast_r50_8x8"
