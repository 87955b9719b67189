"""Exporting the real model (SlowFast R50 4x16) on CPU, with non-degenerate weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sfdeploy.artifacts import Manifest

from conftest import run_cli


@pytest.mark.slow
def test_r50_4x16_exports_on_cpu_and_passes_parity(prepared: Path, tmp_path: Path) -> None:
    from sfdeploy.bench.model import write_random_work
    from sfdeploy.data.layout import PreparedData

    data = PreparedData.from_dir(prepared)
    work = write_random_work("slowfast_r50_4x16", prepared, tmp_path / "WORK")

    out = tmp_path / "EXPORT"
    # fp32 (random weights give no reduced-precision verdict worth its time), untimed
    run_cli("export", str(work), "--out", str(out), "--parity-videos", "4", "--device", "cpu", "--precisions", "fp32",
            "--no-measure", timeout=1500)
    manifest = Manifest.read(out)
    assert set(manifest.artifacts) == {"torchscript", "onnx", "torch_export"} and not manifest.timings
    assert manifest.clip_spec.input_shape == (1, 32, 224, 224, 3)  # the val pipeline's centre 224 crop
    assert manifest.artifacts["onnx"].size_bytes > 100e6  # one file, weights inside
    for key, result in manifest.parity["artifacts"].items():
        assert result["passed"] and result["max_abs_diff"] <= 1e-4, (key, result)
    # a peaked softmax on real clips, not a saturated one, so that agreement within 1e-4 means something
    from sfdeploy.decode.clips import load_video
    from sfdeploy.runtime.ort import OrtPredictor

    clip = load_video(manifest.parity["videos"][0], manifest.clip_spec)
    top = OrtPredictor(out / "model.onnx").predict(clip[None]).max()
    assert 1.5 / len(data.classes) < top < 0.999
    print(json.dumps(manifest.parity["artifacts"]))
