"""torch-on-CUDA mechanics the predictors and the parity gate share.

* :func:`cuda_device`: ``cuda`` / ``cuda:N`` -> the concrete ``cuda:N`` torch will use, or a clear
  error when torch cannot see it.
* :func:`exact_fp32`: IEEE fp32 convolutions and matmuls in a block, cuDNN's benchmark mode off.
  On Ampere and later GPUs cuDNN may run fp32 convolutions in TF32 (10 mantissa bits) by default;
  the fp32 parity gate compares probabilities at ~1e-4 and must neither fail nor pass by that
  rounding.
* :class:`DeviceFeeder`: how a uint8 batch reaches the GPU. A host batch is copied into a pinned
  staging buffer (kept per thread and reused, grown only for a larger batch) and sent with a
  non-blocking copy on the thread's own CUDA stream, so several threads' copies and kernels can
  overlap; the result is read back once, after the stream is synchronised (which is also what
  makes reusing the staging buffer safe). A tensor already on the device is used in place.

Everything imports torch inside functions: this module is imported by light code paths.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from sfdeploy.device import Device
from sfdeploy.runtime.base import is_torch_tensor


def cuda_device(device: str | Device) -> Device:
    """``cuda`` -> ``cuda:<current device>``, ``cuda:N`` -> itself, after checking torch sees it."""
    import torch

    name = Device(device).resolve()  # raises when torch cannot see the device
    if not name.is_cuda:
        raise ValueError(f"{device!r} is not a CUDA device")
    index = name.partition(":")[2]
    return Device(f"cuda:{index if index else torch.cuda.current_device()}")


def _fp32_flags() -> list[tuple[Any, str]]:
    """(object, attribute) pairs that decide whether torch may use TF32 for fp32 convolutions and
    matmuls. torch >= 2.9 has per-operator ``fp32_precision`` settings and raises if its legacy
    ``allow_tf32`` getters are read after only some operators were set through the new API, so
    only one of the two APIs is ever used: the new one where it exists."""
    import torch

    backends = torch.backends
    # cuDNN's benchmark mode times several algorithms and keeps the fastest, which may be a less
    # exact one (FFT, Winograd), and another on the next run: off inside the block too.
    benchmark = (backends.cudnn, "benchmark")
    try:
        backends.cuda.matmul.fp32_precision  # noqa: B018 - probing for the new API
        return [(backends.cudnn.conv, "fp32_precision"), (backends.cuda.matmul, "fp32_precision"), benchmark]
    except AttributeError:
        return [(backends.cudnn, "allow_tf32"), (backends.cuda.matmul, "allow_tf32"), benchmark]


_exact = {"lock": threading.Lock(), "depth": 0, "saved": None}


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """No TF32 inside the block for torch's cuDNN convolutions and cuBLAS matmuls; the previous
    settings come back when the last block still open (in any thread) ends, on an exception too.
    These are process-wide flags: other threads running torch meanwhile run in exact fp32 too
    (slower, never less exact)."""
    flags = _fp32_flags()
    with _exact["lock"]:
        if _exact["depth"] == 0:
            _exact["saved"] = [getattr(owner, name) for owner, name in flags]
            for owner, name in flags:
                setattr(owner, name, "ieee" if name == "fp32_precision" else False)
        _exact["depth"] += 1
    try:
        yield
    finally:
        with _exact["lock"]:
            _exact["depth"] -= 1
            if _exact["depth"] == 0:
                for (owner, name), value in zip(flags, _exact["saved"], strict=True):
                    setattr(owner, name, value)


class DeviceFeeder:
    """Runs ``fn`` on uint8 batches on one CUDA device (see the module docstring). Thread-safe:
    each thread has its own stream and staging buffer."""

    def __init__(self, device: str) -> None:
        import torch

        self.device = torch.device(cuda_device(device))
        self._local = threading.local()

    def host_buffer(self) -> Any:
        """This thread's pinned staging buffer (None before its first host batch); for tests and
        diagnostics."""
        state = getattr(self._local, "state", None)
        return state["buffer"] if state else None

    def _state(self) -> dict[str, Any]:
        state = getattr(self._local, "state", None)
        if state is None:
            import torch

            state = self._local.state = {"stream": torch.cuda.Stream(device=self.device), "buffer": None}
        return state

    def _stage(self, state: dict[str, Any], frames: Any) -> Any:
        """``frames`` (numpy, or a CPU tensor) copied into the pinned buffer; returns the view."""
        import torch

        n = int(frames.shape[0])
        buffer = state["buffer"]
        if buffer is None or buffer.shape[0] < n or tuple(buffer.shape[1:]) != tuple(frames.shape[1:]):
            buffer = state["buffer"] = torch.empty(tuple(frames.shape), dtype=torch.uint8, pin_memory=True)
        view = buffer[:n]
        if is_torch_tensor(frames):
            view.copy_(frames)
        else:
            np.copyto(view.numpy(), frames, casting="no")
        return view

    def run(self, fn: Callable[[Any], Any], frames: Any) -> np.ndarray:
        """``fn(device batch)`` -> float32 numpy on the host."""
        import torch

        if is_torch_tensor(frames) and frames.is_cuda:
            frames = frames.to(self.device).contiguous()  # no copy when it is here already, contiguous
            # The caller's tensor was made on the caller's current stream: run there, in order
            # with the work that produced it. Reading the result back synchronises that stream.
            with torch.cuda.device(self.device), torch.inference_mode():
                return fn(frames).float().cpu().numpy()
        state = self._state()
        stream = state["stream"]
        with torch.cuda.device(self.device), torch.cuda.stream(stream), torch.inference_mode():
            staged = self._stage(state, frames)
            batch = staged.to(self.device, non_blocking=True)
            result = fn(batch).float().cpu()  # a blocking copy on this stream: waits for the kernels
        # Everything queued on the stream (the upload from the staging buffer included) is done
        # before the buffer can be written by this thread's next call.
        stream.synchronize()
        return result.numpy()


#: batch sizes graphs are captured for; a batch runs in the smallest bucket that holds it (the
#: rows past it are left over from an earlier batch and their outputs dropped)
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_GRAPH_WARMUP = 3  # eager calls before a capture: TorchScript's profiling runs, cuDNN's choices


class CudaGraphs:
    """Runs a module on CUDA through captured CUDA graphs, one per batch bucket (:data:`GRAPH_BUCKETS`).

    Why: at small batches a SlowFast call is hundreds of kernel launches of a few microseconds
    each, and the CPU that issues them, not the GPU, sets the pace; replaying a captured graph issues
    them all at once. Each bucket gets a static input buffer and its graph on first use (a few eager
    warm-up calls, then the capture); all graphs share one memory pool. A batch larger than the
    largest bucket runs eagerly. Thread-safe: one replay at a time, ordered on the GPU after the
    previous one by an event, so threads on their own streams never overwrite a buffer in use.
    If a capture fails (an operator that cannot be captured), the module runs eagerly from then on
    and the reason is kept in :attr:`disabled`.
    """

    def __init__(self, module: Callable[[Any], Any], device: Any, buckets: tuple[int, ...] = GRAPH_BUCKETS) -> None:
        import torch

        self.module, self.device, self.buckets = module, torch.device(device), tuple(sorted(buckets))
        self._graphs: dict[tuple[int, tuple[int, ...]], tuple[Any, Any, Any]] = {}  # -> (graph, input, output)
        self._pool: Any = None
        self._lock = threading.Lock()
        self._done: Any = None
        self.disabled: str | None = None

    def bucket(self, n: int) -> int | None:
        """The bucket a call of ``n`` clips replays (the smallest batch size graphs are captured for
        that holds them), or None when ``n`` is larger than every bucket (the call runs eagerly)."""
        return next((b for b in self.buckets if b >= n), None)

    @property
    def captured(self) -> list[int]:
        """The batch sizes captured so far (for tests and logs)."""
        return sorted(b for b, _ in self._graphs)

    def _capture(self, bucket: int, frames: Any) -> tuple[Any, Any, Any]:
        import torch

        static_in = torch.zeros((bucket, *frames.shape[1:]), dtype=frames.dtype, device=self.device)
        static_in[: frames.shape[0]].copy_(frames)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(_GRAPH_WARMUP):
                self.module(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self.module(static_in)
        if self._pool is None:
            self._pool = graph.pool()
        return graph, static_in, static_out

    def __call__(self, frames: Any) -> Any:
        import torch

        n = int(frames.shape[0])
        bucket = self.bucket(n)
        if self.disabled or bucket is None:
            return self.module(frames)
        key = (bucket, tuple(frames.shape[1:]))
        stream = torch.cuda.current_stream(self.device)
        with self._lock:
            if self._done is not None:
                stream.wait_event(self._done)  # the previous replay (maybe on another stream) is done with the buffers
            else:
                self._done = torch.cuda.Event()
            entry = self._graphs.get(key)
            if entry is None:
                try:
                    entry = self._graphs[key] = self._capture(bucket, frames)
                except RuntimeError as exc:
                    self.disabled = f"CUDA graph capture failed at batch {bucket}: {exc}"
                    import logging

                    logging.getLogger("sfdeploy").warning("%s; running without CUDA graphs", self.disabled)
                    return self.module(frames)
            graph, static_in, static_out = entry
            static_in[:n].copy_(frames)
            graph.replay()
            out = static_out[:n].clone()
            self._done.record(stream)
        return out
