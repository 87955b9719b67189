"""One video decoder for training and serving: decord, and PyAV on exactly the streams decord
mis-decodes.

Why two. decord 0.6.0 is MMAction2's decoder, but it cannot read some frame widths: measured over
every width from 16 to 1920 px (h264, yuv420p and yuv444p, several heights), widths 16, 24, 48
and 72 fail in ``get_batch`` with "Check failed: from_size == to_size ... DECORDArrayCopyFromTo"
(its RGB copy expects unpadded rows). PyAV (FFmpeg, bundled) decodes every width, and wherever
both decode, PyAV's ``rgb24`` frames are byte-identical to decord's (``tests/test_decode_sweep.py``
checks the whole sweep). So :class:`Video` decodes with decord, and switches to PyAV on that error
and only on it. Any other failure is the video's own (a damaged file): trying a second decoder on
what the first calls corrupt would give pixels that nothing has checked.

Counting and indexing are decord's for both decoders: the frame count is the number of packets of
the video stream (decord's index; PyAV decodes exactly as many frames on every sweep clip), and
index ``i`` is the ``i``-th frame in presentation order. The sampled indices therefore do not
depend on which decoder delivers the pixels. PyAV decodes sequentially from the start (no
seeking, so every index is exact) and keeps only the frames asked for.

A source is a path or the bytes of an encoded file; both decoders read from memory, so bytes need
no temporary file.

Hostile input costs bounded memory. A small file can declare huge frames (a 0.8 MB h264 mp4 of
four 8192x8192 frames took 8 GB to classify): every video is probed first, its stream header read
by FFmpeg with decoding capped at the limit (``max_pixels``), and a stream whose frames are larger
than :data:`MAX_VIDEO_PIXELS` (or the caller's ``max_pixels``) is refused (``frame_too_large``)
before any frame is allocated. The number of frames decoded is the caller's (the clip spec's
sampled indices), never the file's: a 20,000-frame video decodes the same 32 frames as any other,
so one decode holds at most ``len(indices) x max_pixels x 3`` bytes of frames.

Everything that decodes goes through here: the client and server-side decoding
(:mod:`sfdeploy.decode.clips`, :mod:`sfdeploy.decode.pool`), ``data prepare``'s probe
(:mod:`sfdeploy.data.probe`) and MMAction2 training/inference (:mod:`sfdeploy.train.transforms`).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sfdeploy.errors import InputError

if TYPE_CHECKING:  # numpy is imported where frames are made: the CLI reads this module's limits at start
    import numpy as np

Source = str | os.PathLike | bytes | bytearray | memoryview

#: The largest frame decoded by default (DCI 4K, 4096x2160): larger streams are refused before
#: decoding. The one default of ``--max-video-pixels`` (``data prepare``, ``infer``, ``repo``).
MAX_VIDEO_SIZE: tuple[int, int] = (4096, 2160)
MAX_VIDEO_PIXELS: int = MAX_VIDEO_SIZE[0] * MAX_VIDEO_SIZE[1]

#: Which CPU decoder :class:`Video` reads with: ``auto`` (decord, PyAV on the streams decord
#: mis-decodes: what training and serving use) or ``pyav`` (PyAV for every stream).
CPU_DECODERS = ("auto", "pyav")

#: The message of decord's width bug: the one decord error on which PyAV takes over.
DECORD_MISDECODE = "DECORDArrayCopyFromTo"

#: Why a video cannot be decoded (a stable code, used in reports) -> what the user can do (the
#: error's message says what happened; the fix only what to do about it).
FIXES: dict[str, str] = {
    "not_found": "check the path",
    "zero_bytes": "copy it again from its source, or remove it",
    "unreadable": "if it is a video, re-encode it (e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`); else remove it",
    "no_frames": "re-encode it or remove it",
    "corrupt": "re-encode it (a truncated or damaged file) or remove it",
    "frame_too_large": "re-encode it smaller (e.g. `ffmpeg -i IN -vf scale=-2:1080 OUT.mp4`), or raise the limit "
    "with --max-video-pixels (`data prepare`, `infer`; `repo` for a server's <name>_video)",
    # what a worker process reports (sfdeploy.workers) when decoding kills or hangs it
    "decoder_crash": "re-encode it or remove it",
    "timeout": "re-encode it or remove it",
}
#: reasons whose message is the whole story; the others are "cannot decode: <why>" in a row
PLAIN_REASONS = ("not_found", "zero_bytes", "frame_too_large")


def worker_failure_reason(kind: str) -> str:
    """The :data:`FIXES` code of a decode worker that failed (``WorkerFailure.kind``)."""
    return {"crash": "decoder_crash", "timeout": "timeout"}.get(kind, "unreadable")


class DecodeError(InputError):
    """A video that cannot be decoded; ``reason`` is one of :data:`FIXES`' keys (not_found,
    zero_bytes, unreadable, no_frames, corrupt, frame_too_large)."""

    def __init__(self, message: str, *, reason: str, path: str) -> None:
        self.reason = reason
        super().__init__(message, path=path, fix=FIXES[reason])


_DECORD_LOCATION = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\] ")  # decord's "[<the source>] " before its reason


def short_error(exc: BaseException) -> str:
    """Why a decoder failed, in one readable line: FFmpeg's own reason (PyAV), or the first line of
    the exception without decord's source location and without the source's name (the error names
    it already)."""
    reason = getattr(exc, "strerror", None)  # av.FFmpegError: FFmpeg's text, without errno and path
    if isinstance(reason, str) and reason:
        return f"FFmpeg: {reason}"
    lines = str(exc).strip().splitlines()
    text = _SOURCE_PREFIX.sub("", _DECORD_LOCATION.sub("", lines[0] if lines else "")).strip()
    return (text or type(exc).__name__)[:300]


_FD2 = threading.Lock()  # one capture of the process's stderr at a time
_FFMPEG_LOG = re.compile(r"^\[[\w,]+ @ 0x[0-9a-f]+\] ")  # "[mov,mp4,m4a @ 0x55...] moov atom not found"


@contextlib.contextmanager
def _decord_log_captured() -> Iterator[list[str]]:
    """What decord's C++ writes to the process's stderr (fd 2) in the block, taken off it.

    Opening a source it cannot read, decord logs ``video_reader.cc:83: ERROR opening: <source>,
    <reason>`` straight to fd 2 (for bytes, the source is the upload itself), its FFmpeg logs
    ``[mov,mp4,... @ 0x...] moov atom not found``, and then it raises a vaguer error. The reasons
    (decord's first) are handed to the caller for its own message; anything else written to fd 2
    meanwhile (another thread's output) is passed on when the block ends."""
    reasons: list[str] = []
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to capture
        yield reasons
        return
    with _FD2, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        os.dup2(sink.fileno(), 2)
        try:
            yield reasons
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines(keepends=True):
                if "video_reader.cc" in line and "ERROR opening" in line:
                    reasons.insert(0, line.rstrip().rpartition(", ")[2])  # its reason, not the source
                elif _FFMPEG_LOG.match(line):  # decord's FFmpeg on the same source
                    reasons.append(_FFMPEG_LOG.sub("", line).strip())
                else:
                    os.write(2, line.encode())


def describe(source: Source) -> str:
    """How a source is named in errors: its path, or its size when it is bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes of an encoded video>"
    return str(source)


class Video:
    """An opened video: :attr:`num_frames`, :attr:`fps`, :attr:`width`, :attr:`height`, and
    :meth:`frames` at any indices.

    :attr:`decoder` is ``"decord"`` until decord turns out to mis-decode the stream (found on the
    first :meth:`frames` call), ``"pyav"`` after; ``decoder="pyav"`` decodes with PyAV from the
    start (the fidelity harness compares the two, :mod:`sfdeploy.bench.fidelity`). Counting
    and indexing stay decord's either way. :attr:`codec` and :attr:`pix_fmt` are the stream's, from
    its header (what a GPU decoder's capability check reads, :mod:`sfdeploy.decode.gpu.select`).
    Raises :class:`DecodeError` for a source that cannot be opened, has no frames, or has frames of
    more than ``max_pixels`` pixels.
    """

    def __init__(self, source: Source, *, max_pixels: int = MAX_VIDEO_PIXELS, decoder: str = "auto") -> None:
        import decord

        if decoder not in CPU_DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(CPU_DECODERS)}, not {decoder!r}")
        self.name = describe(source)
        self.max_pixels = max_pixels
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._source: str | bytes = bytes(source)
            if not self._source:
                raise DecodeError("the file is empty (0 bytes)", reason="zero_bytes", path=self.name)
        else:
            self._source = os.fspath(source)
            if not os.path.isfile(self._source):
                raise DecodeError("file not found", reason="not_found", path=self.name)
            if os.path.getsize(self._source) == 0:
                raise DecodeError("the file is empty (0 bytes)", reason="zero_bytes", path=self.name)
        self.width, self.height = self._probe()
        with _decord_log_captured() as decord_says:
            try:
                self._decord: Any = decord.VideoReader(self._open(), num_threads=1)
            except (decord.DECORDError, RuntimeError) as exc:  # RuntimeError: decord's "Error reading ..."
                failure: BaseException | None = exc
            except AssertionError as exc:  # decord asserts a positive frame count
                raise DecodeError("it has no frames", reason="no_frames", path=self.name) from exc
            else:
                failure = None
        if failure is not None:
            raise DecodeError(f"decord fails to open it ({decord_says[0] if decord_says else short_error(failure)})",
                              reason="unreadable", path=self.name) from failure
        self.num_frames = len(self._decord)
        self.fps = float(self._decord.get_avg_fps())
        self.decoder = "pyav" if decoder == "pyav" else "decord"

    def _probe(self) -> tuple[int, int]:
        """(width, height) of the video stream, from its header, before decord opens it.

        FFmpeg reads the header with its decoders capped at ``max_pixels`` (its own option), so
        probing a bomb allocates no frame of it; a larger stream is refused here. A source FFmpeg
        cannot open is refused before decord sees it, too: decord prints a failed source's *content*
        to stderr as its name (a whole upload, into a server's log)."""
        import av

        try:
            with av.open(self._open(), options=self._codec_options()) as container:  # every stream's decoder
                stream = container.streams.best("video")  # decord's choice: av_find_best_stream
                if stream is None:
                    raise DecodeError("it has no video stream", reason="unreadable", path=self.name)
                width, height = int(stream.codec_context.width), int(stream.codec_context.height)
                self.codec = str(stream.codec_context.name)
                self.pix_fmt = str(stream.codec_context.pix_fmt or "")
        except av.FFmpegError as exc:
            raise DecodeError(f"not a video, or its header is damaged ({short_error(exc)})", reason="unreadable",
                              path=self.name) from exc
        if not (width and height):  # the capped decoder refused its first frame: no size without decoding it
            raise DecodeError(f"the decoder cannot read a frame of it within the limit of {self.max_pixels:,} "
                              "pixels (larger frames, or a damaged stream); not decoded", reason="frame_too_large",
                              path=self.name)
        self._check_size(width, height)
        return width, height

    def _codec_options(self) -> dict[str, str]:
        """FFmpeg decoder options: no frame over the limit is ever allocated."""
        return {"max_pixels": str(self.max_pixels)}

    def _check_size(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise DecodeError(f"frames of {width}x{height} ({width * height:,} pixels) are over the limit of "
                              f"{self.max_pixels:,} pixels; not decoded", reason="frame_too_large", path=self.name)

    def _open(self) -> Any:
        """What the decoders read: the path, or a file object over the bytes."""
        return io.BytesIO(self._source) if isinstance(self._source, bytes) else self._source

    def frames(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 RGB frames ``[len(indices), H, W, 3]`` at ``indices`` (any order, repeats allowed),
        as MMAction2's ``DecordDecode`` (accurate mode) returns them."""
        import decord
        import numpy as np

        wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
        if wanted.size == 0:
            raise ValueError("no frame indices given")
        if wanted.min() < 0 or wanted.max() >= self.num_frames:
            raise IndexError(f"frame indices {wanted.min()}..{wanted.max()} outside 0..{self.num_frames - 1} "
                             f"of {self.name}")
        if self.decoder == "decord":
            try:
                frames = self._decord.get_batch(wanted).asnumpy()
            except decord.DECORDError as exc:
                if DECORD_MISDECODE not in str(exc):
                    raise DecodeError(f"decoding fails partway ({short_error(exc)})", reason="corrupt",
                                      path=self.name) from exc
                self.decoder = "pyav"  # decord's width bug: this stream is PyAV's from now on
                self._decord = None
        if self.decoder == "pyav":
            frames = self._pyav_frames(wanted)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise DecodeError(f"decoded frames have shape {frames.shape} ({frames.dtype}), expected "
                              "uint8 [T, H, W, 3]", reason="corrupt", path=self.name)
        return frames

    def _pyav_frames(self, wanted: np.ndarray) -> np.ndarray:
        import av
        import numpy as np
        from av.video.reformatter import VideoReformatter

        needed = set(wanted.tolist())
        last = int(wanted.max())
        kept: dict[int, np.ndarray] = {}
        decoded = 0
        try:
            with av.open(self._open()) as container:
                stream = container.streams.best("video")  # decord's choice: av_find_best_stream
                if stream is None:
                    raise DecodeError("PyAV finds no video stream", reason="unreadable", path=self.name)
                stream.codec_context.thread_count = 1  # as decord's num_threads=1: workers are the parallelism
                stream.codec_context.options = self._codec_options()  # a stream that grows mid-way too
                # One reformatter for the stream: frame.to_ndarray(format="rgb24") builds a new
                # swscale context per frame (same pixels, most of the time on small frames).
                rgb = VideoReformatter()
                for frame in container.decode(stream):
                    self._check_size(frame.width, frame.height)
                    if decoded in needed:
                        kept[decoded] = rgb.reformat(frame, format="rgb24").to_ndarray()
                    decoded += 1
                    if decoded > last:
                        break
        except av.FFmpegError as exc:
            raise DecodeError(f"decoding fails partway ({short_error(exc)})", reason="corrupt", path=self.name) from exc
        if decoded <= last:
            raise DecodeError(f"PyAV decoded {decoded} frames, the stream's index lists {self.num_frames}",
                              reason="corrupt", path=self.name)
        return np.stack([kept[i] for i in wanted.tolist()])

    def close(self) -> None:
        """Drop decord's reader (its file and buffers) now rather than when the object is collected."""
        self._decord = None

    def __len__(self) -> int:
        return self.num_frames

    def __enter__(self) -> Video:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_video(source: Source, *, max_pixels: int = MAX_VIDEO_PIXELS, decoder: str = "auto") -> Video:
    """Open a video from a path or from the bytes of an encoded file (see :class:`Video`)."""
    return Video(source, max_pixels=max_pixels, decoder=decoder)

