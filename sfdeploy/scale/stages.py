"""The two stages ``--engine ray`` runs on the cluster: decode (tasks) and predict (actors).

Both move data as Arrow tables, Ray Data's native block format, so a batch crosses the object
store without pickling:

* paths in: ``path`` (as the user gave it, for the row) and ``file`` (absolute, for the worker);
* decoded: ``path``, ``error`` (null when decoded) and ``clip``: the uint8 views of one video as
  ``large_binary`` (its shape is the clip spec's ``input_shape``), empty for a failed video, so a
  broken file costs no object-store memory;
* rows out: :func:`sfdeploy.predictions.arrow_schema`, the schema of the ``.parquet`` output, plus
  :data:`WHERE_COLUMNS`: which node decoded the video, and which model actor (on which node, in
  which batch) classified it. The driver counts them for the run's summary and writes only the row.

Ray imports nothing of this at the driver; workers import it by module name, so sfdeploy must be
installed on every node.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np

from sfdeploy.clipspec import ClipSpec
from sfdeploy.errors import InputError
from sfdeploy.infer_options import InferOptions
from sfdeploy.target import ModelTarget

DECODE_NODE = "decode_node"  # the Ray node id of the decode task (decoded table and rows out)
WHERE_COLUMNS = (DECODE_NODE, "model_actor", "model_node", "model_batch")  # rows out, beside the row itself


def ray_place() -> tuple[str, str]:
    """(node id, actor id) of the Ray worker this code runs in; '' for what does not apply (a task
    has no actor id; outside Ray, as a stage built in a test, neither)."""
    import ray

    if not ray.is_initialized():
        return "", ""
    context = ray.get_runtime_context()
    return context.get_node_id(), context.get_actor_id() or ""


def decode_videos(paths: Any, *, spec_json: str, batch_size: int, max_pixels: int) -> Iterator[Any]:
    """Decode one block of paths (a Ray task): yields tables of up to ``batch_size`` decoded videos.

    Decoding runs through :func:`sfdeploy.decode.pool.decode_many` in one isolated worker process,
    so a file that crashes or hangs the decoder becomes its own error row and this task goes on.
    Tables are yielded as they fill, in input order: Ray's backpressure on a generator task then
    bounds the decoded clips in flight, and a retried task (its worker was killed) yields the
    same sequence again.
    """
    import pyarrow as pa

    from sfdeploy.decode.clips import DecodeFailure
    from sfdeploy.decode.pool import decode_many

    spec = ClipSpec.from_json(spec_json)
    node, _ = ray_place()
    names = paths.column("path").to_pylist()
    files = paths.column("file").to_pylist()
    ready: dict[int, Any] = {}  # decoded out of order, waiting for the ones before them
    following = 0
    chunk: list[tuple[str, np.ndarray | DecodeFailure]] = []
    for index, result, _ in decode_many(files, spec, workers=1, max_pixels=max_pixels):
        ready[index] = result
        while following in ready:
            chunk.append((names[following], ready.pop(following)))
            following += 1
            if len(chunk) == batch_size:
                yield _clips_table(chunk, node, pa, DecodeFailure)
                chunk = []
    if chunk:
        yield _clips_table(chunk, node, pa, DecodeFailure)


def _clips_table(rows: list[tuple[str, Any]], node: str, pa: Any, failure_type: type) -> Any:
    """Decoded videos -> one table; the clips are copied once, into one contiguous buffer."""
    clips = [result for _, result in rows if not isinstance(result, failure_type)]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([0 if isinstance(r, failure_type) else r.nbytes for _, r in rows])
    data = np.concatenate([c.reshape(-1) for c in clips]) if clips else np.zeros(0, dtype=np.uint8)
    column = pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(rows),
                                              [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    errors = [r.error if isinstance(r, failure_type) else None for _, r in rows]
    return pa.table({"path": pa.array([p for p, _ in rows], pa.string()), "error": pa.array(errors, pa.string()),
                     "clip": column, DECODE_NODE: pa.array([node] * len(rows), pa.string())})


def _clip_views(column: Any, shape: tuple[int, ...]) -> list[np.ndarray]:
    """Zero-copy numpy views of the non-empty clips of a (chunked) ``large_binary`` column."""
    views = []
    for chunk in column.chunks:
        _, offsets_buffer, data_buffer = chunk.buffers()
        offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[chunk.offset: chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
        views += [data[start:end].reshape(shape) for start, end in itertools.pairwise(offsets) if end > start]
    return views


class PredictStage:
    """A model actor: runs ``target`` (an exported artifact, on the GPU Ray gave it with
    ``device='cuda'``, with ``threads`` inference threads), or sends to Triton, spreading batches
    over the target's servers."""

    def __init__(self, *, target: ModelTarget, spec_json: str, threads: int | None = None,
                 topk: int = InferOptions.topk) -> None:
        self.spec = ClipSpec.from_json(spec_json)
        self.predictors = [server.open(threads=threads) for server in target.servers()]
        for predictor in self.predictors:
            if predictor.spec != self.spec:
                raise InputError(f"{predictor.name} expects other clips than the ones decoded for it",
                                 fix="every --url must serve the same model (and the export must not change "
                                     "during the run)")
        self.turn = itertools.cycle(self.predictors)
        self.topk = topk
        self.node, self.actor = ray_place()

    def __call__(self, batch: Any) -> Any:
        import uuid

        import pyarrow as pa

        from sfdeploy.predictions import Prediction, predictions_to_arrow

        paths = batch.column("path").to_pylist()
        errors = batch.column("error").to_pylist()
        clips = _clip_views(batch.column("clip"), self.spec.input_shape)
        rows = {i: Prediction(p, "error", error=e) for i, (p, e) in enumerate(zip(paths, errors, strict=True)) if e}
        if clips:
            probs = next(self.turn).predict(np.stack(clips))
            decoded = [i for i in range(len(paths)) if i not in rows]
            for i, row in zip(decoded, probs, strict=True):
                rows[i] = Prediction.from_probs(paths[i], row, self.spec.class_names, self.topk)
        table = predictions_to_arrow(rows[i] for i in range(len(paths)))
        # Where it ran: a batch id (not a counter) stays distinct when Ray restarts this actor.
        where = (batch.column(DECODE_NODE), self.actor, self.node, uuid.uuid4().hex)
        for name, value in zip(WHERE_COLUMNS, where, strict=True):
            table = table.append_column(name, value if isinstance(value, pa.ChunkedArray)
                                        else pa.array([value] * len(paths), pa.string()))
        return table

    def __del__(self) -> None:
        for predictor in getattr(self, "predictors", []):
            predictor.close()
