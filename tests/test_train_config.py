"""The training config sfdeploy builds from a preset and a dataset, and pretrained loading."""

from __future__ import annotations

import functools
import http.server
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

from sfdeploy.compat import ensure_mmaction, load_config
from sfdeploy.data.layout import AnnotationList, PreparedData
from sfdeploy.errors import InputError
from sfdeploy.train import config as train_config
from sfdeploy.train.config import FinetuneOptions, build_config, iters_per_epoch, schedule
from sfdeploy.train.presets import available_presets, preset_path
from sfdeploy.train.pretrained import prepare_pretrained


@pytest.fixture()
def data(prepared: Path) -> PreparedData:
    return PreparedData.from_dir(prepared)


def _build(data: PreparedData, tmp_path: Path, preset: str = "slowfast_tiny", **kw) -> object:
    return build_config(load_config(preset_path(preset)), data, FinetuneOptions(work_dir=tmp_path, preset=preset, **kw))


def test_presets_are_installed() -> None:
    assert available_presets() == ["slowfast_r50_4x16", "slowfast_r50_8x8", "slowfast_tiny"]


def test_data_dependent_settings(data: PreparedData, tmp_path: Path) -> None:
    cfg = _build(data, tmp_path, epochs=3, batch_size=4)
    assert cfg.model.cls_head.num_classes == 4
    assert cfg.train_dataloader.dataset.ann_file == str(data.train.path.resolve())
    assert cfg.test_dataloader.dataset.ann_file == str(data.val.path.resolve())
    assert cfg.train_dataloader.dataset.data_prefix == {"video": str(data.media_root)}
    assert not any(step["type"] == "Flip" for step in cfg.train_dataloader.dataset.pipeline)
    assert cfg.train_pipeline == cfg.train_dataloader.dataset.pipeline
    assert cfg.train_cfg.max_epochs == 3 and cfg.train_dataloader.batch_size == 4
    assert cfg.default_hooks.checkpoint.save_best == "acc/top1"
    assert {b["type"] for b in cfg.visualizer.vis_backends} == {"LocalVisBackend", "TensorboardVisBackend"}
    assert cfg.work_dir == str(tmp_path.resolve())
    kept = _build(data, tmp_path, flip=True)
    assert any(step["type"] == "Flip" for step in kept.train_dataloader.dataset.pipeline)


def test_schedule_is_sized_to_the_run(data: PreparedData, tmp_path: Path) -> None:
    cfg = _build(data, tmp_path, epochs=5, batch_size=8)
    total = 5 * iters_per_epoch(len(data.train), 8, 1)
    warmup, cosine = cfg.param_scheduler
    assert (warmup.type, warmup.begin, warmup.end) == ("LinearLR", 0, round(total * 0.1))
    assert (cosine.type, cosine.begin, cosine.end) == ("CosineAnnealingLR", warmup.end, total)
    assert schedule(1)[1]["end"] >= 2  # a one-iteration run still has a valid schedule
    assert iters_per_epoch(52, 8, 2) == 4  # each rank pads to ceil(52 / 2) = 26 videos


def test_learning_rate_scales_with_batch_unless_given(data: PreparedData, tmp_path: Path) -> None:
    cfg = _build(data, tmp_path)
    assert cfg.auto_scale_lr.enable and cfg.auto_scale_lr.base_batch_size == 8
    fixed = _build(data, tmp_path, lr=0.5)
    assert fixed.optim_wrapper.optimizer.lr == 0.5 and not fixed.auto_scale_lr.enable


def test_options_map_to_mmengine_settings(data: PreparedData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The config for a machine without a GPU, wherever the suite runs (--gpus 2 = two gloo processes).
    monkeypatch.setattr(train_config, "use_cuda", lambda: False)
    cfg = _build(data, tmp_path, balanced=True, patience=3, gpus=2, seed=5, deterministic=True,
                 cfg_options={"model.cls_head.dropout_ratio": 0.25})
    assert cfg.train_dataloader.sampler.type == "BalancedClassSampler"
    assert cfg.custom_imports.imports == ["sfdeploy.train.sampler"]
    assert [h.type for h in cfg.custom_hooks] == ["EarlyStoppingHook"]
    assert cfg.custom_hooks[0].patience == 3
    assert cfg.randomness == {"seed": 5, "deterministic": True}
    assert cfg.launcher == "pytorch"
    assert cfg.env_cfg.dist_cfg.backend == "gloo" and cfg.env_cfg.cudnn_benchmark is False
    assert cfg.model_wrapper_cfg.device_ids is None
    assert cfg.model.cls_head.dropout_ratio == 0.25


def test_rawframes_lists_switch_the_decode_steps(data: PreparedData, tmp_path: Path) -> None:
    lists = []
    for name in ("train", "val"):
        path = tmp_path / f"{name}.txt"
        path.write_text("clip_a 40 0\nclip_b 40 1\n")
        lists.append(path)
    frames = PreparedData.from_annotations(lists[0], lists[1], data.source / "class_index.txt", tmp_path)
    assert frames.format == "rawframes"
    cfg = _build(frames, tmp_path)
    assert cfg.train_dataloader.dataset.type == "RawframeDataset"
    types = [s["type"] for s in cfg.test_dataloader.dataset.pipeline]
    assert "RawFrameDecode" in types and not any(t.startswith("Decord") for t in types)


def test_mixed_annotation_formats_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "mixed.txt"
    path.write_text("a.mp4 0\nframes 30 1\n")
    with pytest.raises(InputError, match="all"):
        AnnotationList.read(path, 2)


def test_balanced_sampler_draws_classes_equally() -> None:
    from sfdeploy.train.sampler import BalancedClassSampler

    class Imbalanced:
        labels = [0] * 90 + [1] * 9 + [2] * 1

        def __len__(self) -> int:
            return len(self.labels)

        def get_data_info(self, i: int) -> dict:
            return {"label": self.labels[i]}

    sampler = BalancedClassSampler(Imbalanced(), seed=0)
    counts: Counter = Counter()
    for epoch in range(30):
        sampler.set_epoch(epoch)
        counts.update(Imbalanced.labels[i] for i in sampler)
    shares = [counts[c] / sum(counts.values()) for c in range(3)]
    assert all(abs(s - 1 / 3) < 0.05 for s in shares), shares


@pytest.fixture(scope="module")
def kinetics_like_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint shaped like OpenMMLab's Kinetics-400 R50 4x16 release (400-class head)."""
    ensure_mmaction()
    from mmaction.registry import MODELS

    cfg = load_config(preset_path("slowfast_r50_4x16"))
    cfg.model.cls_head.num_classes = 400
    path = tmp_path_factory.mktemp("ckpt") / "slowfast_r50_k400.pth"
    torch.save({"meta": {"epoch": 256}, "state_dict": MODELS.build(cfg.model).state_dict()}, path)
    return path


def test_r50_kinetics_weights_load_with_a_new_head(kinetics_like_checkpoint: Path, tmp_path: Path,
                                                   data: PreparedData) -> None:
    cfg = _build(data, tmp_path, preset="slowfast_r50_4x16")
    path, info = prepare_pretrained(str(kinetics_like_checkpoint), cfg.model, tmp_path)
    assert info.reinitialised == ["cls_head.fc_cls.bias", "cls_head.fc_cls.weight"]
    assert info.loaded == info.total - 2
    assert torch.load(path, weights_only=True)["meta"]["sfdeploy_pretrained"]["loaded"] == info.loaded


def test_pretrained_from_a_url(kinetics_like_checkpoint: Path, tmp_path: Path, data: PreparedData,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The real download path (torch.hub, weights_only=True) against a local HTTP server."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(kinetics_like_checkpoint.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{kinetics_like_checkpoint.name}"
        cfg = _build(data, tmp_path, preset="slowfast_r50_4x16")
        _, info = prepare_pretrained(url, cfg.model, tmp_path)
    finally:
        server.shutdown()
    assert info.source == url and info.loaded == info.total - 2
    assert list((tmp_path / "torch_home").rglob(kinetics_like_checkpoint.name)), "cached like torch.hub does"


def test_unrelated_checkpoint_is_refused(tmp_path: Path, data: PreparedData) -> None:
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(3, 3)}}, path)
    cfg = _build(data, tmp_path)
    with pytest.raises(InputError, match="shares no weights"):
        prepare_pretrained(str(path), cfg.model, tmp_path)
