"""The GPU-decoding fidelity run (``benchmarks/gpu_fidelity.py``): make the sweep
(:mod:`sfdeploy.bench.sweep`), run each video through the reference decoder (the CPU path) and the
candidate and both clips through the same model (:func:`measure_fidelity`), write the record and,
for a GPU decoder, the gate ``sfdeploy infer`` reads (:mod:`sfdeploy.decode.gpu.gate`).

The harness itself is checked on the CPU with decord (MMAction2's decoder, decoding the pixels
itself here) against the CPU path's PyAV (byte-identical frames: agreement 100%, difference 0).

::

    python benchmarks/gpu_fidelity.py --export EXPORT --candidate pynvvideocodec   # on a GPU host
    python benchmarks/gpu_fidelity.py --export EXPORT --candidate decord --device cpu  # the harness's own check
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sfdeploy.clipspec import ClipSpec
from sfdeploy.decode.clips import load_video
from sfdeploy.decode.gpu.gate import AGREEMENT, SCHEMA, summarize
from sfdeploy.decode.gpu.select import StreamInfo, nvdec_refusal
from sfdeploy.decode.video import MAX_VIDEO_PIXELS, DecodeError, open_video, short_error
from sfdeploy.device import Device
from sfdeploy.fsutil import atomic_write_text
from sfdeploy.preprocess import sample_indices

log = logging.getLogger("sfdeploy")

#: what ``--candidate`` may name: a GPU decoder, or decord (the CPU stand-in that checks the harness)
CPU_STAND_IN = "decord"


@dataclass
class FidelityOptions:
    """What the fidelity sweep compares: a candidate decoder against the CPU path, through the
    export's model on ``device`` (the options of ``benchmarks/gpu_fidelity.py``)."""

    export: Path
    candidate: str = "pynvvideocodec"
    device: Device = Device("cuda")
    runtime: str = "torchscript"
    precision: str = "fp32"
    per_size: int = 4
    frames: int = 48
    codecs: tuple[str, ...] | None = None
    sweep_dir: Path | None = None  # [default: <out>.sweep/]
    out: Path | None = None  # [default: benchmarks/results/decode-fidelity-<candidate>-<device>-<date>.json]
    gate: bool = True  # a GPU candidate's record becomes the export's gate

    def __post_init__(self) -> None:
        self.device = Device(self.device)  # a str given in Python is parsed here, once


@dataclass(frozen=True)
class ClipDecoder:
    """A decoder the harness compares: ``load(path)`` gives the views (numpy, or a torch tensor on
    the GPU); ``refusal(info)`` says why it does not take a stream (None: it does)."""

    name: str
    load: Callable[[str], Any]
    refusal: Callable[[StreamInfo], str | None] = lambda info: None
    backend: str | None = None  # the GPU decoder, for a GPU candidate


def cpu_decoder(spec: ClipSpec, max_pixels: int = MAX_VIDEO_PIXELS) -> ClipDecoder:
    """The CPU path (:func:`~sfdeploy.decode.clips.load_video`: PyAV, as decord indexes and decodes)."""
    return ClipDecoder("cpu", lambda path: load_video(path, spec, max_pixels=max_pixels))


def decord_decoder(spec: ClipSpec, max_pixels: int = MAX_VIDEO_PIXELS) -> ClipDecoder:
    """decord decoding the pixels (MMAction2's decoder), then the CPU path's resize and crop: the
    CPU stand-in that checks the harness. decord has no pixel limit past the header's: for the
    harness's own sweep videos only, never for uploads."""

    def load(path: str) -> np.ndarray:
        import decord

        from sfdeploy.preprocess import clip_views

        with open_video(path, max_pixels=max_pixels) as video:
            indices = sample_indices(video.num_frames, spec).reshape(-1)
        try:
            frames = decord.VideoReader(str(path), num_threads=1).get_batch(indices).asnumpy()
        except decord.DECORDError as exc:  # its width bug (16, 24, 48, 72 px), or a damaged stream
            raise DecodeError(f"decord fails on it ({short_error(exc)})", reason="corrupt", path=str(path)) from exc
        return clip_views(frames, spec)

    return ClipDecoder(f"cpu:{CPU_STAND_IN}", load)


def gpu_decoder(spec: ClipSpec, backend: str, device: str, max_pixels: int = MAX_VIDEO_PIXELS) -> ClipDecoder:
    """NVDEC through ``backend``, with the resize and crop on the GPU: what the decode pool runs for
    the streams a plan routes to the GPU."""
    from sfdeploy.decode.gpu.backends import GpuClipMaker

    maker = GpuClipMaker(backend, device, spec, max_pixels=max_pixels)

    def load(path: str) -> Any:
        with open_video(path, max_pixels=max_pixels) as video:
            info = StreamInfo.of(video)
            indices = sample_indices(video.num_frames, spec).reshape(-1)
        return maker.clip(path, info, indices.tolist())

    return ClipDecoder(f"nvdec:{backend}", load, lambda info: nvdec_refusal(info, backend, max_pixels), backend)


def _host(clip: Any) -> np.ndarray:
    from sfdeploy.runtime import host_array

    return host_array(clip)


def measure_fidelity(paths: Sequence[Path], reference: ClipDecoder, candidate: ClipDecoder,
                     predict: Callable[[Any], np.ndarray], *, threshold: float = AGREEMENT) -> dict[str, Any]:
    """Each video through both decoders and ``predict`` (a batch -> probabilities); per video the
    two top-1 classes, the largest probability and pixel differences; per codec the agreement, the
    worst probability difference and the verdict (see the module docstring)."""
    from sfdeploy.batching import stack_clips
    from sfdeploy.decode.gpu.backends import GpuDecodeFailed

    entries: list[dict[str, Any]] = []
    for path in paths:
        entry: dict[str, Any] = {"video": Path(path).name}
        try:
            with open_video(str(path)) as video:
                info = StreamInfo.of(video)
        except DecodeError as exc:
            entries.append({**entry, "status": "unreadable", "reason": exc.message})
            continue
        entry.update(codec=info.codec, size=f"{info.width}x{info.height}", pix_fmt=info.pix_fmt, frames=info.frames)
        refusal = candidate.refusal(info)
        if refusal:
            entries.append({**entry, "status": "refused", "reason": refusal})
            continue
        try:
            ref, cand = reference.load(str(path)), candidate.load(str(path))
        except (DecodeError, GpuDecodeFailed) as exc:
            entries.append({**entry, "status": "failed", "reason": str(exc).splitlines()[0][:300]})
            continue
        p_ref, p_cand = predict(stack_clips([ref]))[0], predict(stack_clips([cand]))[0]
        pixels = np.abs(_host(ref).astype(np.int16) - _host(cand).astype(np.int16))
        entries.append({**entry, "status": "compared", "top1_reference": int(np.argmax(p_ref)),
                        "top1_candidate": int(np.argmax(p_cand)), "agree": bool(np.argmax(p_ref) == np.argmax(p_cand)),
                        "max_prob_diff": float(np.abs(p_ref - p_cand).max()),
                        "max_pixel_diff": int(pixels.max()), "mean_pixel_diff": round(float(pixels.mean()), 4)})
    return {"schema": SCHEMA, "kind": "sfdeploy-decode-fidelity", "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "reference": reference.name, "candidate": candidate.name, "backend": candidate.backend,
            "threshold": threshold, "codecs": summarize(entries, threshold), "videos": entries}


def run_fidelity(opts: FidelityOptions) -> tuple[dict[str, Any], Path]:
    """Measure, write the record (and the gate); returns (record, its path)."""
    from sfdeploy.artifacts import Manifest
    from sfdeploy.bench.measure import device_info, device_slug
    from sfdeploy.bench.sweep import ENCODERS, default_sweep, make_sweep
    from sfdeploy.decode.gpu.gate import write_gate
    from sfdeploy.decode.gpu.select import plan_decoding, probe_backend
    from sfdeploy.runtime import open_local
    from sfdeploy.runtime.placement import backend_device

    export = Path(opts.export)
    spec = Manifest.read(export).clip_spec
    device = backend_device(opts.runtime, opts.device)
    if opts.candidate != CPU_STAND_IN:  # the GPU decoder must be here: the error says what to install
        plan_decoding(opts.candidate, device=device, statuses=[probe_backend(opts.candidate)])
    out = Path(opts.out) if opts.out else (Path("benchmarks/results") / f"decode-fidelity-{opts.candidate}-"
                                            f"{device_slug(device_info(device))}.json")
    sweep_dir = Path(opts.sweep_dir) if opts.sweep_dir else out.with_suffix(".sweep")
    videos = default_sweep(opts.per_size, opts.codecs or tuple(ENCODERS))
    log.info("fidelity: encoding %d sweep videos into %s", len(videos), sweep_dir)
    paths, skipped = make_sweep(sweep_dir, videos, opts.frames)
    predictor = open_local(opts.runtime, export, precision=opts.precision, device=device)
    try:
        reference = cpu_decoder(spec)
        candidate = (decord_decoder(spec) if opts.candidate == CPU_STAND_IN
                     else gpu_decoder(spec, opts.candidate, predictor.device))
        log.info("fidelity: %s against %s on %d videos through %s", candidate.name, reference.name, len(paths),
                 predictor.name)
        record = measure_fidelity(paths, reference, candidate, predictor.predict)
    finally:
        predictor.close()
    record.update(export=str(export), model=predictor.name, runtime=opts.runtime, precision=opts.precision,
                  device_info=device_info(predictor.device),
                  sweep={"folder": str(sweep_dir), "videos": len(paths), "frames": opts.frames,
                         "per_size": opts.per_size, "not_encoded": skipped})
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    if opts.gate and record["backend"]:
        record["gate"] = str(write_gate(export, record))
    return record, out


def summary_lines(record: dict[str, Any]) -> list[str]:
    """The per-codec table of a record, as text."""
    lines = [f"{record['candidate']} vs {record['reference']}: top-1 agreement needs {record['threshold']:.1%}",
             "codec  compared  agreement  worst prob diff  max pixel diff  refused  failed  passed"]
    for codec, s in sorted(record["codecs"].items()):
        agreement = f"{s['agreement']:.2%}" if s["agreement"] is not None else "-"
        lines.append(f"{codec:6} {s['compared']:8d}  {agreement:>9}  {s['worst_prob_diff']:15.5f}  "
                     f"{s['max_pixel_diff']:14d}  {s['refused']:7d}  {s['failed']:6d}  {s['passed']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """``benchmarks/gpu_fidelity.py``: parse its arguments, run the sweep, print the summary; 1 on an error."""
    from sfdeploy.bench.sweep import ENCODERS
    from sfdeploy.decode.gpu.select import GPU_BACKENDS

    parser = argparse.ArgumentParser(prog="gpu_fidelity.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True, type=Path, help="an `sfdeploy export` folder")
    parser.add_argument("--candidate", default=GPU_BACKENDS[0], choices=(*GPU_BACKENDS, CPU_STAND_IN),
                        help=f"the decoder compared with the CPU path [{GPU_BACKENDS[0]}]; decord: the harness's "
                             "CPU check")
    parser.add_argument("--device", default="cuda", help="where the model runs [cuda]")
    parser.add_argument("--runtime", default="torchscript", choices=("torchscript", "onnxruntime"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    parser.add_argument("--per-size", type=int, default=4, help="videos per codec and size [4]")
    parser.add_argument("--frames", type=int, default=48, help="frames per sweep video [48]")
    parser.add_argument("--codecs", default=",".join(ENCODERS), help=f"comma-separated [{','.join(ENCODERS)}]")
    parser.add_argument("--sweep", type=Path, help="where the sweep videos are (made if missing) [<out>.sweep]")
    parser.add_argument("--out", type=Path, help="the record [benchmarks/results/decode-fidelity-...json]")
    parser.add_argument("--no-gate", action="store_true", help="do not write the record into EXPORT as its gate")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="sfdeploy: %(message)s")
    from sfdeploy.errors import SfdeployError

    try:
        record, out = run_fidelity(FidelityOptions(
            export=args.export, candidate=args.candidate, device=args.device, runtime=args.runtime,
            precision=args.precision, per_size=args.per_size, frames=args.frames,
            codecs=tuple(c for c in args.codecs.split(",") if c), sweep_dir=args.sweep, out=args.out,
            gate=not args.no_gate))
    except SfdeployError as exc:
        print(f"gpu_fidelity.py: {exc}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(record)))
    print(json.dumps({"record": str(out), "gate": record.get("gate"),
                      "passed": sorted(c for c, s in record["codecs"].items() if s["passed"])}))
    return 0
