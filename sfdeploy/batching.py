"""The batching loop of the local engine: decoded inputs in, predictions out, batches in flight.

The main thread packs what the decoders yield into batches of ``batch_size`` and keeps up to
``concurrency`` of them in flight on a thread pool (the predictor's calls release the GIL: a local
model computes, a Triton client waits on the network), so decoding, packing and the model overlap.
A file its decoder could not read is its own error row at once; a backend that stops answering
ends the run after the batches already in flight have come back, and the predictions yielded
before stay valid.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from sfdeploy.decode.clips import DecodedBy, DecodeFailure, ServerDecoded
from sfdeploy.errors import ServingError
from sfdeploy.predictions import Prediction
from sfdeploy.runtime import Predictor

#: What a decode stream yields per input: its index in ``paths``, what the predictor takes (a clip,
#: or with server-side decoding the file's bytes) or a :class:`DecodeFailure`, and which decoder read it.
Decoded = tuple[int, Any, DecodedBy | None]


class BatchPipeline:
    """One run of the batching loop over ``paths`` (see the module docstring).

    ``encoded``: the predictor takes the files' bytes as a list (server-side decoding) rather than
    a stacked clip batch. ``shown``: the progress bar, advanced once per input."""

    def __init__(self, predictor: Predictor, paths: Sequence[str], *, topk: int, shown: Any,
                 encoded: bool = False) -> None:
        self.predictor, self.paths, self.topk, self.shown, self.encoded = predictor, paths, topk, shown, encoded
        self.classes = predictor.spec.class_names
        self.inflight: dict[Future, list[tuple[str, DecodedBy | None]]] = {}
        self.failure: BaseException | None = None

    def run(self, stream: Generator[Decoded, None, None], batch_size: int, concurrency: int) -> Iterator[Prediction]:
        """One :class:`Prediction` per input of ``stream``, in completion order; raises the
        backend's :class:`ServingError` after the batches in flight have been answered."""
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="sfdeploy-infer") as pool:
            try:
                yield from self._feed(pool, stream, batch_size, concurrency)
            finally:
                stream.close()  # stops the decode workers if we leave early
            while self.inflight:
                yield from self._finished(wait(self.inflight, return_when=FIRST_COMPLETED).done)
        if self.failure is not None:
            raise self.failure

    def _feed(self, pool: ThreadPoolExecutor, stream: Iterable[Decoded], batch_size: int,
              concurrency: int) -> Iterator[Prediction]:
        """Batches ``stream`` into ``pool``, never more than ``concurrency`` in flight."""
        batch: list[tuple[str, Any, DecodedBy | None]] = []
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
                return
        if batch and self.failure is None:
            self._submit(pool, batch)

    def _submit(self, pool: ThreadPoolExecutor, batch: list[tuple[str, Any, DecodedBy | None]]) -> None:
        items = [item for _, item, _ in batch]  # clips (host or GPU), or the encoded files (server-side decoding)
        request = items if self.encoded else stack_clips(items)
        self.inflight[pool.submit(self.predictor.predict, request)] = [(path, how) for path, _, how in batch]

    def _finished(self, futures: Iterable[Future]) -> Iterator[Prediction]:
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
                if isinstance(row, ServerDecoded):  # ... and which decoder read it there
                    row, how = row.probs, row.decoded_by
                yield Prediction.from_probs(path, row, self.classes, self.topk, how)


def stack_clips(clips: Sequence[Any]) -> Any:
    """A batch of clips: numpy when every clip is, else a torch tensor on the GPU the GPU-decoded
    clips are on (the CPU-decoded ones of the batch copied up to it), so a batch mixing the two
    decoders' clips still goes to the model in one call."""
    from sfdeploy.runtime.base import is_torch_tensor

    on_gpu = [c for c in clips if is_torch_tensor(c)]
    if not on_gpu:
        return np.stack(clips)
    import torch

    device = on_gpu[0].device
    return torch.stack([c if is_torch_tensor(c) else torch.from_numpy(c).to(device) for c in clips])
