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
from sfdeploy.train.config import FinetuneOptions, add_custom_imports, build_config, iters_per_epoch, schedule
from sfdeploy.train.presets import available_presets, preset_path
from sfdeploy.train.pretrained import prepare_pretrained


@pytest.fixture()
def data(prepared: Path) -> PreparedData:
    return PreparedData.from_dir(prepared)


def _build(data: PreparedData, tmp_path: Path, preset: str = "slowfast_tiny", **kw) -> object:
    return build_config(load_config(preset_path(preset)), data, FinetuneOptions(work_dir=tmp_path, preset=preset, **kw))


def test_presets_are_installed() -> None:
    assert available_presets() == ["slowfast_r18_4x16", "slowfast_r50_4x16", "slowfast_r50_8x8", "slowfast_tiny",
                                   "slowfast_tiny_student"]


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
    assert cfg.optim_wrapper.optimizer.lr == pytest.approx(3e-3)  # the preset's, for its batch of 8
    doubled = _build(data, tmp_path, batch_size=16)
    assert doubled.optim_wrapper.optimizer.lr == pytest.approx(6e-3)
    # Scaled once, by sfdeploy (which counts --accumulate too); mmengine's own scaling is off.
    assert doubled.auto_scale_lr == {"enable": False, "base_batch_size": 8}
    fixed = _build(data, tmp_path, lr=0.5, batch_size=16)
    assert fixed.optim_wrapper.optimizer.lr == 0.5 and not fixed.auto_scale_lr.enable


def test_options_map_to_mmengine_settings(data: PreparedData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The config for a machine without a GPU, wherever the suite runs (--gpus 2 = two gloo processes).
    monkeypatch.setattr(train_config, "use_cuda", lambda: False)
    cfg = _build(data, tmp_path, balanced=True, patience=3, gpus=2, seed=5, deterministic=True,
                 cfg_options={"model.cls_head.dropout_ratio": 0.25})
    assert cfg.train_dataloader.sampler.type == "BalancedClassSampler"
    assert cfg.custom_imports.imports == ["sfdeploy.train.transforms", "sfdeploy.train.sampler"]
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
    assert "RawFrameDecode" in types and not any(t.startswith(("Decord", "Sfdeploy")) for t in types)
    assert "custom_imports" not in cfg


@pytest.mark.parametrize("preset", ["slowfast_tiny", "slowfast_r50_4x16", "slowfast_r50_8x8"])
def test_every_video_pipeline_decodes_with_sfdeploy(data: PreparedData, tmp_path: Path, preset: str) -> None:
    """Training and MMAction2's own tools on WORK/config.py decode as the client does."""
    cfg = _build(data, tmp_path, preset=preset)
    for split in ("train", "val", "test"):
        types = [step["type"] for step in cfg[f"{split}_dataloader"].dataset.pipeline]
        assert types[0] == "SfdeployVideoInit" and types.count("SfdeployVideoDecode") == 1, types
        assert not any(t.startswith("Decord") for t in types)
        assert cfg[f"{split}_pipeline"] == cfg[f"{split}_dataloader"].dataset.pipeline
    assert cfg.custom_imports == {"imports": ["sfdeploy.train.transforms"], "allow_failed_imports": False}
    cfg.dump(str(tmp_path / "config.py"))  # WORK/config.py loads with the transforms registered
    reloaded = load_config(tmp_path / "config.py")
    from mmaction.registry import TRANSFORMS

    assert TRANSFORMS.get("SfdeployVideoDecode") is not None
    assert reloaded.test_pipeline[0]["type"] == "SfdeployVideoInit"


def test_add_custom_imports_merges_with_what_is_there() -> None:
    from mmengine.config import Config

    cfg = Config(dict(custom_imports=dict(imports="pkg.a", allow_failed_imports=True)))
    add_custom_imports(cfg, "pkg.b", "pkg.a")
    add_custom_imports(cfg, "pkg.b")
    assert cfg.custom_imports == {"imports": ["pkg.a", "pkg.b"], "allow_failed_imports": True}
    empty = Config({})
    add_custom_imports(empty, "pkg.c")
    assert empty.custom_imports == {"imports": ["pkg.c"], "allow_failed_imports": False}


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


# --- finetuning strategies: what each option writes into the config (their effects on training
# are tested in test_finetune_strategies.py) -------------------------------------------------------

def test_strategies_are_config_facts(data: PreparedData, tmp_path: Path) -> None:
    cfg = _build(data, tmp_path, pretrained="weights.pth", unfreeze_after=2, epochs=5, backbone_lr_mult=0.2,
                 accumulate=4, gpus=2, balanced=True, batch_size=8)
    assert cfg.custom_hooks[-1] == {"type": "BackboneFreezeHook", "unfreeze_after": 2}
    # One way to add imports: merged, nothing replaced, failures not allowed.
    assert cfg.custom_imports == {"imports": ["sfdeploy.train.transforms", "sfdeploy.train.sampler",
                                              "sfdeploy.train.freeze"], "allow_failed_imports": False}
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys == {"backbone": {"lr_mult": 0.2}}
    assert cfg.optim_wrapper.accumulative_counts == 4
    # The LR is scaled to the effective batch (8 x 4 accumulated x 2 processes) by sfdeploy itself.
    assert cfg.optim_wrapper.optimizer.lr == pytest.approx(3e-3 * 64 / 8)
    assert not cfg.auto_scale_lr.enable
    if not torch.cuda.is_available():
        assert cfg.model_wrapper_cfg.find_unused_parameters is True  # frozen params under DDP
    assert cfg.find_unused_parameters is True
    # The schedule counts iterations, not optimizer steps: unchanged by accumulation.
    total = 5 * iters_per_epoch(len(data.train), 8, 2)
    assert cfg.param_scheduler[1]["end"] == total


def test_class_weights_auto_and_from_a_file(data: PreparedData, tmp_path: Path) -> None:
    from sfdeploy.train.strategies import auto_class_weights, read_class_weights

    assert auto_class_weights([0] * 9 + [1] * 3, 2, ["a", "b"]) == pytest.approx([12 / 18, 2.0])
    with pytest.raises(InputError, match="class\\(es\\) c have no training videos"):
        auto_class_weights([0, 1], 3, ["a", "b", "c"])
    cfg = _build(data, tmp_path, class_weights="auto")
    assert cfg.model.cls_head.loss_cls == {"type": "CrossEntropyLoss", "class_weight": [1.0, 1.0, 1.0, 1.0]}
    named = tmp_path / "named.txt"
    named.write_text("".join(f"{name} {i + 1}\n" for i, name in reversed(list(enumerate(data.classes)))))
    assert read_class_weights(named, data.classes) == [1.0, 2.0, 3.0, 4.0]
    plain = tmp_path / "plain.txt"
    plain.write_text("0.5\n1\n2\n")
    with pytest.raises(InputError, match="3 weight\\(s\\) for 4 classes"):
        read_class_weights(plain, data.classes)
    plain.write_text("0.5\n1\n2\n-1\n")
    with pytest.raises(InputError, match="positive"):
        read_class_weights(plain, data.classes)


def test_overfit_trains_and_validates_on_the_same_videos(data: PreparedData, tmp_path: Path) -> None:
    cfg = _build(data, tmp_path, overfit=8)
    train, val = cfg.train_dataloader.dataset, cfg.val_dataloader.dataset
    assert train.indices == val.indices and len(train.indices) == 8
    assert {data.train.labels[i] for i in train.indices} == {0, 1, 2, 3}
    assert val.ann_file == train.ann_file and val.pipeline == cfg.val_pipeline and val.test_mode
    stop = [h for h in cfg.custom_hooks if h.type == "EarlyStoppingHook"]
    assert len(stop) == 1 and 0.999 < stop[0].stopping_threshold < 1.0
    assert cfg.train_cfg.max_epochs == 60  # room for the check; it stops at 100%
    assert cfg.param_scheduler[1]["end"] == 60  # 8 videos = one iteration per epoch


def test_batch_size_auto_on_cpu_is_the_presets(data: PreparedData, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("on a GPU host --batch-size auto probes the GPU (test_finetune_strategies.py)")
    from sfdeploy.train.autobatch import auto_batch_size

    cfg = _build(data, tmp_path, batch_size="auto")
    assert cfg.train_dataloader.batch_size == 8  # slowfast_tiny's
    choice = auto_batch_size(tmp_path / "config.py", 8, len(data.train), 1)
    assert (choice.batch_size, choice.how, choice.trials) == (8, "preset", [])


def test_batch_size_auto_decides_on_memory_and_steps_per_epoch() -> None:
    """The decision of --batch-size auto, with a fake GPU: a trial fits when base + per-video
    memory x batch stays under the limit. The real trials run on CUDA (gpu-marked tests)."""
    from sfdeploy.train.autobatch import MAX_BATCH, MIN_STEPS_PER_EPOCH, choose_batch, steps_limit

    def gpu(limit_gib: float, per_video_gib: float = 1.0, base_gib: float = 0.5):
        return lambda batch: {"batch": batch, "fits": base_gib + per_video_gib * batch <= limit_gib}

    # The synthetic set (52 videos) on a large GPU: not one batch of 52 (one step per epoch), but
    # the largest batch that keeps MIN_STEPS_PER_EPOCH steps; one trial.
    batch, reason, why, trials = choose_batch(gpu(1000), 52, world_size=1)
    assert (batch, reason, len(trials)) == (52 // MIN_STEPS_PER_EPOCH, "steps-limit", 1)
    assert f"keeps {MIN_STEPS_PER_EPOCH} optimizer steps per epoch" in why
    assert steps_limit(52, 1, accumulate=2) == 3 and steps_limit(52, 2) == 3  # steps are optimizer steps
    assert steps_limit(5, 1) == 1  # never 0; below 8 videos an epoch cannot have 8 steps
    # A large set on a small GPU: memory decides, and the largest fitting batch is found (halving
    # from the step limit, then bisecting), not a power of two below it.
    batch, reason, why, trials = choose_batch(gpu(30.6), 3200, world_size=1)
    assert (batch, reason) == (30, "fits-limit") and "fits in GPU memory" in why
    assert trials[0]["batch"] == MAX_BATCH and not trials[0]["fits"]
    assert all(t["fits"] == (t["batch"] <= 30) for t in trials) and len(trials) <= 10
    # Activation checkpointing keeps less per video: the same GPU then allows a larger batch.
    assert choose_batch(gpu(30.6, per_video_gib=0.5), 3200, world_size=1)[0] > batch
    assert choose_batch(gpu(0.9), 52, world_size=1)[0] is None  # not even a batch of 1


@pytest.mark.parametrize("args,message", [
    (["--freeze-backbone", "--unfreeze-after", "1"], "contradict each other"),
    (["--checkpointing", "--freeze-backbone", "--pretrained", "w.pth"], "--freeze-backbone does not run"),
    (["--checkpointing", "--unfreeze-after", "1", "--gpus", "2", "--pretrained", "w.pth"], "mark a variable ready"),
    (["--freeze-backbone", "--backbone-lr-mult", "0.1"], "does not train"),
    (["--freeze-backbone"], "no pretrained weights"),
    (["--unfreeze-after", "5", "--epochs", "5", "--pretrained", "w.pth"], "would never train the backbone"),
    (["--class-weights", "auto", "--balanced"], "over-correct"),
    (["--class-weights", "missing.txt"], "class weights file not found"),
    (["--overfit", "999"], "the train list has 52 videos"),
    (["--nnodes", "2"], "needs --master-addr"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], "--node-rank must be in 0..1"),
    (["--node-rank", "1"], "for multi-node training"),
    (["--nnodes", "2", "--master-addr", "h", "--batch-size", "auto"], "all nodes must train with the same one"),
])
def test_nonsensical_combinations_are_refused(prepared: Path, tmp_path: Path, args: list[str], message: str) -> None:
    from click.testing import CliRunner

    from sfdeploy.cli import cli

    work = tmp_path / "w"
    result = CliRunner().invoke(cli, ["finetune", str(prepared), "--work-dir", str(work), "--preset", "slowfast_tiny",
                                      *args])
    assert result.exit_code == 1, result.output
    assert message in result.output and "fix:" in result.output
    assert not (work / "config.py").exists()  # refused before anything was written


def test_resume_refuses_settings_it_would_not_apply(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sfdeploy.cli import cli

    (tmp_path / "last_checkpoint").write_text("epoch_1.pth")
    (tmp_path / "config.py").write_text("")
    result = CliRunner().invoke(cli, ["finetune", "--work-dir", str(tmp_path), "--resume", "--accumulate", "2",
                                      "--freeze-backbone"])
    assert result.exit_code == 1 and "--freeze-backbone, --accumulate would not apply" in result.output
    bad = CliRunner().invoke(cli, ["finetune", "--work-dir", str(tmp_path), "--batch-size", "lots"])
    assert bad.exit_code == 2 and "neither a number nor 'auto'" in bad.output
