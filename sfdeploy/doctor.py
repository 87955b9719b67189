"""``sfdeploy doctor``: is this environment able to run the whole toolchain?

Each check returns a :class:`Check` with a status (ok / warn / fail), what was seen, and for
anything not ok the fix. The known install traps of this stack (see README "Installing") each have
a check, so a broken environment is diagnosed in one command instead of deep in a training run.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from sfdeploy.compatibility import release

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Check:
    """One line of ``sfdeploy doctor``: what was checked, ok / warn / fail, what was found, and the fix when it
    is not ok."""

    name: str
    status: str
    detail: str
    fix: str = ""


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _pins(*dists: str) -> str:
    """``dist==version ...`` as sfdeploy's own requirements (pyproject.toml, read back from the
    installed metadata) pin them, quoted for a shell: the fixes doctor prints never drift from
    the pins. A dist sfdeploy does not pin (or a source tree without metadata) stays bare."""
    try:
        requires = md.requires("sfdeploy") or []
    except md.PackageNotFoundError:
        requires = []
    pinned = {}
    for line in requires:
        spec = line.split(";")[0].strip()
        name = re.split(r"[\[<>=!~ ]", spec, maxsplit=1)[0]
        pinned.setdefault(name.lower().replace("_", "-"), spec)
    words = [pinned.get(d.lower().replace("_", "-"), d) for d in dists]
    return " ".join(f"'{w}'" if any(c in w for c in "<>[") else w for w in words)


def check_python() -> Check:
    """The Python version, within what tritonserver's python backend stubs support."""
    v = sys.version_info
    ok = (3, 10) <= (v.major, v.minor) <= (3, 13)
    return Check("python", OK if ok else FAIL, sys.version.split()[0],
                 "" if ok else "use Python 3.10-3.13 (tritonserver's python backend stubs)")


def check_torch() -> Check:
    """torch installed, and whether it sees a GPU (what ``--device auto`` will use)."""
    version = _version("torch")
    if version is None:
        return Check("torch", FAIL, "not installed", "pip install torch==2.13.0 (before sfdeploy)")
    import torch

    if torch.cuda.is_available():
        detail = f"{version}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}"
    else:
        detail = f"{version}, CPU only (no CUDA device visible)"
    return Check("torch", OK, detail)


def check_numpy() -> Check:
    """numpy 2 (GPU hosts often come with it) is a warning, not a failure: decoding (decord, PyAV),
    OpenCV, training, export, ONNX Runtime, tritonclient and the served ``<name>`` model (tensors
    by DLPack) were seen exact with numpy 2.4.6. What does not work is the BYTES tensors of the
    tritonserver python-backend stub built against numpy 1 (nvidia-pytriton 0.7.0): ``<name>_video``
    refuses to load there (:mod:`sfdeploy.serving.tensors`)."""
    version = _version("numpy")
    if version is None:
        return Check("numpy", FAIL, "not installed", f"pip install {_pins('numpy')}")
    if release(version) < (2,):
        return Check("numpy", OK, version)
    pytriton = _version("nvidia-pytriton")
    stub = (f"the tritonserver python backend stub of nvidia-pytriton {pytriton} is"
            if pytriton else "the tritonserver python backend stub sfdeploy uses (nvidia-pytriton, not installed "
            "here) is")
    return Check("numpy", WARN, f"{version}: decoding, training, export, in-process inference and the served <name> "
                 "models work; the server-side decoding models (<name>_video, `infer --server-decode`) refuse to "
                 f"load: {stub} built against numpy 1 and corrupts BYTES tensors under numpy 2",
                 "to serve <name>_video, run the server from an environment with numpy<2 (pip install "
                 f"{_pins('numpy')}); otherwise serve without it (`sfdeploy repo --no-video`, or `sfdeploy serve "
                 "--models <name>`)")


def check_openmmlab() -> Check:
    """The MMAction2 stack at versions that work together (mmcv below 2.2), and what sfdeploy.compat patches."""
    versions = {d: _version(d) for d in ("mmengine", "mmcv-lite", "mmcv", "mmaction2")}
    missing = [d for d in ("mmengine", "mmaction2") if versions[d] is None]
    mmcv = versions["mmcv-lite"] or versions["mmcv"]
    if missing or mmcv is None:
        return Check("mmaction2 stack", FAIL, f"missing: {', '.join(missing + ([] if mmcv else ['mmcv-lite']))}",
                     f"pip install {_pins('mmengine', 'mmcv-lite', 'mmaction2')}")
    detail = f"mmaction2 {versions['mmaction2']}, mmengine {versions['mmengine']}, mmcv {mmcv}"
    if release(mmcv) >= (2, 2):
        return Check("mmaction2 stack", FAIL, detail, f"pip install {_pins('mmcv-lite')} (mmaction2 needs mmcv<2.2)")
    from sfdeploy.compat import missing_drn_module

    if missing_drn_module():
        detail += "; wheel lacks localizers/drn (patched by sfdeploy.compat)"
    if importlib.util.find_spec("importlib_metadata") is None:
        return Check("mmaction2 stack", FAIL, detail + "; importlib_metadata missing",
                     "pip install importlib_metadata (mmaction2 imports it)")
    try:
        from sfdeploy.compat import ensure_mmaction

        ensure_mmaction()
    except Exception as exc:  # reported, not raised: doctor shows every problem at once
        return Check("mmaction2 stack", FAIL, f"{detail}; import failed: {type(exc).__name__}: {exc}",
                     _import_fix(exc))
    from sfdeploy.compat import multimodal_state

    state = multimodal_state()
    if "off: " in state:
        detail += f"; {state} (SlowFast needs none)"
    return Check("mmaction2 stack", OK, detail)


def _import_fix(exc: Exception) -> str:
    """The fix for an MMAction2 import failure: name the module that is missing, if one is."""
    missing = getattr(exc, "name", None)
    if isinstance(exc, ModuleNotFoundError) and missing:
        top = missing.split(".")[0]
        return (f"pip install {_pins(top)}, or `pip uninstall {top}` if it is an optional package mmaction2 "
                "imports only when present")
    return "reinstall sfdeploy's pins: pip install -e '.[cpu]' (or the wheelhouse on an air-gapped host)"


def check_pkg_resources() -> Check:
    """setuptools' pkg_resources, which MMAction2's own tools import (sfdeploy does without it)."""
    version = _version("setuptools")
    ok = importlib.util.find_spec("pkg_resources") is not None
    return Check("setuptools/pkg_resources", OK if ok else WARN, f"setuptools {version}",
                 "" if ok else f"pip install {_pins('setuptools')} (sfdeploy resolves mmaction:: configs itself, "
                 "MMAction2's own tools need it)")


_OPENCV_DISTS = ("opencv-python", "opencv-contrib-python", "opencv-python-headless", "opencv-contrib-python-headless")


def check_opencv() -> Check:
    """cv2 imports; the OpenCV distributions installed are named (a GPU image's
    opencv-python-headless provides cv2 as well as sfdeploy's pinned pair)."""
    a, b = _version("opencv-python"), _version("opencv-contrib-python")
    installed = {dist: _version(dist) for dist in _OPENCV_DISTS}
    detail = ", ".join(f"{dist} {version}" for dist, version in installed.items() if version) or "no OpenCV package"
    if a and b and a != b:
        return Check("opencv", FAIL, detail, f"pip install opencv-python=={b} (same version as contrib)")
    try:
        import cv2

        detail += f", cv2 {cv2.__version__}"
    except ImportError as exc:
        return Check("opencv", FAIL, f"{detail}; import cv2 failed: {exc}",
                     f"pip install --force-reinstall {_pins('opencv-python', 'opencv-contrib-python')}")
    return Check("opencv", OK, detail)


def check_decoders() -> Check:
    """decord (MMAction2's decoder: the parity gate's reference) and PyAV installed, and the adapter
    (sfdeploy.decode: PyAV's index and frames, capped at the pixel limit) reading a 96 px wide h264
    clip and a 72 px one, a width decord itself mis-decodes."""
    versions = {dist: _version(dist) for dist in ("decord", "av")}
    reinstall = f"pip install --force-reinstall {_pins(*versions)}"
    missing = [dist for dist, version in versions.items() if version is None]
    if missing:
        return Check("decoders", FAIL, f"not installed: {', '.join(missing)}", f"pip install {_pins(*missing)}")
    import numpy as np

    from sfdeploy.data.synth import encode_h264
    from sfdeploy.decode import MAX_VIDEO_PIXELS, DecodeError, open_video

    seen = []
    try:
        for width in (96, 72):
            with open_video(encode_h264(np.full((8, 64, width, 3), 128, dtype=np.uint8))) as video:
                frames = video.frames(range(video.num_frames))
                seen.append((width, video.decoder, len(frames)))
    except DecodeError as exc:  # reported, not raised
        return Check("decoders", FAIL, f"cannot decode a test video: {exc.message}", reinstall)
    detail = (f"decord {versions['decord']} (the parity reference), PyAV {versions['av']} (decodes, capped at "
              f"{MAX_VIDEO_PIXELS:,} pixels a frame): "
              + ", ".join(f"{w} px -> {d} ({n}/8 frames)" for w, d, n in seen))
    ok = all(n == 8 for _, _, n in seen)
    return Check("decoders", OK if ok else FAIL, detail,
                 "" if ok else reinstall)


def check_onnx() -> Check:
    """One onnxruntime build installed (the CPU and GPU wheels clash), and its providers."""
    cpu, gpu = _version("onnxruntime"), _version("onnxruntime-gpu")
    if cpu and gpu:
        return Check("onnxruntime", FAIL, f"both onnxruntime {cpu} and onnxruntime-gpu {gpu} installed",
                     "pip uninstall -y onnxruntime onnxruntime-gpu, then install sfdeploy[cpu] or sfdeploy[gpu]")
    if not (cpu or gpu):
        return Check("onnxruntime", FAIL, "not installed", "pip install 'sfdeploy[cpu]' (or [gpu])")
    import onnxruntime

    detail = f"{'onnxruntime-gpu ' + gpu if gpu else 'onnxruntime ' + cpu}, onnx {_version('onnx')}, " \
             f"providers {', '.join(onnxruntime.get_available_providers())}"
    return Check("onnxruntime", OK, detail)


def _probe_model() -> bytes:
    """A one-node ONNX model (uint8 -> float cast, like the first op of an export)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], "sfdeploy_probe",
                              [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def check_onnxruntime_cuda() -> Check:
    """What ``infer --backend onnxruntime --device cuda`` does first: is the CUDA provider
    installed, and does a session on the GPU really run on it (not silently on the CPU)?"""
    name = "onnxruntime CUDA"
    if importlib.util.find_spec("onnxruntime") is None:
        return Check(name, WARN, "skipped: onnxruntime is not installed (see above)", "")
    import torch

    from sfdeploy.errors import SfdeployError
    from sfdeploy.runtime.placement import ORT_CUDA_PROVIDER, ort_cuda_installed

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if not ort_cuda_installed():
        if gpu:
            return Check(name, FAIL, f"torch sees {gpu} but onnxruntime is the CPU build (no {ORT_CUDA_PROVIDER}): "
                         "ONNX Runtime cannot use the GPU",
                         "pip uninstall -y onnxruntime && pip install 'sfdeploy[gpu]'")
        return Check(name, OK, f"{ORT_CUDA_PROVIDER} not installed (the CPU build): right for a machine without a GPU")
    if not gpu:
        return Check(name, OK, f"{ORT_CUDA_PROVIDER} installed, but torch sees no GPU: ONNX Runtime runs on the CPU")
    import numpy as np

    from sfdeploy.runtime.ort import open_session

    try:
        session = open_session(_probe_model(), "cuda:0")
        session.run(None, {"x": np.zeros((1, 4), dtype=np.uint8)})
    except SfdeployError as exc:
        return Check(name, FAIL, exc.message, exc.fix or "")
    return Check(name, OK, f"a session on cuda:0 ({gpu}) runs on {', '.join(session.get_providers())}")


def check_tritonclient() -> Check:
    """tritonclient with both protocols importable: what `infer` and `eval` talk to a server with."""
    version = _version("tritonclient")
    if version is None:
        return Check("tritonclient", FAIL, "not installed", f"pip install {_pins('tritonclient')}")
    try:
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401
    except ImportError as exc:
        return Check("tritonclient", FAIL, f"{version}: {exc}", f"pip install {_pins('tritonclient')}")
    return Check("tritonclient", OK, f"{version}, protobuf {_version('protobuf')}")


def check_tritonserver() -> Check:
    """The tritonserver binary found and starting (``--help``) with its environment: what `sfdeploy serve` runs."""
    from sfdeploy.errors import SfdeployError
    from sfdeploy.serving.install import find_tritonserver

    try:
        install = find_tritonserver()
    except SfdeployError as exc:
        return Check("tritonserver", FAIL, exc.message, exc.fix or "")
    import os

    env = install.env(dict(os.environ))
    try:
        out = subprocess.run([str(install.binary), "--help"], capture_output=True, text=True, env=env, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("tritonserver", FAIL, f"{install.binary}: {exc}",
                     f"pip install --force-reinstall {_pins('nvidia-pytriton')}")
    if "Usage: tritonserver" not in out.stdout + out.stderr:
        return Check("tritonserver", FAIL, f"{install.binary} does not run: {(out.stderr or out.stdout)[:200]}",
                     f"pip install --force-reinstall {_pins('nvidia-pytriton')}")
    return Check("tritonserver", OK, f"nvidia-pytriton {_version('nvidia-pytriton')}, python backend stub for "
                 f"{install.stub.parent.name}")


def check_python_backend_stub() -> Check:
    """The tritonserver python-backend stub for this Python loads: its shared libraries resolve
    with the library path ``serve`` gives it (``ldd``). A stub that cannot start makes the server
    wait for its model forever; ``serve`` fails fast with the stub's line, this says why first."""
    from sfdeploy.errors import SfdeployError
    from sfdeploy.serving.install import find_tritonserver, python_library_dir

    name = "python backend stub"
    try:
        install = find_tritonserver()
    except SfdeployError as exc:
        return Check(name, WARN, f"skipped: {exc.message} (see the tritonserver row)", "")
    import os

    try:
        out = subprocess.run(["ldd", str(install.stub)], capture_output=True, text=True, timeout=30,
                             env=install.env(dict(os.environ)))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check(name, WARN, f"cannot run ldd on {install.stub}: {exc}", "install ldd (libc-bin) to check it")
    links = dict(line.strip().split(" => ", 1) for line in out.stdout.splitlines() if " => " in line)
    missing = sorted(lib for lib, where in links.items() if where.startswith("not found"))
    py = install.stub.parent.name
    if missing:
        libpython = [lib for lib in missing if lib.startswith("libpython")]
        fix = (f"install the shared Python library {libpython[0]} (Debian/Ubuntu: apt-get install libpython{py}; "
               f"pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install {py}) or put its folder on "
               "LD_LIBRARY_PATH" if libpython else
               f"put the folder holding them on LD_LIBRARY_PATH, or pip install --force-reinstall "
               f"{_pins('nvidia-pytriton')}")
        return Check(name, FAIL, f"the stub for Python {py} cannot start: {', '.join(missing)} not found "
                     f"({install.stub})", fix)
    libpython = next((where.split(" (")[0] for lib, where in links.items() if lib.startswith("libpython")), "?")
    return Check(name, OK, f"Python {py} stub loads (libpython: {libpython}; this Python's: "
                 f"{python_library_dir() or 'static'})")


def check_ray() -> Check:
    """Optional (``sfdeploy[ray]``: ``infer --engine ray``, ``.parquet``), but its pyarrow is a trap."""
    version = _version("ray")
    if version is None:
        return Check("ray", WARN, "not installed (only `infer --engine ray` and .parquet files need it)",
                     "pip install 'sfdeploy[ray]'")
    try:
        import pyarrow
    except ImportError as exc:
        return Check("ray", FAIL, f"ray {version}; import pyarrow failed: {exc}",
                     "pip install 'sfdeploy[ray]' (its pyarrow pin fits numpy 1; newer pyarrow needs numpy>=2)")
    from sfdeploy.scale.cluster import SMALL_SHM, shm_free_bytes, shm_note

    free = shm_free_bytes()
    small = free is not None and free < SMALL_SHM
    return Check("ray", WARN if small else OK, f"ray {version}, pyarrow {pyarrow.__version__}, {shm_note()}",
                 "give the container more shared memory (docker run --shm-size=8g)" if small else "")


def check_gpu_decoders() -> Check:
    """GPU video decoding (NVDEC, optional): which decoders can run; a warning only on a GPU host
    without any (``infer --decode auto`` then decodes on the CPU)."""
    import torch

    from sfdeploy.decode.gpu.select import INSTALL_FIX, probe_backends

    statuses = probe_backends()
    detail = "; ".join(s.detail for s in statuses)
    if any(s.available for s in statuses):
        return Check("GPU video decoding", OK, detail)
    if torch.cuda.is_available():
        return Check("GPU video decoding", WARN, f"{detail}: videos are decoded on the CPU", INSTALL_FIX)
    return Check("GPU video decoding", OK, f"{detail} (optional: NVDEC on a GPU host)")


def check_cpu_bf16() -> Check:
    """Whether this CPU runs bf16 natively (what `export --precisions auto` and `repo` use on it)."""
    from sfdeploy.precision import cpu_bf16

    support = cpu_bf16()
    return Check("CPU bf16", OK, f"{support.how}: bf16 artifacts are exported, gated and served on this CPU"
                 if support.supported else f"{support.how}; fp32 on the CPU (optional: bf16 needs AVX512-BF16 or AMX)")


def check_aoti_compiler() -> Check:
    """AOTInductor (``export --formats aoti``, optional) compiles C++ for CPU packages and Triton
    kernels for CUDA ones: a C++ compiler, and on a GPU host the ``triton`` package."""
    import shutil

    import torch

    compiler = next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    missing = [] if compiler else ["a C++ compiler"]
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is None:
        missing.append("the triton package (CUDA kernels)")
    if missing:
        return Check("AOTInductor", WARN, f"{' and '.join(missing)} not found: `export --formats aoti` cannot compile "
                     "(the other formats need neither)", "apt-get install g++ (and pip install triton on a GPU host)")
    return Check("AOTInductor", OK, f"{compiler} ({shutil.which(compiler)}) for `export --formats aoti`")


CHECKS: list[Callable[[], Check]] = [
    check_python, check_torch, check_numpy, check_openmmlab, check_pkg_resources, check_opencv,
    check_decoders, check_gpu_decoders, check_onnx, check_onnxruntime_cuda, check_tritonclient, check_tritonserver,
    check_python_backend_stub, check_ray, check_cpu_bf16, check_aoti_compiler,
]


def run_checks() -> list[Check]:
    """Every check of :data:`CHECKS`, in order; a check that crashes is reported as a failed line, not raised."""
    results = []
    for check in CHECKS:
        try:
            results.append(check())
        except Exception as exc:  # a check that breaks is itself a finding, shown with the rest
            results.append(Check(check.__name__.removeprefix("check_"), FAIL, f"check crashed: {exc!r}",
                                 "report this with `sfdeploy doctor -v` output"))
    return results
