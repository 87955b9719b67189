"""Does INT8 make slowfast_tiny faster on this CPU? fp32 vs int8 clips/s, same process, same input.

    .venv/bin/python benchmarks/int8_probe.py [--preset slowfast_tiny] [--batch 1,8] [--iters 20]
                                              [--out benchmarks/results/cpu-2c-int8-probe-DATE.json]
    .venv/bin/python benchmarks/int8_probe.py --work WORK --data DATA [--views 1] [--batch 1,8] [--iters 10]
                                              [--out ...]

Without ``--work``: the random-weight speed probe below. With ``--work WORK --data DATA``: the accuracy
of INT8 on a *trained* model (see :func:`probe_trained`). ``--out`` keeps one record per mode in the file
(``random_weights``, ``trained_model``): a run replaces its own key and keeps the other.

Post-training static quantisation of the recognizer (backbone + head; the uint8 -> float
normalisation stays fp32), calibrated on random clips (speed does not depend on the values), by
the routes this torch offers without extra packages, each timed beside eager fp32:

* ``fx-x86``: FX graph mode (``torch.ao.quantization.quantize_fx``, the x86 qconfig: fbgemm / oneDNN
  quantized kernels), eager;
* ``pt2e-inductor``: ``quantize_pt2e`` with ``X86InductorQuantizer`` then ``torch.compile`` (the route
  PyTorch recommends for x86 INT8): needs ``torchao`` (where pt2e lives since torch 2.10); recorded as
  unavailable when it is not installed, and beside it ``compile-fp32`` (torch.compile of fp32), so
  that inductor's own gain is not counted as INT8's.

Each route's rows say clips/s (median of ``--iters`` timed calls after warm-up) and how far its
logits are from fp32's on the same clips: the largest difference over the logits' spread
(``logit_err``: random weights saturate the softmax, so probabilities would agree trivially) and
the share of clips whose top-1 class agrees.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch


class Core(torch.nn.Module):
    """Backbone + head of a recognizer: normalised float clips ``[N, 3, T, H, W]`` -> logits."""

    def __init__(self, recognizer: torch.nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = recognizer.backbone, recognizer.cls_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build(preset: str, classes: int = 4) -> Core:
    """``preset`` with randomised (non-degenerate) weights, eval mode."""
    from sfdeploy.bench.model import randomise
    from sfdeploy.compat import ensure_mmaction, load_config
    from sfdeploy.train.presets import preset_path

    ensure_mmaction()
    from mmaction.registry import MODELS

    cfg = load_config(preset_path(preset))
    cfg.model.cls_head.num_classes = classes
    torch.manual_seed(0)
    recognizer = MODELS.build(cfg.model)
    randomise(recognizer)
    return Core(recognizer.eval()).eval()


def clips_per_s(fn: Any, x: torch.Tensor, iters: int, warmup: int = 3) -> float:
    """Median clips/s of ``iters`` calls after ``warmup``."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    return x.shape[0] / statistics.median(times)


def fx_int8(model: Core, calibration: list[torch.Tensor]) -> torch.nn.Module:
    """FX graph mode post-training static quantisation (x86 qconfig)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (calibration[0],))
    with torch.inference_mode():
        for x in calibration:
            prepared(x)
    return convert_fx(prepared)


def pt2e_int8(model: Core, calibration: list[torch.Tensor]) -> torch.nn.Module:
    """pt2e + X86InductorQuantizer + torch.compile (torchao)."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    exported = torch.export.export(model, (calibration[0],)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    for x in calibration:
        prepared(x)
    converted = convert_pt2e(prepared)
    return torch.compile(converted)


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """How far ``logits`` are from fp32's: the largest difference over their spread, top-1 agreement."""
    err = float((logits - reference).abs().max() / reference.std())
    agree = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
    return {"logit_err": round(err, 4), "top1_agree": round(agree, 3)}


def probe(preset: str, batches: list[int], iters: int) -> list[dict[str, Any]]:
    """One row per (route, batch): clips/s, x fp32, largest softmax difference from fp32."""
    model = build(preset)
    rows = []
    for batch in batches:
        generator = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 3, 16, 64, 64, generator=generator) if preset == "slowfast_tiny" else \
            torch.randn(batch, 3, 32, 224, 224, generator=generator)
        calibration = [torch.randn(x.shape, generator=generator) for _ in range(4)]
        with torch.inference_mode():
            reference = model(x)
        base = clips_per_s(model, x, iters)
        rows.append({"route": "eager-fp32", "batch": batch, "clips_per_s": round(base, 2), "x_fp32": 1.0,
                     "logit_err": 0.0, "top1_agree": 1.0})
        routes = {"fx-x86-int8": fx_int8, "compile-fp32": lambda m, _: torch.compile(m),
                  "pt2e-inductor-int8": pt2e_int8}
        for name, make in routes.items():
            try:
                module = make(model, calibration)
                rate = clips_per_s(module, x, iters)
                with torch.inference_mode():
                    logits = module(x)
                rows.append({"route": name, "batch": batch, "clips_per_s": round(rate, 2),
                             "x_fp32": round(rate / base, 2), **agreement(logits, reference)})
            except Exception as exc:  # noqa: BLE001 - a route this torch cannot run is a row saying why
                rows.append({"route": name, "batch": batch, "status": "unavailable",
                             "why": f"{type(exc).__name__}: {str(exc)[:200]}"})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# --- INT8 on a trained model, calibrated and evaluated on real clips -------------------------------------------


def decode_split(paths: list[Path], spec: Any, workers: int) -> tuple[np.ndarray, list[int], list[dict[str, str]]]:
    """Decode ``paths`` through the client path: the clips ``uint8 [n, V, T, H, W, 3]`` in path order, the
    indices they come from, and the videos that failed."""
    from sfdeploy.decode.clips import DecodeFailure
    from sfdeploy.decode.pool import decode_many

    clips: dict[int, np.ndarray] = {}
    failed = []
    for index, clip, _ in decode_many(paths, spec, workers=workers):
        if isinstance(clip, DecodeFailure):
            failed.append({"path": clip.path, "error": clip.error})
        else:
            clips[index] = clip
    kept = sorted(clips)
    return np.stack([clips[i] for i in kept]), kept, failed


def deploy_pair(recognizer: torch.nn.Module, spec: Any, calibration: np.ndarray,
                batch: int = 8) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The deployed fp32 module (:func:`sfdeploy.export.deploy.deploy_module`, uint8 frames -> view-averaged
    probabilities) and its INT8 twin: the same normalisation and averaging in fp32 around the backbone + head
    quantised by :func:`fx_int8`, calibrated on ``calibration`` clips normalised as the deployed module does."""
    from sfdeploy.export.deploy import deploy_module

    fp32, _ = deploy_module(recognizer, spec.mean, spec.std)
    with torch.inference_mode():
        inputs = [fp32._normalise(torch.from_numpy(calibration[i:i + batch]))
                  for i in range(0, len(calibration), batch)]
    int8 = copy.deepcopy(fp32)
    int8.backbone = fx_int8(Core(fp32), inputs)  # Core reads .backbone / .cls_head: the fp32 copy's
    int8.cls_head = torch.nn.Identity()  # the quantised Core is backbone and head
    return fp32.eval(), int8.eval()


def predict(module: Any, clips: np.ndarray, batch: int = 8) -> torch.Tensor:
    """``module``'s probabilities for ``clips``, ``batch`` clips a call."""
    with torch.inference_mode():
        return torch.cat([module(torch.from_numpy(clips[i:i + batch])) for i in range(0, len(clips), batch)])


def compare(probs: dict[str, torch.Tensor], labels: np.ndarray) -> dict[str, Any]:
    """Top-1 of each model against ``labels``, and of each against fp32: top-1 agreement, max/mean |prob diff|."""
    truth = torch.from_numpy(labels)
    ref = probs["fp32"]
    out: dict[str, Any] = {"videos": len(labels)}
    for name, p in probs.items():
        row = {"top1": round(float((p.argmax(1) == truth).float().mean()), 4)}
        if name != "fp32":
            diff = (p - ref).abs()
            row.update(top1_agree_fp32=round(float((p.argmax(1) == ref.argmax(1)).float().mean()), 4),
                       max_abs_prob_diff=round(float(diff.max()), 5), mean_abs_prob_diff=round(float(diff.mean()), 5))
        out[name] = row
    return out


def repeatability(module: Any, clips: np.ndarray) -> dict[str, float]:
    """Largest probability difference between two calls on the same batch, and between the batch and its clips
    one at a time (0 for a deterministic, batch-independent model)."""
    x = torch.from_numpy(clips)
    with torch.inference_mode():
        first, second = module(x), module(x)
        single = torch.cat([module(x[i:i + 1]) for i in range(len(x))])
    return {"same_batch_twice_max_diff": round(float((first - second).abs().max()), 5),
            "batch_vs_single_max_diff": round(float((first - single).abs().max()), 5)}


def traced(module: torch.nn.Module, example: torch.Tensor, folder: Path, name: str) -> tuple[Any, dict[str, Any]]:
    """``module`` traced to TorchScript, saved and loaded back (what an export would ship): the loaded module,
    and whether it worked, its file size and its largest difference from the eager module on ``example``."""
    path = folder / f"{name}.pt"
    try:
        with torch.no_grad():
            script = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(script, str(path))
        loaded = torch.jit.load(str(path)).eval()
        with torch.inference_mode():
            err = float((loaded(example) - module(example)).abs().max())
    except Exception as exc:  # noqa: BLE001 - a module that does not trace is a row saying why
        return None, {"trace": "failed", "why": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return loaded, {"trace": "ok", "file_bytes": path.stat().st_size, "max_abs_diff_vs_eager": err}


def interleaved_rates(modules: dict[str, Any], x: torch.Tensor, iters: int, warmup: int = 3) -> dict[str, float]:
    """Median clips/s of each module over ``iters`` rounds, each round calling every module once in turn, so that
    a load that comes and goes (another job on the cores) falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in modules}
    with torch.inference_mode():
        for module in modules.values():
            for _ in range(warmup):
                module(x)
        for _ in range(iters):
            for name, module in modules.items():
                start = time.perf_counter()
                module(x)
                times[name].append(time.perf_counter() - start)
    return {name: x.shape[0] / statistics.median(t) for name, t in times.items()}


def speed(modules: dict[str, Any], clips: np.ndarray, batches: list[int], iters: int) -> list[dict[str, Any]]:
    """Clips/s (videos/s, all their views) of each module at each batch, on real clips, timed interleaved; x the
    first module's (eager fp32)."""
    rows = []
    for batch in batches:
        x = torch.from_numpy(np.concatenate([clips] * -(-batch // len(clips)))[:batch])
        rates = interleaved_rates(modules, x, iters)
        base = next(iter(rates.values()))
        for name, rate in rates.items():
            rows.append({"model": name, "batch": batch, "clips_per_s": round(rate, 2), "x_fp32": round(rate / base, 2)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def quantized_cat_check() -> dict[str, Any]:
    """What ``torch.cat`` does with quantized inputs of different qparams (SlowFast's slow path joined with a
    fast-to-slow lateral, where FX convert leaves a plain ``torch.cat``): the output takes the first input's
    scale / zero point, so a second input with another range is clipped. Returns both inputs' errors."""
    torch.backends.quantized.engine = "x86"
    generator = torch.Generator().manual_seed(0)
    relu_like = torch.rand(1, 4, 8, generator=generator)  # [0, 1], as the slow path after ReLU
    lateral = torch.rand(1, 4, 8, generator=generator) * 10 - 5  # signed, wider: a lateral conv's output
    first = torch.quantize_per_tensor(relu_like, 1 / 255, 0, torch.quint8)
    second = torch.quantize_per_tensor(lateral, 10 / 255, 128, torch.quint8)
    joined = torch.cat((first, second), dim=1).dequantize()
    return {"out_scale_is_first_inputs": torch.cat((first, second), dim=1).q_scale() == first.q_scale(),
            "first_input_max_err": round(float((joined[:, :4] - relu_like).abs().max()), 4),
            "second_input_max_err": round(float((joined[:, 4:] - lateral).abs().max()), 4)}


def probe_trained(work: Path, data: Path, views: int, batches: list[int], iters: int,
                  workers: int) -> dict[str, Any]:
    """INT8 (FX, x86) of the model trained in ``work``, calibrated on ``data``'s train split and evaluated on
    its val split, both decoded by the client path: accuracy of fp32 and int8, their agreement, clips/s of
    each eager and traced to TorchScript (saved and loaded back) and the traced files' sizes."""
    from sfdeploy.clipspec import ClipSpec
    from sfdeploy.data.layout import PreparedData
    from sfdeploy.evaluate import val_split
    from sfdeploy.train.trained import load_trained

    started = time.perf_counter()
    trained = load_trained(work)
    spec = ClipSpec.from_config(trained.cfg, trained.class_names, views=views)
    prepared = PreparedData.from_dir(data)
    train_clips, _, train_failed = decode_split([prepared.media_root / n for n in prepared.train.names], spec,
                                                workers)
    val_paths, labels = val_split(data, spec.class_names)
    val_clips, kept, val_failed = decode_split(val_paths, spec, workers)
    fp32, int8 = deploy_pair(trained.recognizer, spec, train_clips)
    probs = {"fp32": predict(fp32, val_clips), "int8": predict(int8, val_clips)}
    with tempfile.TemporaryDirectory() as folder:
        example = torch.from_numpy(val_clips[:2])
        fp32_ts, fp32_trace = traced(fp32, example, Path(folder), "fp32")
        int8_ts, int8_trace = traced(int8, example, Path(folder), "int8")
        modules = {"fp32-eager": fp32, "int8-eager": int8, "fp32-torchscript": fp32_ts, "int8-torchscript": int8_ts}
        modules = {k: v for k, v in modules.items() if v is not None}
        if int8_ts is not None:
            probs["int8-torchscript"] = predict(int8_ts, val_clips)
        rows = speed(modules, val_clips, batches, iters)
        repeats = {name: repeatability(module, val_clips[:8]) for name, module in modules.items()}
    return {"work": str(work), "data": str(data), "checkpoint": str(trained.checkpoint), "preset": trained.preset,
            "classes": list(spec.class_names), "views": spec.views, "clip_shape": list(spec.input_shape),
            "calibration": {"split": "train", "clips": len(train_clips), "failed": train_failed,
                            "method": "fx prepare_fx/convert_fx, x86 qconfig (fbgemm/oneDNN), batches of 8 clips"},
            "val": {"failed": val_failed, **compare(probs, labels[kept])},
            "torchscript": {"fp32": fp32_trace, "int8": int8_trace}, "speed": rows,
            "repeatability": repeats, "quantized_cat_check": quantized_cat_check(),
            "seconds": round(time.perf_counter() - started, 1)}


def write_record(out: Path, key: str, record: dict[str, Any]) -> None:
    """Write ``record`` under ``key`` of ``out``, keeping the file's other mode (an old flat random-weight
    record is moved under ``random_weights``)."""
    kept = json.loads(out.read_text()) if out.is_file() else {}
    if "rows" in kept:  # the first version of this file: one random-weight record
        kept = {"random_weights": kept}
    kept[key] = record
    out.write_text(json.dumps(kept, indent=2) + "\n")


def main() -> None:
    """Parse the options, probe, write the record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="slowfast_tiny")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--work", type=Path, help="a finetune work dir: probe its trained model (needs --data)")
    parser.add_argument("--data", type=Path, help="its prepared DATA: calibrate on train, evaluate on val")
    parser.add_argument("--views", type=int, default=1, help="views per video (export's default: 1)")
    parser.add_argument("--workers", type=int, default=2, help="decode workers")
    args = parser.parse_args()
    if (args.work is None) != (args.data is None):
        parser.error("--work and --data go together")
    batches = [int(b) for b in args.batch.split(",")]
    load_before = os.getloadavg()
    record: dict[str, Any] = {"date": date.today().isoformat(), "command": " ".join(sys.argv),
                              "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "cpu": platform.processor() or platform.machine()}
    if args.work:
        record.update(probe_trained(args.work, args.data, args.views, batches, args.iters, args.workers))
    else:
        record.update(preset=args.preset, rows=probe(args.preset, batches, args.iters))
    load_after = os.getloadavg()
    record["loadavg_1_5_15"] = {"before": [round(x, 2) for x in load_before],
                                "after": [round(x, 2) for x in load_after], "cpus": os.cpu_count()}
    if max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1):
        record["load_caveat"] = ("other work shared the cores during the run (1-min load above half the CPUs): "
                                 "clips/s are noisy, compare them only within one run (rows are timed interleaved)")
    if args.out:
        write_record(args.out, "trained_model" if args.work else "random_weights", record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
