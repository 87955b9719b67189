"""Classify videos with an exported or a served model: the Python API behind ``sfdeploy infer``.

::

    from sfdeploy.client import Classifier

    with Classifier.from_triton("127.0.0.1:8000", model="slowfast") as clf:   # or from_export("EXPORT")
        for p in clf.classify(["videos/"], batch_size=8, concurrency=8):
            print(p.path, p.label, p.score)

The pipeline: worker processes decode and preprocess (a file that crashes or hangs its decoder
fails alone; with a model on a GPU, NVDEC decodes the streams it can in this process and their
clips stay on the GPU: :mod:`sfdeploy.gpudecode`), the main thread packs clips into batches, and up to ``concurrency`` batches are in
flight at once on a thread pool. With server-side decoding (``from_triton(..., server_decode=True)``)
the batches hold the files' bytes instead, and ``<model>_video`` decodes them on the server. Every
input yields exactly one :class:`Prediction`, failed ones with their error. :func:`infer` writes
them to CSV, JSON Lines or Parquet as they arrive and can resume; :func:`write_predictions` does
the same for any stream of predictions (``--engine ray``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfdeploy.artifacts import DEFAULT_DEVICE
from sfdeploy.clipspec import ClipSpec
from sfdeploy.data.probe import VIDEO_EXTENSIONS
from sfdeploy.decode import MAX_VIDEO_PIXELS
from sfdeploy.endpoints import DEFAULT_HTTP_URL, DEFAULT_MODEL
from sfdeploy.errors import InputError, ServingError
from sfdeploy.gpudecode.pool import DecodedBy, decode_routed, stack_clips
from sfdeploy.gpudecode.select import DecodePlan
from sfdeploy.predictions import Prediction, PredictionWriter
from sfdeploy.preprocess import DecodeFailure
from sfdeploy.progress import bar
from sfdeploy.runtime import Predictor
from sfdeploy.target import DEFAULT_LOCAL_BACKEND, SERVED, ModelTarget

log = logging.getLogger("sfdeploy")



def collect_inputs(items: Iterable[str | Path]) -> list[tuple[str, str | None]]:
    """Expand folders into their videos (recursively, sorted); ``(path, error or None)`` per input.
    A missing path or a folder without videos is an input with an error, not a silent skip."""
    found: list[tuple[str, str | None]] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            videos = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
            if not videos:
                found.append((str(path), f"folder has no videos ({', '.join(VIDEO_EXTENSIONS)}); "
                                         "pass a folder with videos, or the video files"))
            found += [(str(v), None) for v in videos]
        elif path.is_file():
            found.append((str(path), None))
        else:
            found.append((str(path), "file not found; check the path"))
    return found


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
                    shm: bool = False, server_decode: bool = False) -> Classifier:
        """A served model. ``server_decode``: send the encoded files to ``<model>_video``, which decodes
        them on the server (nothing decoded here; the file's bytes on the wire, not uint8 clips)."""
        return cls.open(ModelTarget(backend=SERVED, urls=(url,), model=model, protocol=protocol, shm=shm,
                                    server_decode=server_decode))

    @classmethod
    def from_export(cls, export_dir: str | Path, backend: str = DEFAULT_LOCAL_BACKEND, precision: str = "fp32",
                    device: str = DEFAULT_DEVICE) -> Classifier:
        """An exported model, run in this process."""
        return cls.open(ModelTarget(backend=backend, export_dir=Path(export_dir), precision=precision, device=device))

    @property
    def spec(self) -> ClipSpec:
        return self.predictor.spec

    def decode_plan(self, decode: str = "auto") -> DecodePlan:
        """Where this classifier's videos are decoded (``--decode``: auto, cpu, gpu, or a GPU
        decoder by name; :func:`sfdeploy.gpudecode.select.plan_decoding`), said once in the log.
        Raises when ``gpu`` (or a decoder by name) cannot be had, with the fix."""
        from sfdeploy.gpudecode.fidelity import read_gates
        from sfdeploy.gpudecode.select import plan_decoding, probe_backends

        device = getattr(self.predictor, "device", "remote")
        on_gpu = decode != "cpu" and device.startswith("cuda")
        plan = plan_decoding(decode, device=device, statuses=probe_backends() if on_gpu else [],
                             gates=read_gates(self.export_dir) if on_gpu else None)
        if plan.backend:
            log.info("decoding: NVDEC (%s) on %s where the stream allows, else the CPU", plan.why, plan.device)
        elif decode != "cpu":
            log.info("decoding on the CPU: %s", plan.why)
        return plan

    def predict_clips(self, frames: np.ndarray) -> np.ndarray:
        """uint8 ``[N, V, T, H, W, 3]`` (see :func:`sfdeploy.preprocess.load_video`) -> probabilities."""
        return self.predictor.predict(frames)

    def classify(self, inputs: Iterable[str | Path], *, batch_size: int = 8, concurrency: int = 1, topk: int = 5,
                 workers: int | None = None, show_progress: bool = False,
                 max_pixels: int = MAX_VIDEO_PIXELS, decode: str | DecodePlan = "auto") -> Iterator[Prediction]:
        """One :class:`Prediction` per input (folders expanded), in completion order. A video with
        frames of more than ``max_pixels`` is refused (its row says so) before it is decoded.
        ``decode``: where videos are decoded (:meth:`decode_plan`); each row says which decoder read
        its video and why.

        Raises :class:`ServingError` if the backend stops answering; the predictions yielded
        before that stay valid.
        """
        if batch_size < 1 or concurrency < 1:
            raise InputError("batch size and concurrency must be >= 1", fix="use e.g. --batch-size 8 --concurrency 4")
        plan = decode if isinstance(decode, DecodePlan) else self.decode_plan(decode)
        items = collect_inputs(inputs)
        for path, error in items:
            if error:
                yield Prediction(path, "error", error=error)
        paths = [path for path, error in items if not error]
        shown = bar(len(paths), desc=f"infer {self.predictor.name}", unit="video", enabled=show_progress)
        stream = self._inputs(paths, workers, max_pixels, plan)
        try:
            yield from _Pipeline(self, paths, topk, shown).run(stream, batch_size, concurrency)
        finally:
            shown.close()

    def _inputs(self, paths: list[str], workers: int | None, max_pixels: int,
                plan: DecodePlan) -> Generator[tuple[int, Any, DecodedBy | None], None, None]:
        """``(index, what the predictor takes, which decoder read it)`` per path, or a
        :class:`DecodeFailure`: clips decoded by worker processes (or NVDEC, as ``plan`` routes them),
        or with server-side decoding the files' bytes (the server says nothing of its decoder)."""
        if self.server_decode:
            return _encoded(paths)
        return decode_routed(paths, self.spec, plan, workers=workers, max_pixels=max_pixels)

    def close(self) -> None:
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


class _Pipeline:
    """One :meth:`Classifier.classify` run: packs the inputs into batches, keeps up to
    ``concurrency`` of them in flight on a thread pool, and turns answers into predictions."""

    def __init__(self, classifier: Classifier, paths: list[str], topk: int, shown: Any) -> None:
        self.classifier, self.paths, self.topk, self.shown = classifier, paths, topk, shown
        self.inflight: dict[Future, list[tuple[str, DecodedBy | None]]] = {}
        self.failure: BaseException | None = None

    def run(self, stream: Generator[tuple[int, Any, DecodedBy | None], None, None], batch_size: int,
            concurrency: int) -> Iterator[Prediction]:
        batch: list[tuple[str, Any, DecodedBy | None]] = []
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="sfdeploy-infer") as pool:
            try:
                for index, item, how in stream:
                    if isinstance(item, DecodeFailure):
                        self.shown.update(1)
                        yield Prediction(self.paths[index], "error", error=item.error)
                        continue
                    batch.append((self.paths[index], item, how))
                    if len(batch) >= batch_size:
                        self._submit(pool, batch)
                        batch = []
                    yield from self._finished([f for f in self.inflight if f.done()])
                    while len(self.inflight) >= concurrency and self.failure is None:
                        yield from self._finished(wait(self.inflight, return_when=FIRST_COMPLETED).done)
                    if self.failure is not None:
                        break
                if batch and self.failure is None:
                    self._submit(pool, batch)
            finally:
                stream.close()  # stops the decode workers if we leave early
            while self.inflight:
                yield from self._finished(wait(self.inflight, return_when=FIRST_COMPLETED).done)
        if self.failure is not None:
            raise self.failure

    def _submit(self, pool: ThreadPoolExecutor, batch: list[tuple[str, Any, DecodedBy | None]]) -> None:
        items = [item for _, item, _ in batch]  # clips (host or GPU), or the encoded files (server-side decoding)
        predictor = self.classifier.predictor
        request = items if self.classifier.server_decode else stack_clips(items)
        self.inflight[pool.submit(predictor.predict, request)] = [(path, how) for path, _, how in batch]

    def _finished(self, futures: Iterable[Future]) -> Iterator[Prediction]:
        classes = self.classifier.spec.class_names
        for future in futures:
            batch_paths = self.inflight.pop(future)
            try:
                probs = future.result()
            except ServingError as exc:
                self.failure = self.failure or exc
                continue
            for (path, how), row in zip(batch_paths, probs, strict=True):
                self.shown.update(1)
                if isinstance(row, str):  # server-side decoding: why the server could not classify it
                    yield Prediction(path, "error", error=row)
                    continue
                yield Prediction.from_probs(path, row, classes, self.topk, how)


@dataclass
class InferSummary:
    out: str
    inputs: int
    skipped: int  # already in the output (--resume)
    ok: int = 0
    failed: int = 0
    wall_time_s: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)

    @property
    def videos_per_s(self) -> float:
        return (self.ok + self.failed) / self.wall_time_s if self.wall_time_s else 0.0

    def describe(self) -> str:
        """The run in one line; a rate only when videos were classified (failures are no throughput)."""
        line = f"{self.ok} classified, {self.failed} failed, {self.skipped} already in {self.out}"
        return line + (f"; {self.videos_per_s:.1f} videos/s" if self.ok else "")


def infer(inputs: Sequence[str | Path], out: str | Path, classifier: Classifier, *, batch_size: int = 8,
          concurrency: int = 4, topk: int = 5, workers: int | None = None, resume: bool = False,
          show_progress: bool = True, max_pixels: int = MAX_VIDEO_PIXELS, decode: str = "auto") -> InferSummary:
    """Classify ``inputs`` into ``out``; on a backend failure the rows so far are kept and a
    :class:`ServingError` says how to continue. ``decode``: see :meth:`Classifier.decode_plan`
    (decided before the output is opened: a ``gpu`` that cannot be had writes nothing)."""
    plan = classifier.decode_plan(decode)
    return write_predictions(inputs, out, lambda todo: classifier.classify(
        todo, batch_size=batch_size, concurrency=concurrency, topk=topk, workers=workers,
        show_progress=show_progress, max_pixels=max_pixels, decode=plan), resume=resume)


def write_predictions(inputs: Sequence[str | Path], out: str | Path,
                      classify: Callable[[list[str]], Iterable[Prediction]], *, resume: bool = False) -> InferSummary:
    """Expand ``inputs``, skip those already in ``out`` (``resume``), and write one row per input
    from ``classify(todo)`` as it arrives: the one writer and summary of every engine.

    A path that arrives twice (an engine that retries work, like Ray) is written once. On a
    backend failure the rows so far are kept and a :class:`ServingError` says how to continue.
    """
    writer = PredictionWriter(Path(out), resume=resume)
    started = time.monotonic()
    expanded = list(dict.fromkeys(path for path, _ in collect_inputs(inputs)))
    todo = [path for path in expanded if path not in writer.done]
    summary = InferSummary(out=str(out), inputs=len(expanded), skipped=len(expanded) - len(todo))
    try:
        for prediction in classify(todo):
            if prediction.path in writer.done:
                continue
            writer.write(prediction)
            if prediction.ok:
                summary.ok += 1
            else:
                summary.failed += 1
                summary.failures.append({"path": prediction.path, "error": prediction.error or ""})
    except ServingError as exc:
        raise ServingError(f"{exc.message}; {summary.ok + summary.failed} of {len(todo)} rows were written "
                           f"before it", path=out, fix=f"{exc.fix or 'restart the server'}, then run the same "
                           "command with --resume (finished rows are kept and skipped)") from exc
    finally:
        writer.close()
        summary.wall_time_s = round(time.monotonic() - started, 3)
    return summary
