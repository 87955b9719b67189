"""Classify videos with an exported or a served model: the local engine of ``sfdeploy infer``.

::

    from sfdeploy.client import Classifier

    with Classifier.from_triton("127.0.0.1:8000", model="slowfast") as clf:   # or from_export("EXPORT")
        for p in clf.classify(["videos/"], batch_size=8, concurrency=8):
            print(p.path, p.label, p.score)

The pipeline: worker processes decode and preprocess (a file that crashes or hangs its decoder
fails alone; with a model on a GPU, NVDEC decodes the streams it can in this process and their
clips stay on the GPU: :mod:`sfdeploy.decode.pool`), the main thread packs clips into batches, and
up to ``concurrency`` batches are in flight at once on a thread pool (:mod:`sfdeploy.batching`).
With server-side decoding (``from_triton(..., server_decode=True)``)
the batches hold the files' bytes instead, and ``<model>_video`` decodes them on the server. Every
input yields exactly one :class:`Prediction`, failed ones with their error. :func:`infer` writes
them to CSV, JSON Lines or Parquet as they arrive and can resume, through
:func:`sfdeploy.output.write_predictions` as ``--engine ray`` does. The options of a run and their
defaults are :class:`sfdeploy.infer_options.InferOptions`, the same for both engines;
:func:`sfdeploy.engines.run_infer` runs either engine.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfdeploy.batching import BatchPipeline
from sfdeploy.clipspec import ClipSpec
from sfdeploy.decode.clips import DecodedBy
from sfdeploy.decode.gpu.select import DecodePlan
from sfdeploy.decode.pool import decode_many
from sfdeploy.device import DEFAULT_DEVICE, is_cuda
from sfdeploy.endpoints import DEFAULT_HTTP_URL, DEFAULT_MODEL
from sfdeploy.infer_options import InferOptions
from sfdeploy.inputs import collect_inputs
from sfdeploy.output import write_predictions
from sfdeploy.predictions import Prediction
from sfdeploy.progress import bar
from sfdeploy.runtime import Predictor
from sfdeploy.target import DEFAULT_LOCAL_BACKEND, SERVED, ModelTarget

if TYPE_CHECKING:
    from sfdeploy.output import InferSummary

log = logging.getLogger("sfdeploy")


class Classifier:
    """A predictor plus the batching/concurrency pipeline around it.

    ``server_decode``: the predictor takes the encoded files (``<model>_video``, which decodes them
    on the server) instead of decoded clips; :meth:`open` sets it from the target. ``export_dir``:
    where the model was exported from, whose GPU-decoding fidelity record ``decode="auto"`` reads."""

    def __init__(self, predictor: Predictor, *, server_decode: bool = False,
                 export_dir: str | Path | None = None) -> None:
        self.predictor = predictor
        self.server_decode = server_decode
        self.export_dir = Path(export_dir) if export_dir is not None else None

    @classmethod
    def open(cls, target: ModelTarget) -> Classifier:
        """The classifier of ``target``: what ``sfdeploy infer`` runs."""
        return cls(target.open(), server_decode=target.server_decode, export_dir=target.export_dir)

    @classmethod
    def from_triton(cls, url: str = DEFAULT_HTTP_URL, model: str = DEFAULT_MODEL, protocol: str = "http",
                    shm: bool | str = False, server_decode: bool = False) -> Classifier:
        """A served model. ``shm``: how the clips reach a server on this machine (``True`` or ``"system"``:
        system shared memory; ``"cuda"``: CUDA shared memory; a :class:`sfdeploy.transport.SharedMemory`).
        ``server_decode``: send the encoded files to ``<model>_video``, which decodes them on the server
        (nothing decoded here; the file's bytes on the wire, not uint8 clips)."""
        return cls.open(ModelTarget(backend=SERVED, urls=(url,), model=model, protocol=protocol, shm=shm,
                                    server_decode=server_decode))

    @classmethod
    def from_export(cls, export_dir: str | Path, backend: str = DEFAULT_LOCAL_BACKEND, precision: str = "fp32",
                    device: str = DEFAULT_DEVICE) -> Classifier:
        """An exported model, run in this process."""
        return cls.open(ModelTarget(backend=backend, export_dir=Path(export_dir), precision=precision, device=device))

    @property
    def spec(self) -> ClipSpec:
        """The clip spec of the model: what the decoders make of each video."""
        return self.predictor.spec

    def decode_plan(self, decode: str = "auto") -> DecodePlan:
        """Where this classifier's videos are decoded (``--decode``: auto, cpu, gpu, or a GPU
        decoder by name; :func:`sfdeploy.decode.gpu.select.plan_decoding`), said once in the log.
        Raises when ``gpu`` (or a decoder by name) cannot be had, with the fix. With server-side
        decoding the mode is the server's to follow (auto, cpu or gpu, sent with each request)."""
        from sfdeploy.decode.gpu.gate import read_gates
        from sfdeploy.decode.gpu.select import plan_decoding, probe_backends

        if self.server_decode:  # nothing decoded here: the mode goes to the server with each request
            self.predictor.ask_decode(decode)  # type: ignore[attr-defined]
            return DecodePlan(decode, None, self.predictor.device, "decoded on the server (<model>_video)")
        device = self.predictor.device
        on_gpu = decode != "cpu" and is_cuda(device)
        plan = plan_decoding(decode, device=device, statuses=probe_backends() if on_gpu else [],
                             gates=read_gates(self.export_dir) if on_gpu else None)
        if plan.backend:
            log.info("decoding: NVDEC (%s) on %s where the stream allows, else the CPU", plan.why, plan.device)
        elif decode != "cpu":
            log.info("decoding on the CPU: %s", plan.why)
        return plan

    def classify(self, inputs: Iterable[str | Path], options: InferOptions | None = None, *,
                 show_progress: bool = False, plan: DecodePlan | None = None, **fields: Any) -> Iterator[Prediction]:
        """One :class:`Prediction` per input (folders expanded), in completion order. ``options``
        (:class:`~sfdeploy.infer_options.InferOptions`; or its fields by name, e.g. ``batch_size=8,
        concurrency=4``, over it) say how. A video with frames of more than ``max_pixels`` is refused
        (its row says so) before it is decoded. ``decode``: where videos are decoded
        (:meth:`decode_plan`, unless ``plan`` is decided already); each row says which decoder
        read its video and why.

        Raises :class:`ServingError` if the backend stops answering; the predictions yielded
        before that stay valid.
        """
        options = replace(options or InferOptions(), **fields)
        plan = plan or self.decode_plan(options.decode)
        items = collect_inputs(inputs)
        for path, error in items:
            if error:
                yield Prediction(path, "error", error=error)
        yield from self.classify_videos([path for path, error in items if not error], options,
                                        show_progress=show_progress, plan=plan)

    def classify_videos(self, paths: Sequence[str], options: InferOptions, *, show_progress: bool = False,
                        plan: DecodePlan | None = None) -> Iterator[Prediction]:
        """:meth:`classify` for video files (expanded already: what :func:`sfdeploy.output.write_predictions`
        hands an engine), so that a run expands its inputs once."""
        plan = plan or self.decode_plan(options.decode)
        paths = list(paths)
        shown = bar(len(paths), desc=f"infer {self.predictor.name}", unit="video", enabled=show_progress)
        stream = self._inputs(paths, options.workers, options.max_pixels, plan)
        pipeline = BatchPipeline(self.predictor, paths, topk=options.topk, shown=shown, encoded=self.server_decode)
        try:
            yield from pipeline.run(stream, options.batch_size, options.in_flight())
        finally:
            shown.close()

    def _inputs(self, paths: list[str], workers: int | None, max_pixels: int,
                plan: DecodePlan) -> Generator[tuple[int, Any, DecodedBy | None], None, None]:
        """``(index, what the predictor takes, which decoder read it)`` per path, or a
        :class:`DecodeFailure`: clips decoded by worker processes (or NVDEC, as ``plan`` routes them),
        or with server-side decoding the files' bytes (the server says nothing of its decoder)."""
        if self.server_decode:
            return _encoded(paths)
        return decode_many(paths, self.spec, plan=plan, workers=workers, max_pixels=max_pixels)

    def close(self) -> None:
        """Close the predictor (a server connection, a model's session)."""
        self.predictor.close()

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _encoded(paths: Sequence[str]) -> Generator[tuple[int, bytes, None], None, None]:
    """The files' bytes for server-side decoding (the server says nothing of its decoder)."""
    from sfdeploy.runtime.triton_video import read_encoded

    encoded = read_encoded(paths)
    try:
        for index, data in encoded:
            yield index, data, None
    finally:
        encoded.close()


def infer(inputs: Sequence[str | Path], out: str | Path, classifier: Classifier, options: InferOptions | None = None, *,
          resume: bool = False, show_progress: bool = True, **fields: Any) -> InferSummary:
    """Classify ``inputs`` into ``out`` (``options``, or its fields by name over it); on a backend
    failure the rows so far are kept and a :class:`ServingError` says how to continue. Where videos
    are decoded (:meth:`Classifier.decode_plan`) is decided before the output is opened: a ``gpu``
    that cannot be had writes nothing."""
    options = replace(options or InferOptions(), **fields)
    plan = classifier.decode_plan(options.decode)
    return write_predictions(inputs, out, lambda videos: classifier.classify_videos(
        videos, options, show_progress=show_progress, plan=plan), resume=resume)
