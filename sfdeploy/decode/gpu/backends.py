"""The two GPU decoders, read through their documented APIs, and the resize and crop on the GPU.

A reader returns the frames at the asked indices as uint8 RGB ``[n, H, W, 3]`` on its CUDA device
(no host round trip), or raises :class:`GpuDecodeFailed` with the reason, and the CPU decoder
reads that stream instead (:mod:`sfdeploy.decode.gpu.route`). Indices are the CPU path's
(:func:`sfdeploy.preprocess.sample_indices` over decord's frame count): a reader whose own count
of the stream's frames differs refuses the stream rather than give other frames.

The pixel limit. NVDEC allocates its surfaces before anything here sees a frame, so it cannot be
capped as FFmpeg's ``max_pixels`` caps the CPU decoder; what is checked is each decoded batch's
size: a frame other than the header's size fails the stream, and one over the pool's
``max_pixels`` (a stream that grows past the limit after its header) refuses the video with the
CPU decoder's ``frame_too_large`` :class:`~sfdeploy.decode.DecodeError`. pynvvideocodec is given
the header's size as its largest (``max_width``/``max_height``) and fails on a larger frame.

* pynvvideocodec (NVIDIA, ``PyNvVideoCodec.SimpleDecoder``): reads a file (a seekable container;
  a video in memory, as ``<name>_video`` receives it, is written to a private file in
  memory-backed storage for the call, :func:`spooled`, and removed after it),
  ``get_batch_frames_by_index`` decodes the frames at sorted, unique indices; with
  ``OutputColorType.RGB`` each frame is interleaved RGB in device memory, exported by DLPack
  (ordered after the decoder's own stream by its event). ``max_width``/``max_height`` are the
  header's size: a stream that grows mid-way fails rather than allocate larger surfaces.
* torchcodec (``torchcodec.decoders.VideoDecoder(device="cuda")`` with the ``nvdec`` CUDA
  backend): reads a file or bytes; ``get_frames_at`` returns ``[n, H, W, 3]`` (``NHWC``) on the GPU.
  Where NVDEC cannot decode a stream torchcodec falls back to its own CPU decoding
  (``VideoDecoder.cpu_fallback``): that stream is refused here, so what is called ``nvdec`` in a
  row was NVDEC's, and the CPU path that reads it instead is sfdeploy's own.

Resize and crop (:func:`gpu_clip_views`) are :func:`sfdeploy.preprocess.clip_views` in torch:
bilinear with half-pixel centres (``align_corners=False``, no antialiasing: OpenCV's
``INTER_LINEAR``), rounded to uint8, then the same crop offsets; it runs on whatever device the
frames are on (the tests compare it with OpenCV's on the CPU: at most 1 grey level apart, OpenCV
computing in fixed point).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from sfdeploy.clipspec import ClipSpec
from sfdeploy.decode.gpu.select import StreamInfo
from sfdeploy.decode.video import MAX_VIDEO_PIXELS, DecodeError, describe
from sfdeploy.preprocess import crop_offsets, resized_size

#: frames resized at once: bounds the float32 copy (16 frames of 1080p: 400 MB)
RESIZE_CHUNK = 16


class GpuDecodeFailed(Exception):
    """The GPU decoder did not decode a stream it was given; the message says why."""


class GpuFrameSize(GpuDecodeFailed):
    """The GPU decoder returned frames of another size than the stream's header: ``size`` is
    theirs, (width, height), for :class:`GpuClipMaker` to hold against the pixel limit."""

    def __init__(self, message: str, size: tuple[int, int]) -> None:
        super().__init__(message)
        self.size = size


class GpuReader(Protocol):
    """What :class:`GpuClipMaker` needs of a GPU decoder, so that either backend (or a test's
    stand-in) can sit behind it."""

    name: str  # the backend, as in GPU_BACKENDS
    device: Any  # torch.device

    def frames(self, source: str | bytes, indices: Sequence[int], info: StreamInfo) -> Any:
        """uint8 ``[len(indices), H, W, 3]`` on :attr:`device`, at sorted unique ``indices``."""
        ...


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"


def _checked(frames: Any, indices: Sequence[int], info: StreamInfo, name: str) -> Any:
    """The reader's frames, after checking they are the asked ones at the header's size (a larger
    frame than the probe read, which the pixel limit was applied to, is refused)."""
    import torch

    expected = (len(indices), info.height, info.width, 3)
    if frames.ndim == 4 and tuple(frames.shape[1:3]) != expected[1:3]:
        raise GpuFrameSize(f"{name} returned frames of {frames.shape[2]}x{frames.shape[1]}, the header says "
                           f"{info.width}x{info.height}", (int(frames.shape[2]), int(frames.shape[1])))
    if tuple(frames.shape) != expected or frames.dtype != torch.uint8:
        raise GpuDecodeFailed(f"{name} returned {frames.dtype} {tuple(frames.shape)}, expected uint8 {expected}")
    return frames


#: where a video in memory is written for a decoder that reads files: memory-backed where there is
#: such storage (the bytes are in memory already; a disk would add its latency), else the temp dir
SPOOL_DIRS = ("/dev/shm",)


@contextlib.contextmanager
def spooled(source: str | bytes | memoryview) -> Iterator[str]:
    """A path holding ``source``: the path itself, or the bytes of a video in memory written to a
    private file (mode 0600, :data:`SPOOL_DIRS` first) that is removed when the block ends."""
    if isinstance(source, str):
        yield source
        return
    folder = next((d for d in SPOOL_DIRS if os.access(d, os.W_OK)), None)
    with tempfile.NamedTemporaryFile(prefix="sfdeploy-nvdec-", suffix=".video", dir=folder) as handle:
        handle.write(source)
        handle.flush()
        yield handle.name


class PyNvVideoCodecReader:
    """NVDEC through pynvvideocodec's ``SimpleDecoder`` (a file per call)."""

    name = "pynvvideocodec"

    def __init__(self, device: str) -> None:
        import torch

        self.device = torch.device(device)

    def frames(self, source: str | bytes, indices: Sequence[int], info: StreamInfo) -> Any:
        """The frames at sorted unique ``indices`` on :attr:`device`; :class:`GpuDecodeFailed` with the
        reason where the stream is not one pynvvideocodec decodes as the CPU index says."""
        import PyNvVideoCodec as nvc
        import torch

        try:
            with spooled(source) as path:  # the file is read while decoding: it lives until the frames are copied
                decoder = nvc.SimpleDecoder(path, gpu_id=self.device.index or 0, use_device_memory=True,
                                            max_width=info.width, max_height=info.height,
                                            output_color_type=nvc.OutputColorType.RGB)
                count = len(decoder)
                if count != info.frames:
                    raise GpuDecodeFailed(f"pynvvideocodec counts {count} frames, the CPU decoder's index "
                                          f"{info.frames}: the sampled frames would differ")
                decoded = decoder.get_batch_frames_by_index(list(indices))
                if len(decoded) != len(indices):
                    raise GpuDecodeFailed(f"pynvvideocodec returned {len(decoded)} of {len(indices)} frames")
                # A copy (stack): the decoder reuses its output surfaces for the next call.
                frames = torch.stack([torch.from_dlpack(frame) for frame in decoded])
        except GpuDecodeFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - its errors are its own classes, RuntimeError or plain
            # Exception; each means "not this stream on NVDEC", and the CPU decoder reads it instead
            raise GpuDecodeFailed(f"pynvvideocodec: {_first_line(exc)}") from exc
        return _checked(frames, indices, info, self.name)


class TorchCodecReader:
    """NVDEC through torchcodec's ``VideoDecoder`` on a CUDA device (its ``nvdec`` backend)."""

    name = "torchcodec"

    def __init__(self, device: str) -> None:
        import torch

        self.device = torch.device(device)

    def frames(self, source: str | bytes, indices: Sequence[int], info: StreamInfo) -> Any:
        """The frames at sorted unique ``indices`` on :attr:`device`; :class:`GpuDecodeFailed` where
        torchcodec would fall back to its own CPU decoding or counts other frames than the CPU index."""
        from torchcodec.decoders import VideoDecoder, set_cuda_backend

        try:
            with set_cuda_backend("nvdec"):
                decoder = VideoDecoder(source, device=str(self.device), dimension_order="NHWC", seek_mode="exact")
            if decoder.cpu_fallback:  # known at creation with the nvdec backend
                raise GpuDecodeFailed(f"NVDEC does not take it (torchcodec: {decoder.cpu_fallback})")
            count = len(decoder)
            if count != info.frames:
                raise GpuDecodeFailed(f"torchcodec counts {count} frames, the CPU decoder's index {info.frames}: "
                                      "the sampled frames would differ")
            frames = decoder.get_frames_at(list(indices)).data
        except GpuDecodeFailed:
            raise
        except (RuntimeError, ValueError, IndexError) as exc:  # torchcodec's decoding and argument errors
            raise GpuDecodeFailed(f"torchcodec: {_first_line(exc)}") from exc
        return _checked(frames, indices, info, self.name)


READERS = {"pynvvideocodec": PyNvVideoCodecReader, "torchcodec": TorchCodecReader}


def open_reader(backend: str, device: str) -> GpuReader:
    """The reader of GPU decoder ``backend`` (one of :data:`READERS`) on CUDA ``device``."""
    return READERS[backend](device)


def resize_frames(frames: Any, short_side: int) -> Any:
    """uint8 ``[n, H, W, 3]`` -> uint8 ``[n, h, w, 3]`` with the short side ``short_side``, as
    :func:`sfdeploy.preprocess.clip_views` resizes (``mmcv.rescale_size``, bilinear)."""
    import torch
    import torch.nn.functional as F

    n, height, width = (int(d) for d in frames.shape[:3])
    new_h, new_w = resized_size(height, width, short_side)
    if (new_h, new_w) == (height, width):
        return frames
    out = torch.empty((n, new_h, new_w, 3), dtype=torch.uint8, device=frames.device)
    for start in range(0, n, RESIZE_CHUNK):
        chunk = frames[start:start + RESIZE_CHUNK].permute(0, 3, 1, 2).float()
        resized = F.interpolate(chunk, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False)
        out[start:start + RESIZE_CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


def gpu_clip_views(frames: Any, order: Any, spec: ClipSpec) -> Any:
    """Decoded frames ``[u, H, W, 3]`` (the unique sampled indices) and ``order`` (for each sampled
    position, which of them: ``[num_clips * clip_len]``) -> views ``[V, T, crop, crop, 3]``, on the
    frames' device: :func:`sfdeploy.preprocess.clip_views` in torch."""
    import torch

    resized = resize_frames(frames, spec.short_side)
    new_h, new_w = int(resized.shape[1]), int(resized.shape[2])
    sampled = resized.index_select(0, torch.as_tensor(order, dtype=torch.long, device=resized.device))
    clips = sampled.reshape(spec.num_clips, spec.clip_len, new_h, new_w, 3)
    size = spec.crop_size
    views = [clips[:, :, y:y + size, x:x + size] for x, y in crop_offsets(new_h, new_w, spec)]
    return torch.cat(views, dim=0).contiguous()  # crop-major, like FormatShape


class GpuClipMaker:
    """A video's views on the GPU: the reader's frames at the unique sampled indices, resized,
    put in sampling order and cropped. Thread-safe: each thread works on its own CUDA stream (the
    threads' decoding and resizing overlap) and synchronises it before handing the clip over, so
    the clip is ready on any stream that uses it next (the model's)."""

    def __init__(self, backend: str, device: str, spec: ClipSpec, max_pixels: int = MAX_VIDEO_PIXELS) -> None:
        self.reader = open_reader(backend, device)
        self.spec, self.max_pixels = spec, max_pixels
        self._local = threading.local()

    def _stream(self) -> Any:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            import torch

            stream = self._local.stream = torch.cuda.Stream(device=self.reader.device)
        return stream

    def clip(self, source: str | bytes, info: StreamInfo, indices: Sequence[int]) -> Any:
        """uint8 ``[V, T, crop, crop, 3]`` on the reader's device; :class:`GpuDecodeFailed` if not,
        :class:`~sfdeploy.decode.DecodeError` (``frame_too_large``) for frames over the limit."""
        import numpy as np
        import torch

        unique, order = np.unique(np.asarray(indices, dtype=np.int64), return_inverse=True)
        stream = self._stream()
        with torch.cuda.device(self.reader.device), torch.cuda.stream(stream):
            try:
                frames = self.reader.frames(source, unique.tolist(), info)
                views = gpu_clip_views(frames, order, self.spec)
                stream.synchronize()
            except torch.cuda.OutOfMemoryError as exc:  # the model's batches hold the GPU: this one on the CPU
                raise GpuDecodeFailed(f"out of GPU memory ({_first_line(exc)})") from exc
            except GpuFrameSize as exc:  # the stream grew after its header: past the limit, the video's refusal
                width, height = exc.size
                if width * height > self.max_pixels:
                    raise DecodeError(f"frames of {width}x{height} ({width * height:,} pixels) are over the limit "
                                      f"of {self.max_pixels:,} pixels ({exc}); not decoded", reason="frame_too_large",
                                      path=describe(source)) from exc
                raise
        return views
