"""One video decoder for training and serving: PyAV, with FFmpeg's pixel limit on every frame,
reproducing decord's (MMAction2's decoder) frame index and pixels.

Why not decord. decord 0.6.0 is MMAction2's decoder, and its index is what sampling reads: the
frame count is the number of packets of the video stream, and index ``i`` is the ``i``-th frame in
presentation order. But decord cannot cap the size of what it decodes: a stream whose header (and
first frames) say 64x64 and whose later frames are 8192x8192 (two MPEG-TS h264 segments, one after
the other) was decoded whole, 358 MB for a 200 KB file in one process and 2.27 GB of a server's
process tree for a 447 KB request; and to read from memory it copies the bytes twice (an upload is
up to the server's limit). So PyAV (FFmpeg, bundled) does both jobs: it counts the stream's
packets (decord's index, without decoding) and decodes every frame with FFmpeg's own
``max_pixels`` codec option, which refuses to allocate any frame over the limit, wherever in the
stream it appears. Such a video is refused (``frame_too_large``) as soon as the frame appears, with
its size, from FFmpeg's log (``Picture size WxH exceeds specified max pixel count``) or the
decoder's size; any other decoding error is the video's own (``corrupt``). Refusing that stream
costs 40 MB in a fresh interpreter, 66 MB of a server's process tree (``tests/test_bad_inputs.py``,
``tests/test_limits.py``).

Nothing is lost by it. Wherever decord decodes, PyAV's ``rgb24`` frames are byte-identical to
decord's, and PyAV counts and decodes exactly as many frames as decord's index counts
(``tests/test_decode_sweep.py`` checks every width from 16 to 1920 px, h264 yuv420p and
yuv444p; the fidelity harness's CPU check, :mod:`sfdeploy.bench.fidelity`, checks h264, hevc,
mpeg4, vp9 and mjpeg), except odd-sized 4:2:0 VP9 (up to 12 grey levels apart: the two wheels'
FFmpeg versions). PyAV also decodes the widths decord cannot (16, 24, 48 and 72 px fail in decord's
``get_batch`` with "Check failed: from_size == to_size ... DECORDArrayCopyFromTo"). It is not
slower (CPU time, best of 3, decord vs PyAV: 480x360 x 300 frames 0.246 vs 0.216 s, ten such
clips 0.574 vs 0.424 s; 1080p x 150 frames 1.643 vs 1.276 s, ten 5.226 vs 3.748 s). PyAV decodes
sequentially from the start (no seeking, so every index is exact) up to the last index asked for,
and keeps only the frames asked for, each at the header's size (a stream whose frames change size
within the limit is scaled to it, as decord scales to its reader's size; not byte-identical to
decord's scaling); on long videos with short GOPs, seeking to the keyframe before the first
sampled index would save work (not done).

A source is a path or the bytes of an encoded file (``bytes``, or a view, which a decode worker
gets: never copied); PyAV reads from memory, so bytes need no temporary file.

Hostile input costs bounded memory. A small file can declare huge frames (a 0.8 MB h264 mp4 of
four 8192x8192 frames took 8 GB to classify): every video is probed first, its stream header read
by FFmpeg with decoding capped at the limit, and a stream whose frames are larger than
:data:`MAX_VIDEO_PIXELS` (or the caller's ``max_pixels``) is refused (``frame_too_large``) before
any frame is allocated; a frame over the limit later in the stream is refused by the decoder
itself. The number of frames decoded is the caller's (the clip spec's sampled indices), never the
file's: a 20,000-frame video keeps the same 32 frames as any other, so one decode holds at most
``len(indices) x max_pixels x 3`` bytes of frames.

Everything that decodes on the CPU goes through here: the client and server-side decoding
(:mod:`sfdeploy.decode.clips`, :mod:`sfdeploy.decode.pool`), ``data prepare``'s probe
(:mod:`sfdeploy.data.probe`) and MMAction2 training/inference (:mod:`sfdeploy.train.transforms`).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
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


_AV_LOG_LOCK = threading.Lock()
_AV_LOG: dict[str, Any] = {"users": 0, "raised": False, "saved": None}  # the blocks below, and what they changed
#: FFmpeg's av_image_check_size2: why a frame's buffer is refused ("... exceeds specified max pixel count N")
_PICTURE_SIZE = re.compile(r"Picture size (\d+)x(\d+) (?:exceeds|is invalid)")


@contextlib.contextmanager
def _ffmpeg_errors_captured() -> Iterator[list[tuple[int, str, str]]]:
    """FFmpeg's error lines ``(level, name, message)`` logged by this thread in the block.

    A decoder refusing a frame over ``max_pixels`` fails with a plain EINVAL or ENOMEM (which also
    mean a damaged stream); only its log says the size. PyAV drops FFmpeg's log unless a level is
    set (its default, None), so the level is raised to ERROR while any such block runs (the first
    of concurrent blocks raises it, the last restores it) and this thread's lines are taken with
    ``av.logging.Capture``; another thread's errors meanwhile go to Python's ``libav`` logger."""
    import av.logging

    with _AV_LOG_LOCK:
        if _AV_LOG["users"] == 0:
            level = av.logging.get_level()
            _AV_LOG["saved"], _AV_LOG["raised"] = level, level is None or level < av.logging.ERROR
            if _AV_LOG["raised"]:
                av.logging.set_level(av.logging.ERROR)
        _AV_LOG["users"] += 1
    try:
        with av.logging.Capture(local=True) as logs:
            yield logs
    finally:
        with _AV_LOG_LOCK:
            _AV_LOG["users"] -= 1
            if _AV_LOG["users"] == 0 and _AV_LOG["raised"]:
                av.logging.set_level(_AV_LOG["saved"])


class _ViewFile(io.RawIOBase):
    """A read-only, seekable file over a memoryview, without the copy ``io.BytesIO`` makes of
    anything but ``bytes`` (how a decode worker receives an upload: a view of its message)."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        size = max(0, min(len(buffer), len(self._view) - self._pos))
        buffer[:size] = self._view[self._pos:self._pos + size]
        self._pos += size
        return size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def describe(source: Source) -> str:
    """How a source is named in errors: its path, or its size when it is bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes of an encoded video>"
    return str(source)


def _count_packets(container: Any, stream: Any) -> int:
    """The packets of ``stream`` (decord's frame index), read without decoding, up to the end or the
    first read error (a damaged tail: what decord's index counts too)."""
    import av

    count = 0
    try:
        for packet in container.demux(stream):
            count += bool(packet.size)  # PyAV ends with an empty packet of its own (the decoder's flush)
    except av.FFmpegError:
        pass
    return count


class Video:
    """An opened video: :attr:`num_frames`, :attr:`fps`, :attr:`width`, :attr:`height`, and
    :meth:`frames` at any indices.

    PyAV counts :attr:`num_frames` as decord's index does and reads :attr:`fps` as decord does, and
    decodes the frames, capped at ``max_pixels`` (see the module docstring). :attr:`decoder` is the CPU
    decoder that delivers the pixels, ``"pyav"`` (the ``decoder`` column of a row).
    :attr:`codec` and :attr:`pix_fmt` are the stream's, from its header (what a GPU decoder's
    capability check reads, :mod:`sfdeploy.decode.gpu.select`). Raises :class:`DecodeError` for a
    source that cannot be opened, has no frames, or has frames of more than ``max_pixels`` pixels
    (in its header here, anywhere later in :meth:`frames`).
    """

    #: which decoder delivers the frames: PyAV, for every stream
    decoder = "pyav"

    def __init__(self, source: Source, *, max_pixels: int = MAX_VIDEO_PIXELS) -> None:
        self.name = describe(source)
        self.max_pixels = max_pixels
        if isinstance(source, (bytes, bytearray, memoryview)):
            # kept as given, never copied: an upload is as large as the server's limit (a decode worker gets a view)
            self._source: str | bytes | memoryview = source if isinstance(source, bytes) else memoryview(source)
            if not len(self._source):
                raise DecodeError("the file is empty (0 bytes)", reason="zero_bytes", path=self.name)
        else:
            self._source = os.fspath(source)
            if not os.path.isfile(self._source):
                raise DecodeError("file not found", reason="not_found", path=self.name)
            if os.path.getsize(self._source) == 0:
                raise DecodeError("the file is empty (0 bytes)", reason="zero_bytes", path=self.name)
        self.width, self.height, self.num_frames, self.fps = self._probe()

    def _probe(self) -> tuple[int, int, int, float]:
        """(width, height, frame count, average frame rate) of the video stream, from its header and
        its packets, in one pass that decodes nothing over the limit.

        FFmpeg reads the header with its decoders capped at ``max_pixels`` (its own option), so
        probing a bomb allocates no frame of it; a larger stream is refused here, before its packets
        are read. The count is decord's index (what MMAction2 samples from: the packets of the video
        stream, up to the first read error) without decord: PyAV demuxes the same packets, and count
        and rate equal decord's ``len()`` and ``get_avg_fps()`` on all 229 videos checked (the sweep,
        every codec of the fidelity harness, the bad-input matrix's usable ones, the demo's). decord
        would also copy an upload twice to read it from memory."""
        import av

        try:
            with av.open(self._open(), options=self._codec_options()) as container:  # every stream's decoder
                stream = container.streams.best("video")  # decord's choice: av_find_best_stream
                if stream is None:
                    raise DecodeError("it has no video stream", reason="unreadable", path=self.name)
                width, height = int(stream.codec_context.width), int(stream.codec_context.height)
                self.codec = str(stream.codec_context.name)
                self.pix_fmt = str(stream.codec_context.pix_fmt or "")
                if not (width and height):  # the capped decoder refused its first frame: no size without it
                    raise DecodeError(f"the decoder cannot read a frame of it within the limit of "
                                      f"{self.max_pixels:,} pixels (larger frames, or a damaged stream); not decoded",
                                      reason="frame_too_large", path=self.name)
                self._check_size(width, height)
                rate = stream.average_rate
                frames = _count_packets(container, stream)
        except av.FFmpegError as exc:
            raise DecodeError(f"not a video, or its header is damaged ({short_error(exc)})", reason="unreadable",
                              path=self.name) from exc
        if not frames:
            raise DecodeError("it has no frames", reason="no_frames", path=self.name)
        return width, height, frames, float(rate) if rate else 0.0

    def _codec_options(self) -> dict[str, str]:
        """FFmpeg decoder options: no frame over the limit is ever allocated."""
        return {"max_pixels": str(self.max_pixels)}

    def _check_size(self, width: int, height: int, *, at: int | None = None) -> None:
        """Refuse frames over the limit: the header's, or (``at``) the frame the decoder met there."""
        if width * height > self.max_pixels:
            where = "" if at is None else (f" from frame {at} on (the header says {self.width}x{self.height}), "
                                           "decoding stopped there")
            raise DecodeError(f"frames of {width}x{height} ({width * height:,} pixels) are over the limit of "
                              f"{self.max_pixels:,} pixels{where}; not decoded", reason="frame_too_large",
                              path=self.name)

    def _open(self) -> Any:
        """What the decoders read: the path, or a file object over the bytes (neither copies them)."""
        if isinstance(self._source, bytes):
            return io.BytesIO(self._source)  # shares the bytes until written to, which no decoder does
        if isinstance(self._source, memoryview):
            return _ViewFile(self._source)
        return self._source

    def frames(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 RGB frames ``[len(indices), H, W, 3]`` at ``indices`` (any order, repeats allowed),
        as MMAction2's ``DecordDecode`` (accurate mode) returns them; :class:`DecodeError`
        (``frame_too_large``) as soon as a frame over the limit appears before the last index."""
        import numpy as np

        wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
        if wanted.size == 0:
            raise ValueError("no frame indices given")
        if wanted.min() < 0 or wanted.max() >= self.num_frames:
            raise IndexError(f"frame indices {wanted.min()}..{wanted.max()} outside 0..{self.num_frames - 1} "
                             f"of {self.name}")
        frames = self._pyav_frames(wanted)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise DecodeError(f"decoded frames have shape {frames.shape} ({frames.dtype}), expected "
                              "uint8 [T, H, W, 3]", reason="corrupt", path=self.name)
        return frames

    def _pyav_frames(self, wanted: np.ndarray) -> np.ndarray:
        """Decode from the start to the last wanted index, keeping the wanted frames; FFmpeg's
        ``max_pixels`` refuses a larger frame before its buffer is allocated."""
        import av
        import numpy as np
        from av.video.reformatter import VideoReformatter

        needed = set(wanted.tolist())
        last = int(wanted.max())
        kept: dict[int, np.ndarray] = {}
        decoded = 0
        context: Any = None
        with _ffmpeg_errors_captured() as logs:
            try:
                with av.open(self._open()) as container:
                    stream = container.streams.best("video")  # decord's choice: av_find_best_stream
                    if stream is None:
                        raise DecodeError("PyAV finds no video stream", reason="unreadable", path=self.name)
                    context = stream.codec_context
                    context.thread_count = 1  # as decord's num_threads=1: workers are the parallelism
                    context.options = self._codec_options()  # every frame, a stream that grows mid-way too
                    # One reformatter for the stream: frame.to_ndarray(format="rgb24") builds a new
                    # swscale context per frame (same pixels, most of the time on small frames).
                    rgb = VideoReformatter()
                    for frame in container.decode(stream):
                        self._check_size(frame.width, frame.height, at=decoded)
                        if decoded in needed:  # a frame of another size (within the limit): the header's
                            kept[decoded] = rgb.reformat(frame, format="rgb24", width=self.width,
                                                         height=self.height).to_ndarray()
                        decoded += 1
                        if decoded > last:
                            break
            except av.FFmpegError as exc:
                self._refuse_large_frame(logs, context, decoded)
                raise DecodeError(f"decoding fails partway ({short_error(exc)})", reason="corrupt",
                                  path=self.name) from exc
        if decoded <= last:
            raise DecodeError(f"PyAV decoded {decoded} frames, the stream's index lists {self.num_frames}",
                              reason="corrupt", path=self.name)
        return np.stack([kept[i] for i in wanted.tolist()])

    def _refuse_large_frame(self, logs: list[tuple[int, str, str]], context: Any, at: int) -> None:
        """After a decoding error: :class:`DecodeError` ``frame_too_large`` if the decoder met a
        frame over the limit (FFmpeg's log names its size; else the decoder's size, which h264 sets
        before the buffer is refused). Any other error stays the stream's own."""
        for _, _, message in logs:
            size = _PICTURE_SIZE.search(message)
            if size:
                self._check_size(int(size[1]), int(size[2]), at=at)
        if context is not None:
            self._check_size(int(context.width or 0), int(context.height or 0), at=at)

    def close(self) -> None:
        """Nothing is held open between calls (each :meth:`frames` call opens the source): kept so
        that a ``with`` block reads as one."""

    def __len__(self) -> int:
        return self.num_frames

    def __enter__(self) -> Video:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_video(source: Source, *, max_pixels: int = MAX_VIDEO_PIXELS) -> Video:
    """Open a video from a path or from the bytes of an encoded file (see :class:`Video`)."""
    return Video(source, max_pixels=max_pixels)
