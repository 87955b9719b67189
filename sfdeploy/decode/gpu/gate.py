"""The fidelity gate of GPU decoding: the record ``sfdeploy infer`` reads to decide, per codec,
whether NVDEC's clips may stand in for the CPU path's.

Why a gate. NVDEC's YUV->RGB conversion is not FFmpeg's software one (swscale, what decord and
PyAV use), and the resize runs in float on the GPU where OpenCV's runs in fixed point: the pixels
differ by a few grey levels. Whether that changes what the model says is measured, like the parity
gate measures an export (the sweep and the harness: :mod:`sfdeploy.bench.fidelity`); per codec the
record keeps the top-1 agreement and the worst probability difference. A codec passes at >=
:data:`AGREEMENT` (99.5%) of its compared videos; under 200 videos of a codec that means none may
disagree.

The record of a GPU candidate is kept in the export (``EXPORT/decode_fidelity.json``, one entry per
GPU decoder), where ``sfdeploy infer`` reads the gate (:func:`read_gates`); a codec without a
passing entry is decoded on the CPU (:mod:`sfdeploy.decode.gpu.select`). Light: json only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sfdeploy.decode.gpu.select import GPU_BACKENDS, Gate
from sfdeploy.errors import InputError
from sfdeploy.fsutil import atomic_write_text

#: top-1 agreement a codec needs, over its compared sweep videos
AGREEMENT = 0.995
#: the gate's file in an export folder
GATE_FILE = "decode_fidelity.json"
SCHEMA = 1


def summarize(entries: Sequence[dict[str, Any]], threshold: float = AGREEMENT) -> dict[str, dict[str, Any]]:
    """Per codec: videos compared, refused and failed; top-1 agreement; worst differences; passed."""
    codecs: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if "codec" not in entry:
            continue
        stats = codecs.setdefault(entry["codec"], {"compared": 0, "agreed": 0, "refused": 0, "failed": 0,
                                                   "worst_prob_diff": 0.0, "max_pixel_diff": 0})
        if entry["status"] != "compared":
            stats[entry["status"]] += 1
            continue
        stats["compared"] += 1
        stats["agreed"] += entry["agree"]
        stats["worst_prob_diff"] = max(stats["worst_prob_diff"], entry["max_prob_diff"])
        stats["max_pixel_diff"] = max(stats["max_pixel_diff"], entry["max_pixel_diff"])
    for stats in codecs.values():
        n = stats["compared"]
        stats["agreement"] = round(stats["agreed"] / n, 4) if n else None
        stats["passed"] = bool(n) and stats["agreed"] / n >= threshold and not stats["failed"]
    return codecs


def gate_note(codec: str, stats: dict[str, Any], record: dict[str, Any]) -> str:
    """One line: what the gate measured for ``codec``."""
    if not stats["compared"]:
        return f"{codec}: no video compared ({stats['refused']} refused, {stats['failed']} failed)"
    failed = f", {stats['failed']} failed on the GPU" if stats["failed"] else ""
    return (f"{codec}: {stats['agreement']:.1%} top-1 agreement on {stats['compared']} videos{failed} (needs "
            f"{record['threshold']:.1%}), worst probability difference {stats['worst_prob_diff']:.4f} "
            f"({record['candidate']} vs {record['reference']}, {record['date'][:10]})")


def write_gate(export_dir: Path, record: dict[str, Any]) -> Path:
    """Keep a GPU candidate's record in ``EXPORT/decode_fidelity.json`` (one entry per backend,
    replaced by a newer one)."""
    backend = record.get("backend")
    if backend not in GPU_BACKENDS:
        raise InputError(f"only a GPU decoder's record gates GPU decoding, not {record.get('candidate')!r}",
                         fix=f"measure one of: {', '.join(GPU_BACKENDS)}")
    path = Path(export_dir) / GATE_FILE
    data = _read(path) if path.is_file() else {"schema": SCHEMA, "backends": {}}
    data["backends"][backend] = {k: v for k, v in record.items() if k != "videos"}
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"the GPU-decoding fidelity record cannot be read ({exc})", path=path,
                         fix="remove it and measure again: python benchmarks/gpu_fidelity.py --export EXPORT") from exc
    if data.get("schema") != SCHEMA or not isinstance(data.get("backends"), dict):
        raise InputError(f"not a GPU-decoding fidelity record of schema {SCHEMA}", path=path,
                         fix="remove it and measure again: python benchmarks/gpu_fidelity.py --export EXPORT")
    return data


def read_gates(export_dir: Path | None) -> dict[str, Gate]:
    """The gate per GPU decoder from ``EXPORT/decode_fidelity.json``: codec -> (passed, note).
    No export, or no record in it: no gates."""
    path = Path(export_dir) / GATE_FILE if export_dir is not None else None
    if path is None or not path.is_file():
        return {}
    gates: dict[str, Gate] = {}
    for backend, record in _read(path)["backends"].items():
        gates[backend] = {codec: (bool(stats["passed"]), gate_note(codec, stats, record))
                          for codec, stats in record["codecs"].items()}
    return gates

