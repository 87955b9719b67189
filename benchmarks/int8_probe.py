"""Does INT8 make slowfast_tiny faster on this CPU? fp32 vs int8 clips/s, same process, same input.

    .venv/bin/python benchmarks/int8_probe.py [--preset slowfast_tiny] [--batch 1,8] [--iters 20]
                                              [--out benchmarks/results/cpu-2c-int8-probe-DATE.json]

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
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path
from typing import Any

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
    import copy

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


def main() -> None:
    """Parse the options, probe, write the record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="slowfast_tiny")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = probe(args.preset, [int(b) for b in args.batch.split(",")], args.iters)
    record = {"date": date.today().isoformat(), "preset": args.preset, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
