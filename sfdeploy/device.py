"""Where a model runs: one :class:`Device` value, parsed once at the edge (the CLI's ``--device``,
:class:`sfdeploy.target.ModelTarget`, a library call) and passed on as it is.

::

    from sfdeploy.device import Device

    Device("gpu")            # Device('cuda'): the older spelling, accepted
    Device("cuda:1").index   # 1
    Device("auto").resolve() # Device('cuda') when torch sees a GPU, else Device('cpu')
    Device("cuda").triton_kind  # 'KIND_GPU'

Why a ``str`` subclass: every layer below hands the device to torch (``torch.device(d)``,
``tensor.to(d)``), writes it to JSON records and compares it with ``"cpu"``; a string that has
already been checked does all of that unchanged, and the questions code used to answer with
``device.startswith("cuda")`` (is it a GPU, which one, which Triton instance kind, which kind an
AOTInductor package is compiled for) are answered here, once.

Where each local backend runs for a requested device (``auto`` and ONNX Runtime's CPU build) is
:func:`sfdeploy.runtime.placement.backend_device`: it needs the backends, which this module does not.

Light on purpose (no torch at import time): the CLI's ``--help`` reads :data:`DEVICES`.
"""

from __future__ import annotations

from sfdeploy.errors import EnvironmentProblem, InputError

#: the device vocabulary of every command (``--device``), and its one default; ``cuda:N`` and the
#: older ``gpu`` (= ``cuda``) are accepted too
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DEFAULT_DEVICE = "auto"

#: the ``device`` of a served model's predictor: the model runs on the server, not on a device here
REMOTE = "remote"

#: the Triton instance kind of each device kind (``instance_group { kind: ... }``)
TRITON_KINDS = {"cpu": "KIND_CPU", "cuda": "KIND_GPU"}


class Device(str):
    """A checked device name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (lower case).

    ``Device(value)`` accepts a :class:`Device` (returned as it is), any case and surrounding
    spaces, and ``gpu`` for ``cuda``; anything else is an :class:`InputError` with the
    vocabulary. Nothing is probed when one is made: :meth:`resolve` asks torch.
    """

    __slots__ = ()

    def __new__(cls, value: str = DEFAULT_DEVICE) -> Device:
        if isinstance(value, Device):
            return value
        name = str(value).strip().lower()
        if name == "gpu":
            name = "cuda"
        kind, sep, index = name.partition(":")
        if name not in DEVICES and not (kind == "cuda" and sep and index.isdigit()):
            raise InputError(f"unknown device '{value}'", fix="use auto, cpu, cuda or cuda:N")
        return super().__new__(cls, name)

    def __repr__(self) -> str:
        return f"Device({str(self)!r})"

    @property
    def kind(self) -> str:
        """``auto``, ``cpu`` or ``cuda`` (the index dropped)."""
        return self.partition(":")[0]

    @property
    def is_cuda(self) -> bool:
        """Whether this is a GPU (``cuda`` or ``cuda:N``); ``auto`` is not, until resolved."""
        return self.kind == "cuda"

    @property
    def is_auto(self) -> bool:
        """Whether the choice is left to :meth:`resolve` (a GPU if torch sees one)."""
        return self == "auto"

    @property
    def index(self) -> int | None:
        """The GPU's index (``cuda`` is 0), or None for the CPU and ``auto``."""
        if not self.is_cuda:
            return None
        return int(self.partition(":")[2] or 0)

    @property
    def instance_kind(self) -> str:
        """``gpu`` or ``cpu``: the kind of Triton instance or of host this device is (``auto``
        counts as ``cpu``: resolve it first where a GPU may be meant)."""
        return "gpu" if self.is_cuda else "cpu"

    @property
    def triton_kind(self) -> str:
        """``KIND_GPU`` or ``KIND_CPU``: the Triton instance group kind that runs on it."""
        return TRITON_KINDS["cuda" if self.is_cuda else "cpu"]

    @property
    def compiled_kind(self) -> str:
        """``cuda`` or ``cpu``: what a device-bound artifact (an AOTInductor package) is built for."""
        return "cuda" if self.is_cuda else "cpu"

    @classmethod
    def of_instance_kind(cls, kind: str) -> Device:
        """The device of a Triton instance kind (``gpu`` / ``cpu``)."""
        return cls("cuda" if kind == "gpu" else "cpu")

    def resolve(self, *, must_exist: bool = True) -> Device:
        """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cpu`` and ``cuda[:N]`` as they
        are. With ``must_exist`` a CUDA device torch cannot see is an :class:`EnvironmentProblem`;
        without it (a Triton repository written here for a GPU server elsewhere) ``cuda`` stays."""
        if self == "cpu" or (not must_exist and not self.is_auto):
            return self
        import torch

        available = torch.cuda.is_available()
        if self.is_auto:
            return Device("cuda" if available else "cpu")
        if not available or (self.index or 0) >= torch.cuda.device_count():
            raise EnvironmentProblem(f"device {self} requested but torch sees "
                                     f"{torch.cuda.device_count() if available else 'no'} CUDA device(s)",
                                     fix="use --device cpu (or auto), or check the driver with nvidia-smi")
        return self


def is_cuda(device: str) -> bool:
    """Whether a predictor's ``device`` (a :class:`Device`, a name it accepts, or :data:`REMOTE`)
    is a GPU here. A value known to be a :class:`Device` is asked ``.is_cuda`` directly."""
    return device != REMOTE and Device(device).is_cuda
