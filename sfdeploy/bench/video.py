"""The ``triton-video`` rows of ``sfdeploy bench`` (stage ``e2e``): server-side decoding
(``<name>_video``, ``infer --server-decode``) on the server's CPU and, where the bench runs on a
GPU with a GPU decoder, on its NVDEC (the same server: each request says where, with the request
parameter ``decode``), beside client-side decoding, on the same videos, at the same concurrency,
one video per request. The server-side rows carry Triton's statistics of ``<name>_video`` over
their window (``server``: queue, compute, and the BLS call to ``<name>`` inside compute_infer).

Both go through :class:`sfdeploy.client.Classifier` as ``sfdeploy infer`` runs them, each after
an untimed pass that starts its decoders and fills the model's caches. Bytes sent per video are
the tensor payloads: the encoded file (plus the 4-byte length a BYTES element carries) with
server-side decoding, the uint8 clips ``[V, T, H, W, 3]`` without; request headers not counted.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from sfdeploy.bench import suites
from sfdeploy.bench.rows import CLIENT_DECODE, SERVER_DECODE, SERVER_GPU_DECODE
from sfdeploy.bench.rows import VIDEO_PROTOCOL as PROTOCOL

log = logging.getLogger("sfdeploy")



def bytes_per_video(paths: list[Path], spec: Any, server_decode: bool) -> float:
    """Bytes a request carries per video: the encoded file (plus its length prefix) when decoded on the server,
    else one decoded uint8 clip."""
    if server_decode:
        return round(float(np.mean([p.stat().st_size + 4 for p in paths])), 1)
    return float(np.prod(spec.input_shape))


def row_name(server_decode: str | None) -> str:
    """The row of decoding on the server's ``cpu`` or ``gpu``, or (None) on the client."""
    return {None: CLIENT_DECODE, "cpu": SERVER_DECODE, "gpu": SERVER_GPU_DECODE}[server_decode]


def decode_row(url: str, model: str, precision: str, paths: list[Path], *, server_decode: str | None,
               concurrency: int, workers: int) -> dict[str, Any]:
    """One row: videos/s through the served ``model`` with decoding on the server (``server_decode``:
    ``cpu`` or ``gpu``, asked with each request) or, None, on the client."""
    from sfdeploy.client import Classifier

    name, on_server = row_name(server_decode), server_decode is not None
    log.info("bench: %s, %d videos, concurrency %d", name, len(paths), concurrency)
    with Classifier.from_triton(url, model=model, protocol=PROTOCOL, server_decode=on_server) as classifier:
        decode = server_decode or "cpu"
        list(classifier.classify(paths[: max(concurrency, 2)], batch_size=1, concurrency=concurrency,
                                 workers=workers, decode=decode))  # warm-up: decoders started, model caches filled
        before, started = (classifier.predictor.statistics(), time.perf_counter()) if on_server else ({}, 0.0)
        row = suites.sfdeploy_row(name, classifier, precision, paths, workers=workers, batch=1,
                                  concurrency=concurrency, decode=decode)
        if on_server and row.get("status") == "ok":
            row["server"] = suites.server_stats_delta(before, classifier.predictor.statistics(),
                                                      time.perf_counter() - started)
        sent = bytes_per_video(paths, classifier.spec, on_server)
    where = (f"on the server's {'GPU (NVDEC)' if server_decode == 'gpu' else 'CPU'} (<name>_video)" if on_server
             else f"on the client ({workers} decode workers)")
    return {**row, "bytes_per_video": sent,
            "note": f"decoding {where}, 1 video per request, {concurrency} in flight; {sent:,.0f} bytes sent per video"}
