"""The shared-memory regions a Triton client puts its input in (``infer --shm system|cuda``,
:mod:`sfdeploy.transport`): one :class:`Region` subclass per kind (:data:`REGIONS`), so that the
predictor (:class:`sfdeploy.runtime.triton.TritonPredictor`) has one code path for both: make,
register with the server (with its key, :mod:`sfdeploy.shmkey`), write, unregister, free.

System shared memory is a ``/dev/shm`` file the server maps; CUDA shared memory is device memory
on the client's GPU, which the server opens by its IPC handle (a batch already on that GPU goes
in device to device). tritonclient's CUDA module needs ``cuda-python``: :func:`cuda_shared_memory`
says so, with the fix, when the predictor opens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sfdeploy.errors import EnvironmentProblem
from sfdeploy.runtime.base import Frames, host_array, is_torch_tensor
from sfdeploy.transport import SharedMemory

_CUDA_SHM = "CUDA shared memory (--shm cuda)"
_SYSTEM_INSTEAD = "or send through system shared memory (--shm system)"


def cuda_shared_memory(device_id: int = 0) -> Any:
    """tritonclient's CUDA shared-memory module, once CUDA shared memory can work here (its package
    imports and GPU ``device_id`` is visible); else an :class:`EnvironmentProblem` naming what is
    missing and the fix. Asked when the predictor opens, so that a run fails before its first
    request, not half-way through."""
    try:
        import tritonclient.utils.cuda_shared_memory as cudashm
    except (ImportError, RuntimeError) as exc:  # tritonclient raises RuntimeError when cuda-python is missing
        raise EnvironmentProblem(
            f"{_CUDA_SHM} needs the 'cuda-python' package (its cuda.bindings module, which tritonclient's CUDA "
            "shared-memory client imports); it is not installed here",
            fix="on the server's GPU machine, install it (`pip install 'sfdeploy[gpu]'`, or `pip install "
                f"cuda-python` for the driver's CUDA major version), {_SYSTEM_INSTEAD}") from exc
    import cuda.bindings.runtime as cudart

    error, count = cudart.cudaGetDeviceCount()
    failed = error != cudart.cudaError_t.cudaSuccess
    check_gpu(0 if failed else count, device_id, f"CUDA says {getattr(error, 'name', error)}" if failed else "")
    return cudashm


def check_gpu(count: int, device_id: int, why: str = "") -> None:
    """Refuse CUDA shared memory on GPU ``device_id`` when only ``count`` GPUs are visible (``why``:
    CUDA's own answer when it could not count them): an :class:`EnvironmentProblem` with the fix."""
    if device_id < count:
        return
    seen = f"no GPU is visible here{f' ({why})' if why else ''}" if count == 0 else f"this machine shows {count}"
    raise EnvironmentProblem(f"{_CUDA_SHM} puts the input on GPU {device_id}, and {seen}",
                             fix="run the client on the server's GPU machine (--device cuda:N names the GPU), "
                                 f"{_SYSTEM_INSTEAD}")


class Region:
    """One thread's shared-memory region for the input, made here and registered with the server
    under ``name``, which reads the request's input from it. What differs between system and CUDA
    shared memory is one subclass each (:data:`REGIONS`): make, register, write, unregister, free."""

    what = "shared-memory"  # for messages: the kind of region

    def __init__(self, name: str, size: int, device_id: int) -> None:
        self.name, self.size, self.device_id = name, size, device_id
        self.client: Any = None
        self.headers: dict[str, str] = {}
        self.handle = self._create()

    def fits(self, nbytes: int, device_id: int) -> bool:
        """Whether a batch of ``nbytes`` on GPU ``device_id`` goes in this region (else one is made again)."""
        return nbytes <= self.size and device_id == self.device_id

    def register(self, client: Any, headers: dict[str, str]) -> None:
        """Register with the server through ``client``, sending ``headers`` (the server's key)."""
        self.client, self.headers = client, headers
        self._register()

    def close(self) -> None:
        """Unregister (the server keeps a registered region alive otherwise), then free, even when
        the server is gone."""
        try:
            if self.client is not None:
                self._unregister()
        finally:
            self.destroy()

    def write(self, frames: Frames) -> None:
        """Put the batch ``frames`` at the start of the region."""
        raise NotImplementedError

    def destroy(self) -> None:
        """Free the region here (not the server's registration: :meth:`close` does both)."""
        raise NotImplementedError

    def _create(self) -> Any:
        raise NotImplementedError

    def _register(self) -> None:
        raise NotImplementedError

    def _unregister(self) -> None:
        raise NotImplementedError


class SystemRegion(Region):
    """System shared memory: a ``/dev/shm`` file this process makes and the server maps; the batch
    is copied into it on the host (one copy, no bytes on the socket)."""

    what = "system shared-memory"

    def _create(self) -> Any:
        import tritonclient.utils.shared_memory as shm

        return shm.create_shared_memory_region(self.name, f"/{self.name}", self.size)

    def _register(self) -> None:
        self.client.register_system_shared_memory(self.name, f"/{self.name}", self.size, headers=self.headers)

    def _unregister(self) -> None:
        self.client.unregister_system_shared_memory(self.name, headers=self.headers)

    def write(self, frames: Frames) -> None:
        """Copy the batch (on the host first if it is not) into the region."""
        import tritonclient.utils.shared_memory as shm

        shm.set_shared_memory_region(self.handle, [np.ascontiguousarray(host_array(frames))])

    def destroy(self) -> None:
        """Unmap and unlink the ``/dev/shm`` file."""
        import tritonclient.utils.shared_memory as shm

        shm.destroy_shared_memory_region(self.handle)


class CudaRegion(Region):
    """CUDA shared memory: device memory on GPU ``device_id``, which the server opens by its IPC
    handle. A batch already on a GPU (a torch CUDA tensor) is copied device to device, never through
    the host; a host batch is copied up once."""

    what = "CUDA shared-memory"

    def _create(self) -> Any:
        return cuda_shared_memory(self.device_id).create_shared_memory_region(self.name, self.size, self.device_id)

    def _register(self) -> None:
        raw = cuda_shared_memory(self.device_id).get_raw_handle(self.handle)
        self.client.register_cuda_shared_memory(self.name, raw, self.device_id, self.size, headers=self.headers)

    def _unregister(self) -> None:
        self.client.unregister_cuda_shared_memory(self.name, headers=self.headers)

    def write(self, frames: Frames) -> None:
        """Copy the batch into the region: device to device from a CUDA tensor (once the stream that
        made it has finished it), else from the host."""
        import tritonclient.utils.cuda_shared_memory as cudashm

        if is_torch_tensor(frames) and frames.is_cuda:
            import torch

            frames = frames.contiguous()
            torch.cuda.current_stream(frames.device).synchronize()  # tritonclient copies on a stream of its own
            cudashm.set_shared_memory_region_from_dlpack(self.handle, [frames])
        else:
            cudashm.set_shared_memory_region(self.handle, [np.ascontiguousarray(host_array(frames))])

    def destroy(self) -> None:
        """Drop the region: tritonclient frees the device memory when the last reference goes."""
        import tritonclient.utils.cuda_shared_memory as cudashm

        handle, self.handle = self.handle, None
        if handle is not None:
            cudashm.destroy_shared_memory_region(handle)


#: the region of each kind of shared memory
REGIONS: dict[SharedMemory, type[Region]] = {SharedMemory.SYSTEM: SystemRegion, SharedMemory.CUDA: CudaRegion}
