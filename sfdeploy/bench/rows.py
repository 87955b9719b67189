"""What a row of a benchmark record is keyed by, and its statuses: the vocabulary that the record
(:mod:`sfdeploy.bench.record`), the targets computed from it (:mod:`sfdeploy.bench.targets`) and
the functions that measure rows share, owned here so that none of them imports another for it."""

from __future__ import annotations

from typing import Any

#: a row is identified by these fields; a record holds each key once
ROW_KEY: tuple[str, ...] = ("stage", "backend", "precision", "batch", "concurrency")
OK, FAILED, SKIPPED = "ok", "failed", "skipped"

Key = tuple[Any, ...]

#: the triton-video rows' backends (sfdeploy.bench.video): decoding on the server's CPU, on its
#: NVDEC, or on the client, one video per request over gRPC
VIDEO_PROTOCOL = "grpc"
SERVER_DECODE = f"triton-video:{VIDEO_PROTOCOL}"
SERVER_GPU_DECODE = f"triton-video:{VIDEO_PROTOCOL} (nvdec)"
CLIENT_DECODE = f"sfdeploy:triton-{VIDEO_PROTOCOL} (1 video per request)"


def row_key(row: dict[str, Any]) -> Key:
    """The identity of a row (:data:`ROW_KEY`): what ``--resume`` compares to find the rows still to measure."""
    return tuple(row[name] for name in ROW_KEY)
