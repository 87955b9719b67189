"""Server-side decoding, the client's half: encoded video files go to ``<name>_video``, which decodes
them on the server (:mod:`sfdeploy.serving.video_backend`) and answers with probabilities.

Nothing is decoded here and far fewer bytes cross the network (the encoded file instead of uint8
clips). :class:`TritonVideoPredictor` is a :class:`TritonPredictor` (same connection checks, same
clip spec read from the served config, one client per thread) whose :meth:`~TritonVideoPredictor.predict`
takes the bytes of encoded files and answers, per video, its probabilities or the server's reason
it could not classify it. :class:`sfdeploy.client.Classifier` plugs it in for
``sfdeploy infer --server-decode``: same rows, same ``--resume``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from sfdeploy.artifacts import (
    DECODE_PARAMETER,
    DECODE_REFUSED,
    DECODER_OUTPUT,
    DECODER_REASON_OUTPUT,
    ERROR_OUTPUT,
    OUTPUT_NAME,
    VIDEO_INPUT,
    video_model_name,
)
from sfdeploy.decode.clips import DecodedBy, DecodeFailure, ServerDecoded
from sfdeploy.errors import InputError, ServingError
from sfdeploy.runtime.triton import TritonPredictor

# How Triton's queue policy refuses a request when too many wait, or it waited too long (503 / UNAVAILABLE).
BUSY = ("Exceeds maximum queue size", "Request timeout expired")


class TritonVideoPredictor(TritonPredictor):
    """Classifies encoded videos with ``<model>_video`` (``model`` names the model, as everywhere)."""

    def __init__(self, url: str, *, model: str, protocol: str = "http", timeout_s: float = 600.0) -> None:
        super().__init__(url=url, model=video_model_name(model), protocol=protocol, timeout_s=timeout_s)
        if self.input_name != VIDEO_INPUT:
            raise ServingError(f"model '{self.model}' does not take encoded videos (its input is '{self.input_name}')",
                               fix="serve a repository written by `sfdeploy repo` (it writes <name>_video)")
        # a repository written before the decoder outputs: no decoder in the rows
        self.outputs = [name for name in (OUTPUT_NAME, ERROR_OUTPUT, DECODER_OUTPUT, DECODER_REASON_OUTPUT)
                        if name in self.served_outputs or name in (OUTPUT_NAME, ERROR_OUTPUT)]
        self.parameters: dict[str, str] = {}

    def ask_decode(self, decode: str) -> None:
        """Where the server is asked to decode this predictor's requests (``--decode`` with
        ``--server-decode``): ``auto`` as its repository says, ``cpu``, or ``gpu`` (NVDEC; a server
        without it refuses the request), sent as the request parameter ``decode``."""
        from sfdeploy.decode.gpu.select import SERVER_DECODE_MODES

        if decode not in SERVER_DECODE_MODES:
            raise InputError(f"--decode {decode} with --server-decode: the server chooses among its own decoders",
                             fix=f"use --decode {' or '.join(SERVER_DECODE_MODES)}")
        self.parameters = {} if decode == "auto" else {DECODE_PARAMETER: decode}

    def predict(self, videos: Sequence[bytes]) -> list[ServerDecoded | str]:  # type: ignore[override]
        """For each encoded video: its probabilities ``[num_classes]`` and the server's decoder, or why
        the server could not classify it (a ``str``). Raises :class:`ServingError` if the server fails
        as a whole."""
        answers: list[ServerDecoded | str] = []
        for start in range(0, len(videos), self.max_batch):
            answers += self._infer_videos(videos[start:start + self.max_batch])
        return answers

    def _infer_videos(self, videos: Sequence[bytes]) -> list[ServerDecoded | str]:
        from tritonclient.utils import InferenceServerException

        data = np.empty((len(videos), 1), dtype=np.object_)  # one encoded file per item (np.array would pad)
        data[:, 0] = list(videos)
        request = self.module.InferInput(VIDEO_INPUT, list(data.shape), "BYTES")
        request.set_data_from_numpy(data)
        outputs = [self.module.InferRequestedOutput(name) for name in self.outputs]
        try:
            result = self._client().infer(self.model, [request], outputs=outputs, parameters=self.parameters or None)
        except InferenceServerException as exc:
            if DECODE_REFUSED in (exc.message() or ""):  # the request's --decode, not its videos: the run stops
                raise ServingError(f"the server at {self.url} refused the request: {exc.message()}",
                                   fix="ask for a decoder it has (--decode auto or cpu with --server-decode)") from exc
            if len(videos) == 1 and str(exc.status()) in self.wire.invalid_input:  # this video's own error
                return [exc.message() or str(exc)]
            if any(reason in exc.message() for reason in BUSY):  # its queue policy (`sfdeploy repo --decode-*`)
                raise ServingError(f"the server at {self.url} is busy and refused the request ({exc.message()})",
                                   fix="retry later, or send fewer requests at once (--concurrency)") from exc
            raise ServingError(f"inference on {self.url} failed ({exc})",
                               fix="check that the server still runs (`sfdeploy serve` log)") from exc
        except Exception as exc:  # a broken connection: tritonclient raises several types
            raise ServingError(f"inference on {self.url} failed ({type(exc).__name__}: {exc})",
                               fix="check that the server still runs (`sfdeploy serve` log)") from exc
        return _answers(result, len(videos))


def _answers(result: object, count: int) -> list[ServerDecoded | str]:
    """Per video of a response: its error, or its probabilities with the decoder the server says."""
    def texts(name: str) -> list[str]:
        array = result.as_numpy(name)  # type: ignore[attr-defined]
        return [""] * count if array is None else [item.decode() for item in array.reshape(-1)]

    decoders, reasons = texts(DECODER_OUTPUT), texts(DECODER_REASON_OUTPUT)
    probs = result.as_numpy(OUTPUT_NAME)  # type: ignore[attr-defined]
    return [error or ServerDecoded(row, DecodedBy(decoder, reason))
            for row, error, decoder, reason in zip(probs, texts(ERROR_OUTPUT), decoders, reasons, strict=True)]


def read_encoded(paths: Sequence[str]) -> Iterator[tuple[int, bytes | DecodeFailure]]:
    """``(index, the file's bytes)``, or a :class:`DecodeFailure` for a file that cannot be read:
    what server-side decoding sends instead of decoded clips."""
    for index, path in enumerate(paths):
        try:
            with open(path, "rb") as handle:
                yield index, handle.read()
        except OSError as exc:
            yield index, DecodeFailure(path, f"cannot read the file ({exc.strerror}); check the path and its "
                                             "permissions")
