"""The ``triton-video`` row of ``sfdeploy bench``: server-side decoding (``<name>_video``) beside
client-side decoding, on the same videos, at the same concurrency, one video per request.

Both paths go through :class:`sfdeploy.client.Classifier` as ``sfdeploy infer`` runs them (with and
without ``--server-decode``), after an untimed pass that starts decoders and loads caches. Bytes
sent per video are the tensor payloads: the encoded file (plus the 4-byte length a BYTES element
carries) with server-side decoding, the uint8 clips ``[V, T, H, W, 3]`` without; request headers
are not counted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("sfdeploy")


@dataclass
class VideoRow:
    backend: str  # "triton-video"
    protocol: str
    videos: int
    concurrency: int
    client_workers: int  # decode processes of the client-side path
    server_decode_videos_per_s: float
    client_decode_videos_per_s: float
    server_decode_bytes_per_video: float
    client_decode_bytes_per_video: float
    errors: int  # videos either path failed to classify (0 on a healthy run)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _videos_per_s(url: str, protocol: str, model: str, paths: list[Path], *, server_decode: bool,
                  concurrency: int, workers: int) -> tuple[float, int]:
    from sfdeploy.client import Classifier

    with Classifier.from_triton(url, model=model, protocol=protocol, server_decode=server_decode) as classifier:
        def run(subset: list[Path]) -> int:
            return sum(not p.ok for p in classifier.classify(subset, batch_size=1, concurrency=concurrency,
                                                             workers=workers))

        run(paths[: max(concurrency, 2)])  # warm-up: decoders started, model caches filled
        start = time.perf_counter()
        errors = run(paths)
        return len(paths) / (time.perf_counter() - start), errors


def triton_video_row(url: str, protocol: str, model: str, paths: list[Path], *, concurrency: int,
                     workers: int) -> VideoRow:
    """Videos/s and bytes sent per video, server-side vs client-side decoding, on a running server
    that serves ``model`` and ``<model>_video``."""
    from sfdeploy.runtime.triton_video import TritonVideoPredictor

    probe = TritonVideoPredictor(url, model=model, protocol=protocol)
    try:
        clip_bytes = int(np.prod(probe.spec.input_shape))
    finally:
        probe.close()
    log.info("bench: triton-video (server-side decoding), %d videos, concurrency %d", len(paths), concurrency)
    server_rate, server_errors = _videos_per_s(url, protocol, model, paths, server_decode=True,
                                               concurrency=concurrency, workers=workers)
    log.info("bench: triton-video's comparison (client-side decoding)")
    client_rate, client_errors = _videos_per_s(url, protocol, model, paths, server_decode=False,
                                               concurrency=concurrency, workers=workers)
    return VideoRow(backend="triton-video", protocol=protocol, videos=len(paths), concurrency=concurrency,
                    client_workers=workers, server_decode_videos_per_s=round(server_rate, 2),
                    client_decode_videos_per_s=round(client_rate, 2),
                    server_decode_bytes_per_video=round(float(np.mean([p.stat().st_size + 4 for p in paths])), 1),
                    client_decode_bytes_per_video=float(clip_bytes), errors=server_errors + client_errors)


def markdown_rows(row: dict[str, Any]) -> list[str]:
    """The report's section for the row (``sfdeploy.bench.report``)."""
    ratio = row["client_decode_bytes_per_video"] / max(row["server_decode_bytes_per_video"], 1.0)
    compared = f"{ratio:.1f}x fewer" if ratio >= 1 else f"{1 / ratio:.1f}x more"
    return ["", "## Server-side decoding (triton-video)", "",
            f"{row['videos']} videos, one per request, {row['concurrency']} requests in flight over "
            f"{row['protocol']}; client-side decoding with {row['client_workers']} decode workers. Bytes: tensor "
            "payload per video (the encoded file, or the uint8 clips).", "",
            "| decoding | videos/s | bytes sent per video |", "| --- | --- | --- |",
            f"| on the server (`<name>_video`, `infer --server-decode`) | {row['server_decode_videos_per_s']:.1f} | "
            f"{row['server_decode_bytes_per_video']:,.0f} ({compared}) |",
            f"| on the client (`infer`) | {row['client_decode_videos_per_s']:.1f} | "
            f"{row['client_decode_bytes_per_video']:,.0f} |"]
