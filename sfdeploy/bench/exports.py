"""The benchmark's own export: made once, kept, and reused by every later stage and resume.

The artifacts are exported from the very module the eager rows time (no parity gate here: that is
``export``'s job, on trained weights), so a random-weight R50 needs no training. Each artifact is
added to the manifest as soon as it is written, so an interrupted export keeps what it finished
and a re-run exports only the missing ones. Exporting the R50 is minutes; the folder is kept (it is
``--export DIR``, or ``<record>.work/export`` beside the record), never deleted at exit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sfdeploy.artifacts import MANIFEST_FILE, Artifact, Manifest, artifact_file, artifact_key
from sfdeploy.bench.model import BenchModel
from sfdeploy.errors import InputError

log = logging.getLogger("sfdeploy")

Need = tuple[str, str]  # (format, precision)


def _source(model: BenchModel) -> dict[str, str]:
    return {"benchmark": model.name}


def open_bench_export(export_dir: Path, model: BenchModel) -> Manifest | None:
    """The manifest of an earlier bench export of ``model`` in ``export_dir`` (None if there is
    none yet); an export of anything else is an error, never overwritten."""
    export_dir = Path(export_dir)
    if not (export_dir / MANIFEST_FILE).is_file():
        if export_dir.is_dir() and any(p.suffix in (".pt", ".onnx", ".pt2") for p in export_dir.iterdir()):
            raise InputError("--export holds model files but no manifest.json", path=export_dir,
                             fix="pass an empty or new folder, or one an earlier `sfdeploy bench` wrote")
        return None
    manifest = Manifest.read(export_dir)
    if manifest.source != _source(model) or manifest.clip_spec.to_dict() != model.spec.to_dict():
        raise InputError(f"--export is not a benchmark export of {model.name} (it holds {manifest.source})",
                         path=export_dir, fix="pass an empty or new folder, or one an earlier `sfdeploy bench` "
                                              "of the same model wrote (`sfdeploy export` folders are not reused)")
    return manifest


def ensure_bench_export(model: BenchModel, needs: list[Need], device: str, export_dir: Path,
                        rewrites: str = "auto") -> Path:
    """``export_dir`` with every (format, precision) of ``needs``, exporting only those missing,
    made with ``rewrites`` (``auto``: what `sfdeploy export` makes on ``device``; ``none``: the
    plain graph). One folder holds one kind: the plain export lives in its own folder."""
    from sfdeploy.bench.suites import deploy_module, random_clips
    from sfdeploy.export.formats import trace_device, write_artifact
    from sfdeploy.export.run import resolve_rewrites

    export_dir = Path(export_dir)
    manifest = open_bench_export(export_dir, model) or Manifest(
        clip_spec=model.spec, artifacts={}, source=_source(model),
        parity={"skipped": "benchmark artifacts: exported from the module the eager rows time"})
    missing = [(fmt, p) for fmt, p in dict.fromkeys(needs) if artifact_key(fmt, p) not in manifest.artifacts]
    if not missing:
        return export_dir
    export_dir.mkdir(parents=True, exist_ok=True)
    for fmt, precision in missing:
        where = trace_device(fmt, precision, device)  # as `sfdeploy export` traces it
        module = deploy_module(model, precision, where, rewrites)
        example = torch.from_numpy(random_clips(model.spec, 2)).to(where)
        path = export_dir / artifact_file(fmt, precision)
        log.info("bench: exporting %s %s (rewrites: %s) to %s", fmt, precision, rewrites, path)
        written = write_artifact(fmt, module, example, path, model.spec.to_json(), precision,
                                 check_device="cpu")  # (ONNX's; a torch artifact is checked where it was traced)
        names = resolve_rewrites(rewrites, device).names
        manifest.artifacts[artifact_key(fmt, precision)] = Artifact.of(
            fmt, precision, path, rewrites=names, optimized_for=device if names else "", info=written.info)
        manifest.write(export_dir)  # each finished artifact is kept, whatever happens next
        del module
    return export_dir
