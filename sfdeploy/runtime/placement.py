"""Where a local backend runs: the one rule for what ``--device`` means to each runtime.

* :func:`format_device` (and :func:`backend_device`, by backend): the :class:`~sfdeploy.device.Device`
  an artifact format (a local backend: ``torchscript``, ``onnxruntime``, ...) runs on when a device
  is asked for; ``auto`` is the best one it can use on this machine, an explicit device a demand.
* ONNX Runtime's CUDA provider, as far as it can be known without opening a session:
  :func:`ort_cuda_installed` (compiled in, i.e. the onnxruntime-gpu build) and the error for CUDA
  asked of the CPU build (:func:`ort_no_cuda_error`). Whether the provider *loads* is only known
  once a session asks for it (:func:`sfdeploy.runtime.ort.open_session` checks the session it gets).

Light (no torch or onnxruntime at import time): the predictors, the export, bench and ``doctor``
ask it before they load anything.
"""

from __future__ import annotations

import logging

from sfdeploy.artifacts import backend_format
from sfdeploy.device import DEFAULT_DEVICE, Device
from sfdeploy.errors import EnvironmentProblem

log = logging.getLogger("sfdeploy")

#: ONNX Runtime's name for its CUDA execution provider
ORT_CUDA_PROVIDER = "CUDAExecutionProvider"


def ort_cuda_installed() -> bool:
    """Whether the installed onnxruntime carries the CUDA execution provider (the onnxruntime-gpu
    build, ``sfdeploy[gpu]``). This is what was compiled in, not whether it loads: that needs the
    CUDA and cuDNN libraries it was built for, and is only known once a session asks for it
    (:mod:`sfdeploy.runtime.ort` checks the session it gets)."""
    import onnxruntime

    if ORT_CUDA_PROVIDER in onnxruntime.get_available_providers():
        return True
    devices = getattr(onnxruntime, "get_ep_devices", None)  # a CUDA plugin EP registers itself here
    return devices is not None and any(d.ep_name == ORT_CUDA_PROVIDER for d in devices())


def ort_no_cuda_error() -> EnvironmentProblem:
    """The error for CUDA asked of an onnxruntime that has no CUDA provider at all (the CPU build):
    one message, with the fix, wherever it is found out (a predictor, ``backend_device``, ``doctor``)."""
    import importlib.metadata as md

    try:
        build = f"onnxruntime {md.version('onnxruntime')}"
    except md.PackageNotFoundError:
        build = "this onnxruntime"
    return EnvironmentProblem(f"ONNX Runtime on CUDA was asked for, but {build} is the CPU build: it has no "
                              f"{ORT_CUDA_PROVIDER}",
                              fix="pip uninstall -y onnxruntime && pip install 'sfdeploy[gpu]' (onnxruntime-gpu), "
                                  "or use --device cpu")


def backend_device(backend: str, requested: str | Device = DEFAULT_DEVICE) -> Device:
    """Where local ``backend`` (``torchscript`` / ``onnxruntime`` / ...) runs when ``requested`` is
    asked for: :func:`format_device` of the format it runs."""
    return format_device(backend_format(backend), requested)


def format_device(fmt: str, requested: str | Device = DEFAULT_DEVICE, *, compiled_for: str | None = None) -> Device:
    """Where an artifact of format ``fmt`` runs when ``requested`` is asked for: ``cpu`` or
    ``cuda[:N]``. The one rule for what ``--device`` means to each runtime.

    An explicit device is a demand: ``cuda`` that torch cannot see, or that the installed
    onnxruntime has no CUDA provider for, is an error here, and a provider that is installed but
    does not load is an error when the session opens. ``auto`` is the best device the format can
    use on this machine: CUDA when torch sees a GPU and, for ONNX Runtime, the installed build has
    the CUDA provider; otherwise the CPU (logged, and recorded by whoever records devices). For an
    artifact built for one device kind (``compiled_for``: an AOTInductor package), ``auto`` is that
    kind, and another kind is refused when the artifact loads, with the reason."""
    requested = Device(requested)
    if compiled_for and requested.is_auto:
        requested = Device(compiled_for)
    if fmt == "onnx" and requested.is_cuda and not ort_cuda_installed():
        raise ort_no_cuda_error()  # first: on a GPU machine, the one thing to fix
    device = requested.resolve()
    if fmt == "onnx" and device.is_cuda and not ort_cuda_installed():
        log.warning("onnxruntime is the CPU build (no %s): --device auto runs ONNX Runtime on the CPU; "
                    "install sfdeploy[gpu] (onnxruntime-gpu) to run it on the GPU", ORT_CUDA_PROVIDER)
        return Device("cpu")
    return device
