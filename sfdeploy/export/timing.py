"""How fast each artifact of an export runs where it was gated: the measurement ``sfdeploy repo
--runtime auto --precision auto`` chooses the served runtime from (:mod:`sfdeploy.serving.choice`).

Which runtime is fastest is a property of the device, not of the format: on 2 CPU cores frozen
TorchScript ran R50 in 420 ms where its AOTInductor package took 750, and bf16 took 212 where
fp32 took 337; on a GPU the order is another. So it is measured, on the export's own device, with
each artifact opened the way a server opens it (CUDA graphs, CPU optimisation, TF32 as served).

The machine may be shared (CI, a busy workstation): the artifacts are timed in turns, round after
round, and each keeps its fastest call. Another process slows whichever call it overlaps, so the
minimum over rounds is the figure least disturbed by it, and every artifact had the same chances.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from sfdeploy.clipspec import ClipSpec
from sfdeploy.device import Device

log = logging.getLogger("sfdeploy")

#: the batch sizes each artifact is timed at: one clip (latency) and a served batch (throughput)
TIMING_BATCHES = (1, 8)
ROUNDS = 3


def measure(artifacts: dict[str, tuple[str, Path]], run_on: dict[str, str], spec: ClipSpec, device: str, *,
            batches: tuple[int, ...] = TIMING_BATCHES, rounds: int = ROUNDS, show_progress: bool = True
            ) -> dict[str, Any]:
    """Time ``artifacts`` ({key: (format, file)}) on their devices (``run_on``: format -> device);
    returns the manifest's ``timings``: per artifact, the fastest ms per clip at each batch size."""
    import torch

    from sfdeploy.progress import bar
    from sfdeploy.runtime import open_artifact

    clips = {b: np.random.default_rng(b).integers(0, 256, size=(b, *spec.input_shape), dtype=np.uint8)
             for b in batches}
    opened = {key: open_artifact(path, fmt, device=run_on[fmt]) for key, (fmt, path) in artifacts.items()}
    best: dict[str, dict[int, float]] = {key: {} for key in opened}
    try:
        for predictor in opened.values():  # warm-up: CPU optimisation, cuDNN's choices, CUDA graph capture
            for batch in batches:
                predictor.predict(clips[batch])
        with bar(rounds * len(opened), desc="timing the artifacts", unit="artifact", enabled=show_progress) as shown:
            for _ in range(rounds):
                for key, predictor in opened.items():
                    for batch in batches:
                        started = time.perf_counter()
                        predictor.predict(clips[batch])
                        ms = (time.perf_counter() - started) * 1000 / batch
                        best[key][batch] = min(ms, best[key].get(batch, float("inf")))
                    shown.update(1)
    finally:
        for predictor in opened.values():
            predictor.close()
    return {
        "device": device, "device_kind": Device(device).compiled_kind, "threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(), "batches": list(batches), "rounds": rounds,
        "how": "each artifact opened as a server opens it, timed in turns; the fastest call per batch size, "
               "in ms per clip",
        "ms_per_clip": {key: {str(b): round(ms, 3) for b, ms in per.items()} for key, per in best.items()},
    }
