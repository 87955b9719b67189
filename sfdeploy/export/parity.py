"""The parity gate: does each artifact behave exactly like the trained MMAction2 model?

On real clips from the val set (not noise: a near-flat softmax on noise hides differences), the
reference is the eager MMAction2 recognizer fed by MMAction2's *own* test pipeline for the clip
spec (with MMAction2's own decoder for each stream, see :func:`reference_decoder`), and each
artifact is fed by sfdeploy's client preprocessing. So the gate checks the whole
deployed path (decode, sampling, resize, crop, normalisation, layout, model, view averaging)
against MMAction2, and records separately whether the two preprocessings gave identical pixels.

Tolerances: fp32 artifacts agree within 1e-4 on every probability; fp16 artifacts agree on the
top-1 class for at least 99% of the clips. On a GPU the whole gate runs without TF32 (torch's
flags for the reference and TorchScript, ``use_tf32=0`` for ONNX Runtime's sessions): TF32 rounds
fp32 convolutions to 10 mantissa bits, which could fail the 1e-4 bound, or pass it by luck. What
each artifact ran on (device, runtime, TF32) is recorded beside its numbers.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from sfdeploy.clipspec import ClipSpec
from sfdeploy.data.layout import AnnotationList, leaf_datasets, spread_by_class
from sfdeploy.errors import InputError
from sfdeploy.preprocess import load_video
from sfdeploy.progress import progress
from sfdeploy.runtime import LocalPredictor

log = logging.getLogger("sfdeploy")

FP32_MAX_ABS_DIFF = 1e-4
FP16_MIN_TOP1_AGREEMENT = 0.99


@dataclass
class ParityResult:
    artifact: str
    precision: str
    device: str  # where the artifact ran ("cpu", "cuda:0")
    runtime: str  # e.g. "torch 2.11.0", "onnxruntime-gpu 1.31.1 CUDAExecutionProvider"
    tf32: bool  # whether its fp32 convolutions could use TF32 (never, in the gate)
    videos: int
    max_abs_diff: float
    top1_agreement: float
    passed: bool
    criterion: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def val_videos(cfg: Any, limit: int, seed: int = 0) -> list[tuple[Path, int]]:
    """Up to ``limit`` val videos of the training config, spread over the classes (round robin
    over classes, so that every class is represented before any has two). A run on several
    datasets validates on a ``ConcatDataset``: its sets' lists (in the union's labels) are read."""
    entries = []
    for dataset in leaf_datasets(cfg.val_dataloader.dataset):
        ann = Path(dataset.get("ann_file") or "")
        if dataset.get("type", "VideoDataset") != "VideoDataset":
            raise InputError(f"the parity gate decodes videos; this run validates on {dataset.get('type')}",
                             path=ann, fix="pass --parity-data DATA with a video val list (`sfdeploy data prepare`)")
        if not ann.is_file():
            raise InputError("the val list of the training config is gone", path=ann,
                             fix="restore it, or pass --parity-data DATA (a folder from `sfdeploy data prepare`)")
        prefix = Path(dataset.get("data_prefix", {}).get("video") or "")
        listed = AnnotationList.read(ann, int(cfg.model.cls_head.num_classes), allow_empty=True)
        entries += [(prefix / name, label) for name, label in zip(listed.names, listed.labels, strict=True)]
    random.Random(seed).shuffle(entries)
    return [entries[i] for i in spread_by_class([label for _, label in entries], limit)]


def reference_decoder(path: Path) -> str:
    """Which MMAction2 decoder the reference pipeline uses for this video (``mmaction_pipeline``'s
    ``decode``). Never sfdeploy's adapter where MMAction2 has an independent one: ``"decord"``
    (DecordInit/DecordDecode) wherever decord reads the stream; on a stream decord mis-decodes
    (sfdeploy decodes it with PyAV), MMAction2's own ``"pyav"`` pair, which samples from the
    container's frame count, so only where that count equals the stream's (mp4/mov/avi); else
    ``"sfdeploy"``, the transforms training used (then only sampling, resize and crop are checked
    independently of the adapter; the width-sweep test covers its decoding)."""
    import av

    from sfdeploy.decode import open_video

    with open_video(path) as video:
        video.frames([0])
        if video.decoder == "decord":
            return "decord"
        frames = video.num_frames
    with av.open(str(path)) as container:
        return "pyav" if container.streams.video[0].frames == frames else "sfdeploy"


class Reference(NamedTuple):
    probs: np.ndarray  # [n, num_classes], on the host
    inputs: np.ndarray  # MMAction2's pipeline output as uint8 [n, V, T, H, W, 3]
    decoders: list[str]  # the reference decoder of each video (:func:`reference_decoder`)


def mmaction_reference(recognizer: Any, spec: ClipSpec, videos: list[Path], show_progress: bool = True
                       ) -> Reference:
    """Probabilities of the eager recognizer on MMAction2's own pipeline, that pipeline's uint8
    input, and the decoder it used per video. The recognizer may be on any device: its scores
    come back to the host here."""
    import torch
    from mmengine.dataset import Compose, pseudo_collate
    from mmengine.registry import init_default_scope

    init_default_scope("mmaction")
    pipelines: dict[str, Any] = {}
    probs, inputs, decoders = [], [], []
    for path in progress(videos, desc="parity: mmaction2", unit="video", enabled=show_progress):
        decoder = reference_decoder(path)
        decoders.append(decoder)
        if decoder == "sfdeploy":
            import sfdeploy.train.transforms  # noqa: F401 - registers the transforms it names
        pipeline = pipelines.setdefault(decoder, Compose(spec.mmaction_pipeline(decoder)))
        data = pipeline(dict(filename=str(path), label=-1, start_index=0, modality="RGB"))
        inputs.append(data["inputs"].permute(0, 2, 3, 4, 1).cpu().numpy())  # [V, 3, T, H, W] -> [V, T, H, W, 3]
        with torch.no_grad():
            score = recognizer.test_step(pseudo_collate([data]))[0].pred_score.float()
        if recognizer.cls_head.average_clips == "score":  # MMAction2 returns mean logits then
            score = torch.softmax(score, dim=0)
        probs.append(score.cpu().numpy())  # pred_score stays on the model's device
    return Reference(np.stack(probs), np.stack(inputs), decoders)


def run_gate(recognizer: Any, spec: ClipSpec, predictors: dict[str, tuple[LocalPredictor, str]],
             videos: list[Path], *, batch_size: int = 4, show_progress: bool = True) -> dict[str, Any]:
    """Compare every predictor with MMAction2 on ``videos``; returns the manifest's parity entry.
    The recognizer runs where it is; open the predictors with ``tf32=False``."""
    import torch

    from sfdeploy.runtime.cuda import exact_fp32

    with exact_fp32():
        reference, mm_inputs, decoders = mmaction_reference(recognizer, spec, videos, show_progress)
        clips = np.stack([load_video(str(p), spec) for p in videos])
        outputs = {key: np.concatenate([predictor.predict(clips[i:i + batch_size])
                                        for i in range(0, len(clips), batch_size)])
                   for key, (predictor, _) in predictors.items()}
    pixel_diff = int(np.abs(clips.astype(np.int16) - mm_inputs.astype(np.int16)).max())
    if pixel_diff:
        log.warning("client preprocessing differs from MMAction2's pipeline by up to %d grey levels", pixel_diff)
    results = {}
    for key, (predictor, precision) in predictors.items():
        probs = outputs[key]
        diff = float(np.abs(probs - reference).max())
        agreement = float((probs.argmax(1) == reference.argmax(1)).mean())
        if precision == "fp32":
            passed, criterion = diff <= FP32_MAX_ABS_DIFF, f"max_abs_diff <= {FP32_MAX_ABS_DIFF:g}"
        else:
            passed, criterion = agreement >= FP16_MIN_TOP1_AGREEMENT, \
                f"top1_agreement >= {FP16_MIN_TOP1_AGREEMENT:g}"
        results[key] = ParityResult(key, precision, predictor.device, predictor.runtime, predictor.tf32, len(videos),
                                    diff, agreement, bool(passed), criterion).to_dict()
    return {
        "reference": "MMAction2 eager recognizer on MMAction2's test pipeline for the clip spec",
        "reference_decoders": dict(Counter(decoders)),
        "settings": {"reference_device": str(next(recognizer.parameters()).device),
                     "reference_runtime": f"torch {torch.__version__}", "tf32": False,
                     "note": "fp32 convolutions and matmuls in IEEE fp32 on every GPU side (no TF32: torch's "
                             "flags, onnxruntime's use_tf32=0); the CPU has no TF32"},
        "videos": [str(p) for p in videos],
        "reference_top1": [int(i) for i in reference.argmax(1)],
        "preprocess_max_pixel_diff": pixel_diff,
        "artifacts": results,
    }
