"""Tensors across the Triton python-backend stub boundary: every crossing of sfdeploy's backends.

Why this module exists: the ``triton_python_backend_stub`` shipped in nvidia-pytriton 0.7.0
(tritonserver 2.51) is built with pybind11 2.10, which reads numpy's dtype struct with the numpy
1.x layout. Under numpy 2 it reads an item size of 0, so the stub's numpy bridge is silently
wrong, with nothing in the log: ``Tensor.as_numpy()`` returns the right shape and dtype filled
with the first element, and ``pb_utils.Tensor(name, ndarray)`` sends zero bytes.

Fixed-size tensors therefore cross by DLPack, which does not go through that code: the stub hands
over (pointer, shape, dtype, device) and torch wraps that memory where it is, host or GPU
(:func:`to_tensor`), or torch hands the memory of a tensor, host or GPU, to the stub
(:func:`from_tensor`). Exact under numpy 1 and 2 alike, and without a copy on our side: a GPU
input (the python backend gives them where ``FORCE_CPU_ONLY_INPUT_TENSORS`` is ``no``) stays on
its GPU. torch, not numpy, is the DLPack peer: the stub marks a capsule it consumed with a name of
its own ("used_dlpack"), and numpy's capsule destructor then prints a traceback (an unraisable
ValueError) for every tensor; torch's ignores any capsule it no longer owns; and numpy cannot hold
GPU memory at all. :func:`to_array` is the same crossing for code that works in numpy on the host
(a GPU tensor is copied to the host there).

BYTES (``TYPE_STRING``) tensors have no DLPack form; the stub builds and reads them through the
broken bridge, before and after any Python code of ours runs, so under such a stub they cannot be
made correct. :func:`require_numpy_bridge` lets a model that exchanges them refuse to load, with
the reason and the fix, instead of serving wrong answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sfdeploy.errors import EnvironmentProblem

if TYPE_CHECKING:
    import torch


def _pb_utils() -> Any:
    import triton_python_backend_utils as pb_utils  # exists only inside the stub

    return pb_utils


def to_tensor(tensor: Any) -> torch.Tensor:
    """A torch tensor of a stub tensor (a request input, a BLS response output), by DLPack: a view
    of the tensor's memory where the stub has it, host or GPU (never copied), which keeps the
    stub's memory alive as long as it lives."""
    import torch

    return torch.from_dlpack(tensor.to_dlpack())


def from_tensor(name: str, value: torch.Tensor | np.ndarray) -> Any:
    """A stub tensor (a response output, a BLS request input) named ``name``, holding ``value``'s
    memory by DLPack: a torch tensor on any device (made contiguous: the stub takes C-order tensors
    only), or a numpy array (wrapped by torch; copied only when not contiguous or not
    writable, which torch does not wrap)."""
    import torch

    if isinstance(value, np.ndarray):
        value = np.ascontiguousarray(value)
        if not value.flags.writeable:  # torch wraps writable memory only
            value = value.copy()
        value = torch.from_numpy(value)
    return _pb_utils().Tensor.from_dlpack(name, value.contiguous())


def to_array(tensor: Any) -> np.ndarray:
    """A numpy array of a stub tensor, for code that works in numpy on the host: :func:`to_tensor`'s
    view of host memory (a host copy if the tensor is in GPU memory)."""
    return to_tensor(tensor).cpu().numpy()


def bytes_items(tensor: Any) -> list[bytes]:
    """The items of a BYTES tensor, flattened. Needs a working numpy bridge: see
    :func:`require_numpy_bridge`."""
    return [item if isinstance(item, bytes) else bytes(item) for item in tensor.as_numpy().reshape(-1)]


def bytes_tensor(name: str, items: Sequence[bytes], shape: tuple[int, ...]) -> Any:
    """A BYTES stub tensor of ``shape`` from ``items`` (in C order). Needs a working numpy bridge:
    see :func:`require_numpy_bridge`."""
    array = np.empty(len(items), dtype=np.object_)  # np.array(list of bytes) would make fixed-size S items
    array[:] = list(items)
    return _pb_utils().Tensor(name, array.reshape(shape))


def numpy_bridge_works() -> bool:
    """Whether this stub's numpy bridge reads numpy arrays correctly: the tensor built from a
    known buffer (by DLPack), read back through ``as_numpy()`` (the stub's pybind11 numpy code)."""
    import torch

    probe = torch.arange(1, 17, dtype=torch.uint8)
    seen = _pb_utils().Tensor.from_dlpack("sfdeploy_probe", probe).as_numpy()
    return bool(np.array_equal(seen, np.arange(1, 17, dtype=np.uint8)))


def require_numpy_bridge(model: str, needs: str, otherwise: str) -> None:
    """Raise (from ``initialize``: the model fails to load) if the stub's numpy bridge is broken.
    ``needs`` says what the model exchanges through it, ``otherwise`` how to serve without it."""
    if numpy_bridge_works():
        return
    raise EnvironmentProblem(
        f"model '{model}' cannot run with numpy {np.__version__} and this tritonserver python backend stub "
        f"(built against numpy 1.x, e.g. the one in nvidia-pytriton 0.7.0): {needs}, and the stub passes BYTES "
        "tensors only through its numpy bridge, which is silently wrong under numpy 2",
        fix=f"install numpy<2 in the environment the server runs from (pip install numpy==1.26.4), or {otherwise}")
