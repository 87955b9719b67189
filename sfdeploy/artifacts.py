"""What an export *is*: the one home for the facts every layer reads about artifacts.

``export/`` writes artifacts, ``runtime/``, ``serving/``, ``bench/`` and ``evaluate`` open them;
none of them keeps its own copy of:

* the artifact keys (format x precision) and their file names (:func:`artifact_key`,
  :func:`artifact_file`), the formats and which backend runs which format;
* the tensor names of the deployed model (:data:`INPUT_NAME`, :data:`OUTPUT_NAME`), and of the
  served model that decodes on the server (:func:`video_model_name`, :data:`VIDEO_INPUT`, ...);
* the self-check tolerances an exporter holds its reloaded artifact to;
* ``EXPORT/manifest.json`` (:class:`Manifest`): the clip spec, tensors, each artifact's file,
  size and sha256, the source checkpoint and the parity results;
* the integrity check on open: :meth:`Manifest.artifact_path` hashes the file and refuses one
  that is not the file the manifest vouches for (a re-export killed half-way, a copy gone wrong).

Devices are not its business: :mod:`sfdeploy.device` owns the device vocabulary, and
:mod:`sfdeploy.runtime.placement` says where each local backend runs for a requested device.

Light on purpose (no torch at import time): the CLI's ``--help`` reads these names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sfdeploy.clipspec import ClipSpec
from sfdeploy.errors import ExportError, InputError
from sfdeploy.fsutil import atomic_write_text
from sfdeploy.precision import PRECISIONS  # artifacts are named by them

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1

INPUT_NAME = "frames"  # uint8 [N, V, T, H, W, 3], RGB
OUTPUT_NAME = "probs"  # float32 [N, num_classes]

# <name>_video, the served model that takes encoded videos (server-side decoding); its probabilities
# are OUTPUT_NAME, as the model's.
VIDEO_INPUT = "video"  # BYTES [N, 1]: the bytes of one encoded video file per item
LABEL_OUTPUT = "label"  # BYTES [N, 1]: the top-1 class name ("" for an item that failed)
ERROR_OUTPUT = "error"  # BYTES [N, 1]: why an item failed ("" for an item that was classified)
DECODER_OUTPUT = "decoder"  # BYTES [N, 1]: which decoder read the item (pyav, nvdec:<backend>; "" if none)
DECODER_REASON_OUTPUT = "decoder_reason"  # BYTES [N, 1]: why that decoder (sfdeploy.decode.gpu.select)
#: how <name>_video's refusal of a request that asks for a decoder it does not have begins: the
#: request's option, not its videos, is at fault (the client says so, whatever the batch)
DECODE_REFUSED = "decoder refused:"
DECODE_PARAMETER = "decode"  # <name>_video's request parameter: where to decode it (auto | cpu | gpu)


def video_model_name(name: str) -> str:
    """The served model that decodes videos for model ``name`` on the server."""
    return f"{name}_video"

#: what `sfdeploy export` can write: TorchScript (``torch.jit.trace``; deprecated upstream, loaded by
#: Triton's pytorch backend), ONNX (Triton's onnxruntime backend, ONNX Runtime anywhere), torch.export's
#: ExportedProgram (``torch.export``: the serialisation PyTorch keeps, run from its own graph, no model
#: code) and an AOTInductor package (that program compiled ahead of time for one device and one torch
#: build: :mod:`sfdeploy.export.aoti`)
FORMATS: tuple[str, ...] = ("torchscript", "onnx", "torch_export", "aoti")
#: what it writes unless told: the AOTInductor package is opt-in (minutes of compilation for R50, and
#: only for the device and torch build it is compiled on)
DEFAULT_FORMATS: tuple[str, ...] = ("torchscript", "onnx", "torch_export")
_SUFFIX = {"torchscript": ".pt", "onnx": ".onnx", "torch_export": ".pt2", "aoti": ".aoti.pt2"}

#: the in-process backend that runs each format (the names users pass as --backend / --runtime)
BACKEND_FORMAT: dict[str, str] = {"onnxruntime": "onnx", "torchscript": "torchscript",
                                  "torch_export": "torch_export", "aoti": "aoti"}
LOCAL_BACKENDS: tuple[str, ...] = tuple(BACKEND_FORMAT)
FORMAT_BACKEND: dict[str, str] = {fmt: backend for backend, fmt in BACKEND_FORMAT.items()}

#: max |probability difference| between an exported artifact, reloaded, and the module it came from
# bf16 keeps 8 significant bits to fp16's 11: its rounding differences are ~8x larger
SELF_CHECK_TOLERANCE: dict[str, float] = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 4e-2}

#: the parity gate (sfdeploy.export.parity): an fp32 artifact's probabilities within
#: max(FP32_MAX_ABS_DIFF, DEVICE_NOISE_FACTOR x the device's measured noise) of MMAction2 in fp32 on the
#: CPU, an fp16 one the same top-1 on at least FP16_MIN_TOP1_AGREEMENT of the clips
FP32_MAX_ABS_DIFF = 1e-4
# an artifact on a GPU may be this many times as far from the CPU truth as MMAction2 itself is there
DEVICE_NOISE_FACTOR = 2.0
FP16_MIN_TOP1_AGREEMENT = 0.99
#: ... and, for every reduced precision, its probabilities within this of the truth: loose (bf16
#: keeps 8 significant bits: the demo's bf16 model is 6e-3 off), it catches an artifact whose top-1
#: agrees by luck on a few classes while its numbers are wrong
REDUCED_MAX_ABS_DIFF: dict[str, float] = {"fp16": 5e-2, "bf16": 1e-1}

#: the key of the facts every artifact carries about itself (format, precision, the versions that
#: wrote it, the device it was compiled for): a TorchScript / ExportedProgram extra file, ONNX
#: metadata, AOTInductor package metadata
ARTIFACT_INFO_KEY = "sfdeploy_artifact"


def self_check(diff: float, precision: str, *, failure: str, path: Path, fix: str, device: str, runtime: str,
               reference_device: str) -> dict[str, Any]:
    """The manifest's ``self_check`` entry of an exported artifact whose reloaded outputs differ
    from its module's by ``diff``; over :data:`SELF_CHECK_TOLERANCE`, an ``ExportError`` saying
    ``failure`` instead."""
    tolerance = SELF_CHECK_TOLERANCE[precision]
    if diff > tolerance:
        raise ExportError(f"{failure} (max abs diff {diff:.2e})", path=path, fix=fix)
    return {"device": device, "runtime": runtime, "reference_device": reference_device, "max_abs_diff": diff,
            "tolerance": tolerance}


def parse_formats(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"torchscript,onnx"`` (or a sequence) -> the formats to export, refused if empty or unknown:
    the one check of ``export --formats`` and of ``ExportOptions.formats``."""
    chosen = tuple(f.strip() for f in (value.split(",") if isinstance(value, str) else value) if f.strip())
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise InputError(f"unknown format(s) to export: {', '.join(unknown) or '(none)'}",
                         fix=f"use --formats with any of: {', '.join(FORMATS)} (comma-separated)")
    return chosen


def artifact_key(fmt: str, precision: str = "fp32") -> str:
    """``torchscript``, ``onnx_fp16``, ...: how the manifest names an artifact."""
    from sfdeploy.precision import UNSUPPORTED

    if fmt not in FORMATS or precision not in PRECISIONS:
        raise InputError(f"no artifact {fmt} {precision}",
                         fix=f"formats: {', '.join(FORMATS)}; precisions: {', '.join(PRECISIONS)}")
    if (fmt, precision) in UNSUPPORTED:
        raise InputError(f"there is no {precision} {fmt} artifact: {UNSUPPORTED[fmt, precision]}",
                         fix=f"use another precision for {fmt}, or another format for {precision}")
    return fmt if precision == "fp32" else f"{fmt}_{precision}"


def artifact_file(fmt: str, precision: str = "fp32") -> str:
    """``model.pt``, ``model_fp16.onnx``, ...: the file an artifact is written to."""
    stem = "model" if precision == "fp32" else f"model_{precision}"
    return stem + _SUFFIX[fmt]


def backend_format(backend: str) -> str:
    """The artifact format a local backend runs."""
    if backend not in BACKEND_FORMAT:
        raise InputError(f"unknown local backend '{backend}'", fix=f"use one of: {', '.join(LOCAL_BACKENDS)}")
    return BACKEND_FORMAT[backend]


def sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks (artifacts are hundreds of MB): what the manifest records
    and every open verifies."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, *, fix: str = "re-run `sfdeploy export`") -> Path:
    """``path`` if its content hashes to ``expected``, else a clear error: the file is not the one
    that was exported and checked (replaced, truncated, or a re-export was killed half-way)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("artifact is missing", path=path, fix=fix)
    if sha256(path) != expected:
        raise InputError("artifact does not match the sha256 recorded for it (a re-export killed half-way, "
                         "or a file replaced after export)", path=path, fix=fix)
    return path


@dataclass
class Artifact:
    """One exported file, as the manifest describes it: format, precision, name, size and sha256 (checked on
    open), the rewrites it was made with, and the facts it carries about itself."""

    format: str
    precision: str
    file: str
    size_bytes: int
    sha256: str
    # the graph rewrites it was made with (sfdeploy.export.rewrites.STEPS), and for which device
    rewrites: list[str] = field(default_factory=list)
    optimized_for: str = ""
    # what it says about itself (ARTIFACT_INFO_KEY: the versions that wrote it, an AOTInductor
    # package's device), the facts of its format (ONNX IR version and opset, ...), and the oldest
    # runtimes and Triton containers that load it (sfdeploy.compatibility)
    info: dict[str, Any] = field(default_factory=dict)
    loads_in: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, fmt: str, precision: str, path: Path, file: str | None = None, rewrites: list[str] | None = None,
           optimized_for: str = "", info: dict[str, Any] | None = None) -> Artifact:
        """Describe the file at ``path`` (named ``file`` in the export, default its own name) and
        what ``info`` (the facts it carries) says about where it loads."""
        from sfdeploy.compatibility import loads_in

        path = Path(path)
        info = dict(info or {})
        return cls(fmt, precision, file or path.name, path.stat().st_size, sha256(path), list(rewrites or []),
                   optimized_for, info, loads_in(fmt, info))

    @property
    def device_kind(self) -> str | None:
        """``cpu`` or ``cuda`` for an artifact that only runs there (an AOTInductor package), else None."""
        return self.info.get("compiled_for")


@dataclass
class Manifest:
    """``EXPORT/manifest.json``: the export's table of contents. The clip spec is also embedded
    in each artifact, so an artifact copied without its manifest still describes itself."""

    clip_spec: ClipSpec
    artifacts: dict[str, Artifact]
    source: dict[str, Any]
    parity: dict[str, Any] = field(default_factory=dict)
    averaging: str = "prob"
    format_version: int = FORMAT_VERSION
    # how fast each artifact that passed the gate ran where it was gated (sfdeploy.export.timing):
    # what `repo --runtime auto --precision auto` chooses from
    timings: dict[str, Any] = field(default_factory=dict)
    # the machine the export ran on: its device and what its CPU runs natively (bf16)
    host: dict[str, Any] = field(default_factory=dict)

    @property
    def input(self) -> dict[str, Any]:
        """The input tensor every artifact takes (name, uint8, dynamic batch, layout), for users' runtimes and
        Triton configs."""
        return {"name": INPUT_NAME, "dtype": "uint8", "shape": [-1, *self.clip_spec.input_shape],
                "layout": "N V T H W C", "channel_order": self.clip_spec.channel_order}

    @property
    def output(self) -> dict[str, Any]:
        """The output tensor every artifact returns (float32 probabilities, one per class)."""
        return {"name": OUTPUT_NAME, "dtype": "float32", "shape": [-1, self.clip_spec.num_classes]}

    @property
    def parity_passed(self) -> bool:
        """Whether the parity gate ran and every artifact passed it: what `repo` requires before serving."""
        return bool(self.parity) and all(r.get("passed") for r in self.parity.get("artifacts", {}).values())

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON, with the input and output tensors spelt out for readers that do not know the
        clip spec."""
        return {
            "format_version": self.format_version,
            "clip_spec": self.clip_spec.to_dict(),
            "input": self.input,
            "output": self.output,
            "averaging": self.averaging,
            "artifacts": {k: asdict(v) for k, v in self.artifacts.items()},
            "source": self.source,
            "parity": self.parity,
            "timings": self.timings,
            "host": self.host,
        }

    def write(self, export_dir: Path) -> Path:
        """Write atomically (temporary file + rename): a reader sees the old or the new manifest."""
        path = Path(export_dir) / MANIFEST_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, export_dir: Path) -> Manifest:
        """The manifest of ``export_dir``, or an :class:`InputError` that says what is wrong with the folder
        (missing, not an export, written by another format version)."""
        export_dir = Path(export_dir)
        path = export_dir / MANIFEST_FILE
        if not export_dir.is_dir():
            raise InputError("the export folder does not exist" if not export_dir.exists() else "not a folder",
                             path=export_dir, fix="pass the --out folder of `sfdeploy export` (`sfdeploy demo` makes "
                                                  "sfdeploy-demo/export)")
        if not path.is_file():
            raise InputError(f"no {MANIFEST_FILE} in the export folder", path=export_dir,
                             fix="pass the --out folder of `sfdeploy export`")
        try:
            data = json.loads(path.read_text())
            if data.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {data.get('format_version')}, expected {FORMAT_VERSION}")
            return cls(
                clip_spec=ClipSpec.from_dict(data["clip_spec"]),
                artifacts={k: Artifact(**v) for k, v in data["artifacts"].items()},
                source=data["source"],
                parity=data.get("parity", {}),
                averaging=data.get("averaging", "prob"),
                timings=data.get("timings", {}),
                host=data.get("host", {}),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"unreadable manifest ({exc})", path=path, fix="re-run `sfdeploy export`") from exc

    def artifact(self, key: str, export_dir: Path) -> Artifact:
        """The entry of artifact ``key``, or an error naming the artifacts the export does have."""
        if key not in self.artifacts:
            raise InputError(f"the export has no {key} artifact (it has: {', '.join(self.artifacts)})",
                             path=export_dir, fix="re-export with the format / precision you need")
        return self.artifacts[key]

    def artifact_path(self, export_dir: Path, key: str) -> Path:
        """The path of artifact ``key``, verified against its recorded sha256."""
        artifact = self.artifact(key, export_dir)
        return verify_sha256(Path(export_dir) / artifact.file, artifact.sha256)
