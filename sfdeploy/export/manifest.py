"""``EXPORT/manifest.json``: what was exported, from what, and how well it matches.

The manifest is the export's table of contents for people and tools: the clip spec, the
input/output tensors, each artifact (file, precision, size, sha256), the source work dir and
checkpoint, and the parity gate's results. The clip spec is also embedded in each artifact, so
an artifact copied without its manifest still describes itself.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sfdeploy.clipspec import ClipSpec
from sfdeploy.errors import InputError

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1

#: artifact key -> (format, precision, file name)
ARTIFACTS: dict[str, tuple[str, str, str]] = {
    "torchscript": ("torchscript", "fp32", "model.pt"),
    "onnx": ("onnx", "fp32", "model.onnx"),
    "torchscript_fp16": ("torchscript", "fp16", "model_fp16.pt"),
    "onnx_fp16": ("onnx", "fp16", "model_fp16.onnx"),
}
FORMATS = ("torchscript", "onnx")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Artifact:
    format: str
    precision: str
    file: str
    size_bytes: int
    sha256: str


@dataclass
class Manifest:
    clip_spec: ClipSpec
    artifacts: dict[str, Artifact]
    source: dict[str, Any]
    parity: dict[str, Any] = field(default_factory=dict)
    averaging: str = "prob"
    format_version: int = FORMAT_VERSION

    @property
    def input(self) -> dict[str, Any]:
        return {"name": "frames", "dtype": "uint8", "shape": [-1, *self.clip_spec.input_shape],
                "layout": "N V T H W C", "channel_order": self.clip_spec.channel_order}

    @property
    def output(self) -> dict[str, Any]:
        return {"name": "probs", "dtype": "float32", "shape": [-1, self.clip_spec.num_classes]}

    @property
    def parity_passed(self) -> bool:
        return bool(self.parity) and all(r.get("passed") for r in self.parity.get("artifacts", {}).values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "clip_spec": self.clip_spec.to_dict(),
            "input": self.input,
            "output": self.output,
            "averaging": self.averaging,
            "artifacts": {k: asdict(v) for k, v in self.artifacts.items()},
            "source": self.source,
            "parity": self.parity,
        }

    def write(self, export_dir: Path) -> Path:
        path = Path(export_dir) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, export_dir: Path) -> Manifest:
        export_dir = Path(export_dir)
        path = export_dir / MANIFEST_FILE
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
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"unreadable manifest ({exc})", path=path, fix="re-run `sfdeploy export`") from exc

    def artifact_path(self, export_dir: Path, key: str) -> Path:
        if key not in self.artifacts:
            raise InputError(f"the export has no {key} artifact (it has: {', '.join(self.artifacts)})",
                             path=export_dir, fix="re-export with the format you need")
        path = Path(export_dir) / self.artifacts[key].file
        if not path.is_file():
            raise InputError("artifact listed in the manifest is missing", path=path, fix="re-run `sfdeploy export`")
        return path
