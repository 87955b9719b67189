"""Which decoder reads each video: the GPU decoders that are here, what NVDEC can decode, and the
rule that sends a stream to the CPU decoder instead, with the reason.

Everything here is plain values and light imports: the decision functions take what the probes
found (:class:`BackendStatus`, :class:`StreamInfo`) and return a decision with its reason, so the
rules are tested as such on any machine; only :func:`probe_backend` looks at the installation.

The rules, in order (:func:`plan_decoding` once per run, :meth:`DecodePlan.route` per stream):

1. ``--decode cpu``: the CPU decoder (:mod:`sfdeploy.decode.video`) for every stream.
2. Clips decoded on the GPU stay there and go to the model on that GPU; a model on the CPU or one
   behind Triton (which takes host memory here) gets CPU-decoded clips. ``--decode gpu`` then is
   an error with the fix; ``auto`` decodes on the CPU and says why once.
3. A GPU decoder must be installed, importable, see a CUDA GPU, and (torchcodec) find FFmpeg's
   shared libraries. None: ``--decode gpu`` is an error with the fix (:data:`INSTALL_FIX`),
   ``auto`` decodes on the CPU and says why once.
4. Per stream, NVDEC must have the codec, the pixel format and the frame size
   (:data:`NVDEC_LIMITS`); else the CPU decoder, with the reason. (A video in memory, as a server
   receives it, goes to pynvvideocodec through a private file in memory-backed storage:
   :mod:`sfdeploy.decode.gpu.backends`.)
5. The fidelity gate (:mod:`sfdeploy.decode.gpu.gate`): a codec whose GPU-decoded clips did not
   give the model's top-1 of the CPU-decoded ones on >= 99.5% of the sweep goes to the CPU decoder.
   ``auto`` uses the GPU only with a fidelity record for the export; ``--decode gpu`` without one
   decodes on the GPU and says the fidelity is not measured.
6. When the GPU decoder fails on a stream it accepted (a damaged stream, a frame count that
   differs from the CPU index, torchcodec falling back to its own CPU path), the CPU decoder reads
   it (:mod:`sfdeploy.decode.gpu.route`): a video the CPU decoder cannot read either is its error row.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sfdeploy.device import REMOTE, is_cuda
from sfdeploy.errors import EnvironmentProblem, InputError

#: The GPU decoders, in order of preference for ``--decode gpu|auto``. The order is the measured
#: comparison's to set (the bench's e2e stage has a row for each, :mod:`sfdeploy.bench.stages`);
#: until it is measured on a GPU it is NVIDIA's own library first.
GPU_BACKENDS = ("pynvvideocodec", "torchcodec")
#: ``infer --decode``: auto, cpu, gpu (the first GPU decoder that is here), or one by name
DECODE_MODES = ("auto", "cpu", "gpu", *GPU_BACKENDS)
#: ``repo --decode`` (where ``<name>_video`` decodes) and a served request's ``decode`` parameter
SERVER_DECODE_MODES = ("auto", "cpu", "gpu")
#: the module each distribution installs
IMPORT_NAMES = {"pynvvideocodec": "PyNvVideoCodec", "torchcodec": "torchcodec"}
INSTALL_FIX = ("pip install 'sfdeploy[nvdec]' (pynvvideocodec and torchcodec; or either alone), on a machine with an "
               "NVIDIA GPU and its driver; torchcodec also needs FFmpeg's shared libraries (libavcodec 4-8, e.g. "
               "apt-get install ffmpeg)")


@dataclass(frozen=True)
class CodecLimits:
    """What NVDEC decodes of one codec: frame sizes (width, height) and pixel formats."""

    min_size: tuple[int, int]
    max_size: tuple[int, int]
    pix_fmts: tuple[str, ...] = ("yuv420p",)


#: NVDEC's limits per codec (FFmpeg codec names), for the GPUs of the Turing / GA100 / Hopper
#: column of NVIDIA's "NVDEC Hardware Capabilities" (Video Codec SDK 13, NVDEC application note;
#: sizes from the NVDECODE programming guide's capability table, what ``cuvidGetDecoderCaps``
#: reports). Conservative on purpose: 8-bit 4:2:0 only (the pixel formats whose colour conversion
#: the fidelity gate has a chance to measure), and no AV1 (Hopper, the H200's generation, has no
#: AV1 decoder). A stream outside them goes to the CPU decoder with the reason.
NVDEC_LIMITS: dict[str, CodecLimits] = {
    "h264": CodecLimits((48, 16), (4096, 4096)),
    "hevc": CodecLimits((144, 144), (8192, 8192)),
    "vp9": CodecLimits((128, 128), (8192, 8192)),
    "vp8": CodecLimits((48, 16), (4096, 4096)),
    "mpeg4": CodecLimits((48, 16), (2032, 2032)),
    "mpeg2video": CodecLimits((48, 16), (4080, 4080)),
    "mpeg1video": CodecLimits((48, 16), (4080, 4080)),
    "vc1": CodecLimits((48, 16), (2032, 2032)),
}


@dataclass(frozen=True)
class BackendStatus:
    """Whether a GPU decoder can run here: ``detail`` is its version, or why not."""

    name: str
    available: bool
    detail: str


@dataclass(frozen=True)
class StreamInfo:
    """What the CPU probe read from a stream's header (:class:`sfdeploy.decode.video.Video`)."""

    codec: str
    width: int
    height: int
    pix_fmt: str
    frames: int

    @classmethod
    def of(cls, video: object) -> StreamInfo:
        """The header of an opened :class:`~sfdeploy.decode.video.Video`: plain values, which travel
        from a decode worker to the GPU decoder in the parent."""
        return cls(video.codec, video.width, video.height, video.pix_fmt, video.num_frames)  # type: ignore[attr-defined]


def _cuda_problem() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU here"
    return None


@functools.cache
def probe_backend(name: str) -> BackendStatus:
    """Whether GPU decoder ``name`` can run here: installed, a CUDA GPU visible to torch, importable,
    and (torchcodec) FFmpeg's shared libraries found. Cached: the answer is the process's."""
    if name not in GPU_BACKENDS:
        raise ValueError(f"unknown GPU decoder {name!r}: one of {', '.join(GPU_BACKENDS)}")
    module_name = IMPORT_NAMES[name]
    if importlib.util.find_spec(module_name) is None:
        return BackendStatus(name, False, f"{name} is not installed")
    cuda = _cuda_problem()
    if cuda:
        return BackendStatus(name, False, cuda)
    try:
        module = importlib.import_module(module_name)
    except (ImportError, OSError, RuntimeError) as exc:  # a missing libnvcuvid / libcuda / FFmpeg
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return BackendStatus(name, False, f"{name} is installed but does not import ({type(exc).__name__}: {first})")
    version = getattr(module, "__version__", "?")
    if name == "torchcodec" and getattr(module, "ffmpeg_major_version", 0) is None:
        return BackendStatus(name, False, f"torchcodec {version} finds no FFmpeg shared libraries (libavcodec 4-8)")
    return BackendStatus(name, True, f"{name} {version}")


def probe_backends() -> list[BackendStatus]:
    """Every GPU decoder's status, in order of preference (what :func:`plan_decoding` chooses from)."""
    return [probe_backend(name) for name in GPU_BACKENDS]


def nvdec_refusal(info: StreamInfo, backend: str, max_pixels: int) -> str | None:
    """Why NVDEC (through ``backend``) does not decode this stream, or None when it does."""
    limits = NVDEC_LIMITS.get(info.codec)
    if limits is None:
        return f"NVDEC has no {info.codec} decoder (it decodes {', '.join(sorted(NVDEC_LIMITS))})"
    (min_w, min_h), (max_w, max_h) = limits.min_size, limits.max_size
    if info.width < min_w or info.height < min_h:
        return f"{info.width}x{info.height} is below NVDEC's {info.codec} minimum of {min_w}x{min_h}"
    if info.width > max_w or info.height > max_h:
        return f"{info.width}x{info.height} is above NVDEC's {info.codec} maximum of {max_w}x{max_h}"
    if info.width * info.height > max_pixels:  # the probe refuses these first; the rule holds here too
        return f"{info.width}x{info.height} is over the limit of {max_pixels:,} pixels"
    if info.pix_fmt not in limits.pix_fmts:
        return (f"pixel format {info.pix_fmt or 'unknown'}: the GPU path takes {info.codec} in "
                f"{', '.join(limits.pix_fmts)}")
    return None


#: codec -> (passed, what was measured): one backend's verdicts from a fidelity record
Gate = Mapping[str, tuple[bool, str]]


@dataclass(frozen=True)
class DecodePlan:
    """The run's decision (:func:`plan_decoding`): ``backend`` decodes on ``device`` the streams
    :meth:`route` gives it; None: the CPU decoder reads every stream, because of ``why``."""

    mode: str
    backend: str | None
    device: str
    why: str
    gate: Gate | None = None

    def route(self, info: StreamInfo, max_pixels: int) -> tuple[bool, str]:
        """(decode on the GPU?, why) for one stream."""
        if self.backend is None:
            return False, self.why
        refusal = nvdec_refusal(info, self.backend, max_pixels)
        if refusal:
            return False, refusal
        if self.gate is None:
            return True, f"--decode {self.mode}; fidelity not measured for this export"
        passed, note = self.gate.get(info.codec, (False, f"{info.codec} is not in the fidelity record"))
        return passed, f"fidelity gate {'passed' if passed else 'not passed'}: {note}"


def plan_decoding(mode: str, *, device: str, statuses: Sequence[BackendStatus],
                  gates: Mapping[str, Gate] | None = None) -> DecodePlan:
    """The decoding of a run whose model runs on ``device`` (``cpu``, ``cuda:N``, or ``remote`` for
    a served model), with the GPU decoders ``statuses`` and the export's fidelity ``gates`` per
    backend (rules 1-3 and 5 of the module docstring). Raises when ``--decode gpu`` (or a backend
    by name) cannot be had, with the fix."""
    if mode not in DECODE_MODES:
        raise InputError(f"unknown --decode {mode!r}", fix=f"use one of: {', '.join(DECODE_MODES)}")
    if mode == "cpu":
        return DecodePlan(mode, None, device, "--decode cpu")
    forced = mode != "auto"
    if not is_cuda(device):
        why = ("the model is served by Triton, which takes clips in host memory here" if device == REMOTE
               else f"the model runs on {device}")
        if forced:
            raise InputError(f"--decode {mode} leaves the decoded clips on the GPU for the model, but {why}",
                             fix="run the exported model on the GPU here (--backend torchscript|onnxruntime --export "
                                 "EXPORT --device cuda), decode on the server's GPU (--server-decode), or pass "
                                 "--decode cpu")
        return DecodePlan(mode, None, device, why)
    candidates = [s for s in statuses if mode in ("auto", "gpu") or s.name == mode]
    usable = [s for s in candidates if s.available]
    if not usable:
        why = "no GPU video decoder here (" + "; ".join(f"{s.name}: {s.detail}" for s in candidates) + ")"
        if forced:
            raise EnvironmentProblem(f"--decode {mode}: {why}", fix=INSTALL_FIX)
        return DecodePlan(mode, None, device, why)
    chosen = usable[0]
    gate = (gates or {}).get(chosen.name)
    if gate is None and not forced:
        return DecodePlan(mode, None, device, f"{chosen.detail} is here, but the export has no fidelity record for it "
                                              "(python benchmarks/gpu_fidelity.py --export EXPORT makes one)")
    return DecodePlan(mode, chosen.name, device, chosen.detail, gate)
