"""The export's graph rewrites (sfdeploy.export.rewrites): each one alone and all together compute
what the plain graph computes (fp32, real clips' shapes, random non-degenerate weights), keep the
batch axis dynamic through TorchScript, and change the layers they say they change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sfdeploy.bench.model import build_bench_model
from sfdeploy.bench.suites import random_clips
from sfdeploy.export.deploy import deploy_module
from sfdeploy.export.rewrites import STEPS, FrameConv2d, Rewrites


@pytest.fixture(scope="module")
def model():
    return build_bench_model("small")


def _logits(module: torch.nn.Module, frames: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return module.cls_head(module.backbone(module._normalise(frames)))


@pytest.mark.parametrize("steps", [[step] for step in STEPS] + [list(STEPS)], ids=lambda s: "+".join(s))
def test_every_rewrite_computes_what_the_plain_graph_does(model, steps: list[str]) -> None:
    frames = torch.from_numpy(random_clips(model.spec, 3, seed=1))
    plain, _ = deploy_module(model.recognizer, model.spec.mean, model.spec.std)
    rewritten, changed = deploy_module(model.recognizer, model.spec.mean, model.spec.std,
                                       rewrites=Rewrites.parse(steps))
    assert set(changed) == set(steps) and all(n > 0 for n in changed.values()), changed
    expected, got = _logits(plain, frames), _logits(rewritten, frames)
    scale = float(expected.abs().max())
    assert scale > 1.0  # non-degenerate logits: a wrong rewrite would show
    assert float((got - expected).abs().max()) <= 1e-5 * scale, steps
    with torch.inference_mode():
        assert torch.allclose(rewritten(frames), plain(frames), atol=1e-5)


def test_rewrites_leave_the_trained_recognizer_untouched(model) -> None:
    before = {k: v.clone() for k, v in model.recognizer.state_dict().items()}
    deploy_module(model.recognizer, model.spec.mean, model.spec.std, rewrites=Rewrites.for_device("cuda"))
    after = model.recognizer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_what_each_rewrite_changes(model) -> None:
    module, changed = deploy_module(model.recognizer, model.spec.mean, model.spec.std,
                                    rewrites=Rewrites.for_device("cuda"))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())
    assert changed["fold_bn"] > 0 and changed["pad_stem"] == 2
    stems = [module.backbone.slow_path.conv1.conv, module.backbone.fast_path.conv1.conv]
    for stem in stems:  # the padded input channel has zero weights
        weight = stem.weight
        assert weight.shape[1] == 4 and torch.count_nonzero(weight[:, 3]) == 0
    convs2d = [m for m in module.modules() if isinstance(m, FrameConv2d)]
    assert len(convs2d) == changed["frame_conv2d"]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs2d)
    assert module.pad_channels == 1 and module.channels_last


def test_device_choice_and_names() -> None:
    assert Rewrites.for_device("cuda:0").names == ["fold_bn", "frame_conv2d", "pad_stem", "channels_last"]
    assert Rewrites.for_device("cpu").names == []  # the CPU runtime optimises the plain graph itself
    assert Rewrites.none().names == [] and Rewrites.none().input_channels == 3
    with pytest.raises(ValueError, match="unknown rewrite"):
        Rewrites.parse(["fold_bn", "fuse_everything"])


def test_a_rewritten_trace_keeps_the_batch_axis_dynamic(model, tmp_path) -> None:
    from sfdeploy.export.torchscript import export_torchscript
    from sfdeploy.runtime.torchscript import TorchScriptPredictor

    module, _ = deploy_module(model.recognizer, model.spec.mean, model.spec.std, rewrites=Rewrites.for_device("cuda"))
    example = torch.from_numpy(random_clips(model.spec, 2))
    check = export_torchscript(module, example, tmp_path / "m.pt", model.spec.to_json()).check
    assert check["max_abs_diff"] <= check["tolerance"]
    predictor = TorchScriptPredictor(tmp_path / "m.pt")
    frames = random_clips(model.spec, 5, seed=2)
    with torch.inference_mode():
        expected = module(torch.from_numpy(frames)).numpy()
    assert np.allclose(predictor.predict(frames), expected, atol=1e-6)
