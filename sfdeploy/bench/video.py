"""The ``triton-video`` rows of ``sfdeploy bench`` (stage ``e2e``): server-side decoding
(``<name>_video``, ``infer --server-decode``) beside client-side decoding, on the same videos, at
the same concurrency, one video per request.

Both go through :class:`sfdeploy.client.Classifier` as ``sfdeploy infer`` runs them, each after
an untimed pass that starts its decoders and fills the model's caches. Bytes sent per video are
the tensor payloads: the encoded file (plus the 4-byte length a BYTES element carries) with
server-side decoding, the uint8 clips ``[V, T, H, W, 3]`` without; request headers not counted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from sfdeploy.bench import suites

log = logging.getLogger("sfdeploy")

PROTOCOL = "grpc"
SERVER_DECODE = f"triton-video:{PROTOCOL}"  # the row's backend names
CLIENT_DECODE = f"sfdeploy:triton-{PROTOCOL} (1 video per request)"


def bytes_per_video(paths: list[Path], spec: Any, server_decode: bool) -> float:
    """Bytes a request carries per video: the encoded file (plus its length prefix) when decoded on the server,
    else one decoded uint8 clip."""
    if server_decode:
        return round(float(np.mean([p.stat().st_size + 4 for p in paths])), 1)
    return float(np.prod(spec.input_shape))


def decode_row(url: str, model: str, precision: str, paths: list[Path], *, server_decode: bool, concurrency: int,
               workers: int) -> dict[str, Any]:
    """One row: videos/s through the served ``model`` with decoding on the server or the client."""
    from sfdeploy.client import Classifier

    name = SERVER_DECODE if server_decode else CLIENT_DECODE
    log.info("bench: %s, %d videos, concurrency %d", name, len(paths), concurrency)
    with Classifier.from_triton(url, model=model, protocol=PROTOCOL, server_decode=server_decode) as classifier:
        list(classifier.classify(paths[: max(concurrency, 2)], batch_size=1, concurrency=concurrency,
                                 workers=workers))  # warm-up: decoders started, model caches filled
        row = suites.sfdeploy_row(name, classifier, precision, paths, workers=workers, batch=1,
                                  concurrency=concurrency)
        sent = bytes_per_video(paths, classifier.spec, server_decode)
    where = "on the server (<name>_video)" if server_decode else f"on the client ({workers} decode workers)"
    return {**row, "bytes_per_video": sent,
            "note": f"decoding {where}, 1 video per request, {concurrency} in flight; {sent:,.0f} bytes sent per video"}
