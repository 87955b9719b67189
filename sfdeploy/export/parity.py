"""The parity gate: does each artifact behave exactly like the trained MMAction2 model?

On real clips from the val set (not noise: a near-flat softmax on noise hides differences), the
reference is the eager MMAction2 recognizer fed by MMAction2's *own* test pipeline for the clip
spec (with MMAction2's own decoder for each stream, see :func:`reference_decoder`), and each
artifact is fed by sfdeploy's client preprocessing. So the gate checks the whole
deployed path (decode, sampling, resize, crop, normalisation, layout, model, view averaging)
against MMAction2, and records separately whether the two preprocessings gave identical pixels.

The truth is the reference on the CPU in fp32 (IEEE arithmetic, no device-specific kernel
choices). Tolerances: fp32 artifacts agree with it within ``max(1e-4, 2 x device noise)`` on every
probability; reduced-precision artifacts (fp16, bf16) agree on the top-1 class for at least 99% of
the clips and stay within a loose bound of it on every probability (5e-2 for fp16, 1e-1 for bf16:
:data:`sfdeploy.artifacts.REDUCED_MAX_ABS_DIFF`, recorded in each verdict's criterion).

The *device noise* is measured on the same clips, not assumed: where the gate runs on a GPU, (1)
MMAction2's own model runs there too, and (2) so does the exported graph itself, as an eager
module (the deploy module with the export's rewrites, before tracing), beside that module on the
CPU. The noise is the larger of their GPU-vs-CPU differences: the room cuDNN's legitimate choices
of fp32 algorithms, summation orders and layouts take. The same module must first be exact on the
CPU, against the truth at the plain 1e-4 (``graph_cpu_diff``; a wrong rewrite or wrapper fails
there, whatever the device), so the noise can only come from the device's kernels. An artifact may
then differ from the truth twice as much as that, never less than 1e-4: a wrong trace, a broken
CUDA graph or a runtime that computes otherwise is off by far more. Every number is recorded in
``manifest.json``. On the CPU the noise is 0 and the bound is 1e-4.

Seen on an H200 (2026-12-04, the demo's model, 12 clips): MMAction2 1.6e-7 off the CPU, the
exported graph 2.4e-7 (rewritten or plain), the TorchScript artifact 1.1e-4..2.3e-4: traced with
torch's default flags, its convolutions had TF32 baked in, which no runtime flag turns off. The
gate caught it; :mod:`sfdeploy.export.torchscript` now traces fp32 without TF32.

The whole gate runs without TF32 and without cuDNN's benchmark mode (torch's flags for the
references and TorchScript, ``use_tf32=0`` for ONNX Runtime's sessions): TF32 rounds fp32
convolutions to 10 mantissa bits, which could fail the bound, or pass it by luck, and benchmark
mode may pick a less exact algorithm on one run and not the next. What each artifact ran on
(device, runtime, TF32) is recorded beside its numbers.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from sfdeploy.artifacts import DEVICE_NOISE_FACTOR, FP16_MIN_TOP1_AGREEMENT, FP32_MAX_ABS_DIFF, REDUCED_MAX_ABS_DIFF
from sfdeploy.clipspec import ClipSpec
from sfdeploy.data.layout import AnnotationList, leaf_datasets, spread_by_class
from sfdeploy.decode.clips import load_video
from sfdeploy.errors import InputError
from sfdeploy.progress import progress
from sfdeploy.runtime import LocalPredictor

log = logging.getLogger("sfdeploy")



@dataclass
class ParityResult:
    """What the parity gate found for one artifact: where and with what it ran, how far it was from MMAction2,
    and whether that passes its criterion."""

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
        """As JSON: the manifest's ``parity.artifacts.<key>``."""
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
    (DecordInit/DecordDecode) wherever decord decodes the stream (its first frame, asked of decord
    itself: sfdeploy's decoder does not use it); on a stream decord mis-decodes,
    MMAction2's own ``"pyav"`` pair, which samples from the container's frame count, so only where
    that count equals the stream's (mp4/mov/avi); else ``"sfdeploy"``, the transforms training used
    (then only sampling, resize and crop are checked independently of the adapter; the width-sweep
    test covers its decoding). A video sfdeploy cannot decode raises its :class:`DecodeError`."""
    import decord

    from sfdeploy.decode import open_video

    with open_video(path) as video:  # the pixel limit, then sfdeploy's own first frame
        video.frames([0])
        frames = video.num_frames
    try:
        decord.VideoReader(str(path), num_threads=1).get_batch([0])
        return "decord"
    except decord.DECORDError:  # its width bug ("DECORDArrayCopyFromTo"), or any frame decord cannot give
        pass
    import av  # only for the streams decord mis-decodes

    with av.open(str(path)) as container:
        return "pyav" if container.streams.video[0].frames == frames else "sfdeploy"


class Reference(NamedTuple):
    """MMAction2's own outputs on the gate's videos (per device), and the inputs its pipeline made, which the
    artifacts are then fed."""

    probs: dict[str, np.ndarray]  # device -> [n, num_classes] on the host: "cpu" (the truth) and the gate's device
    inputs: np.ndarray  # MMAction2's pipeline output as uint8 [n, V, T, H, W, 3]
    decoders: list[str]  # the reference decoder of each video (:func:`reference_decoder`)


def mmaction_reference(recognizers: dict[str, Any], spec: ClipSpec, videos: list[Path], show_progress: bool = True
                       ) -> Reference:
    """Probabilities of the eager recognizer(s) on MMAction2's own pipeline (each video decoded
    once, run by every recognizer: ``{device: recognizer on it}``), that pipeline's uint8 input, and
    the decoder it used per video. Scores come back to the host here."""
    import torch
    from mmengine.dataset import Compose, pseudo_collate
    from mmengine.registry import init_default_scope

    init_default_scope("mmaction")
    pipelines: dict[str, Any] = {}
    probs: dict[str, list[np.ndarray]] = {device: [] for device in recognizers}
    inputs, decoders = [], []
    for path in progress(videos, desc="parity: mmaction2", unit="video", enabled=show_progress):
        decoder = reference_decoder(path)
        decoders.append(decoder)
        if decoder == "sfdeploy":
            import sfdeploy.train.transforms  # noqa: F401 - registers the transforms it names
        pipeline = pipelines.setdefault(decoder, Compose(spec.mmaction_pipeline(decoder)))
        data = pipeline(dict(filename=str(path), label=-1, start_index=0, modality="RGB"))
        inputs.append(data["inputs"].permute(0, 2, 3, 4, 1).cpu().numpy())  # [V, 3, T, H, W] -> [V, T, H, W, 3]
        for device, recognizer in recognizers.items():
            with torch.no_grad():
                score = recognizer.test_step(pseudo_collate([data]))[0].pred_score.float()
            if recognizer.cls_head.average_clips == "score":  # MMAction2 returns mean logits then
                score = torch.softmax(score, dim=0)
            probs[device].append(score.cpu().numpy())  # pred_score stays on the model's device
    return Reference({device: np.stack(p) for device, p in probs.items()}, np.stack(inputs), decoders)


def fp32_bound(device_noise: float) -> float:
    """The fp32 tolerance for a measured device noise (see the module docstring)."""
    return max(FP32_MAX_ABS_DIFF, DEVICE_NOISE_FACTOR * device_noise)


def judge(key: str, precision: str, probs: np.ndarray, truth: np.ndarray, device_noise: float, *, device: str,
          runtime: str, tf32: bool, graph_cpu_diff: float = 0.0) -> ParityResult:
    """One artifact's verdict against the CPU truth. ``device_noise``: the measured noise of the
    device the artifact ran on (0 on the CPU); ``graph_cpu_diff``: its exported graph's difference
    from the truth on the CPU, which must be within the plain bound for any noise to count."""
    diff = float(np.abs(probs - truth).max())
    agreement = float((probs.argmax(1) == truth.argmax(1)).mean())
    if precision == "fp32":
        bound = fp32_bound(device_noise)
        passed = diff <= bound and graph_cpu_diff <= FP32_MAX_ABS_DIFF
        criterion = (f"max_abs_diff <= {bound:.3g} (max({FP32_MAX_ABS_DIFF:g}, {DEVICE_NOISE_FACTOR:g} x the device's "
                     f"measured noise {device_noise:.3g})) and the exported graph within {FP32_MAX_ABS_DIFF:g} on "
                     f"the CPU ({graph_cpu_diff:.3g})")
    else:  # a reduced precision: the same decisions, numbers near the truth
        bound = REDUCED_MAX_ABS_DIFF[precision]
        passed = agreement >= FP16_MIN_TOP1_AGREEMENT and diff <= bound
        criterion = f"top1_agreement >= {FP16_MIN_TOP1_AGREEMENT:g} and max_abs_diff <= {bound:g}"
    return ParityResult(key, precision, device, runtime, tf32, len(truth), diff, agreement, bool(passed), criterion)


def graph_noise(modules: dict[str, Any], clips: np.ndarray, truth: np.ndarray, batch_size: int = 4
                ) -> tuple[float, float]:
    """(the exported graph's difference from the truth on the CPU, its GPU-vs-CPU difference) for
    ``modules`` = {device: the fp32 deploy module on it} (the CPU one required). Run inside
    :func:`sfdeploy.runtime.cuda.exact_fp32`."""
    import torch

    outputs = {}
    for device, module in modules.items():
        with torch.inference_mode():
            outputs[device] = np.concatenate([
                module(torch.from_numpy(clips[i:i + batch_size]).to(device)).float().cpu().numpy()
                for i in range(0, len(clips), batch_size)])
    cpu = outputs["cpu"]
    noise = max((float(np.abs(out - cpu).max()) for device, out in outputs.items() if device != "cpu"), default=0.0)
    return float(np.abs(cpu - truth).max()), noise


def run_gate(recognizer: Any, spec: ClipSpec, predictors: dict[str, tuple[LocalPredictor, str]],
             videos: list[Path], *, graph: dict[str, Any] | None = None, batch_size: int = 4,
             show_progress: bool = True) -> dict[str, Any]:
    """Compare every predictor with MMAction2 on ``videos``; returns the manifest's parity entry.
    The recognizer (fp32, eval mode) runs where it is and, if that is not the CPU, on the CPU too
    (the truth). ``graph``: the exported fp32 graph as eager modules, {device: module}, the CPU one
    included (see the module docstring; default: none, the noise is MMAction2's alone). Open the
    predictors with ``tf32=False``."""
    import copy

    import torch

    from sfdeploy.runtime.cuda import exact_fp32

    device = str(next(recognizer.parameters()).device)
    recognizers = {"cpu": recognizer} if device == "cpu" else {"cpu": copy.deepcopy(recognizer).cpu(),
                                                                 device: recognizer}
    with exact_fp32():
        reference = mmaction_reference(recognizers, spec, videos, show_progress)
        clips = np.stack([load_video(str(p), spec) for p in videos])
        truth = reference.probs["cpu"]
        graph_cpu_diff, graph_noise_ = graph_noise(graph, clips, truth, batch_size) if graph else (0.0, 0.0)
        outputs = {key: np.concatenate([predictor.predict(clips[i:i + batch_size])
                                        for i in range(0, len(clips), batch_size)])
                   for key, (predictor, _) in predictors.items()}
    mmaction_noise = float(np.abs(reference.probs[device] - truth).max())
    noise = max(mmaction_noise, graph_noise_)
    pixel_diff = int(np.abs(clips.astype(np.int16) - reference.inputs.astype(np.int16)).max())
    if pixel_diff:
        log.warning("client preprocessing differs from MMAction2's pipeline by up to %d grey levels", pixel_diff)
    results = {key: judge(key, precision, outputs[key], truth, noise if predictor.device != "cpu" else 0.0,
                          device=predictor.device, runtime=predictor.runtime, tf32=predictor.tf32,
                          graph_cpu_diff=graph_cpu_diff).to_dict()
               for key, (predictor, precision) in predictors.items()}
    return {
        "reference": "MMAction2 eager recognizer on MMAction2's test pipeline for the clip spec, fp32 on the CPU "
                     "(the truth); on a GPU also there, and the exported graph on both, to measure the device's "
                     "own noise",
        "reference_decoders": dict(Counter(reference.decoders)),
        "settings": {"reference_device": device, "truth_device": "cpu",
                     "reference_runtime": f"torch {torch.__version__}", "tf32": False, "cudnn_benchmark": False,
                     "mmaction2_device_noise": mmaction_noise, "graph_device_noise": graph_noise_,
                     "graph_cpu_diff": graph_cpu_diff, "device_noise": noise,
                     "device_noise_factor": DEVICE_NOISE_FACTOR, "fp32_bound": fp32_bound(noise),
                     "note": "fp32 convolutions and matmuls in IEEE fp32 on every GPU side (no TF32: torch's "
                             "flags, onnxruntime's use_tf32=0; cuDNN benchmark mode off); the CPU has no TF32. "
                             "mmaction2_device_noise: max |MMAction2 on reference_device - on the CPU|; "
                             "graph_device_noise: the same for the exported fp32 graph (eager, before tracing); "
                             "graph_cpu_diff: that graph on the CPU against the truth. An artifact on the CPU is "
                             "held to 1e-4, one on the GPU to fp32_bound"},
        "videos": [str(p) for p in videos],
        "reference_top1": [int(i) for i in truth.argmax(1)],
        "preprocess_max_pixel_diff": pixel_diff,
        "artifacts": results,
    }
