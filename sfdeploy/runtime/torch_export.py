"""ExportedProgram predictor (``torch.export.load``; CUDA or CPU): the graph torch.export recorded,
run by torch's own interpreter of it, with no model code.

**Never an unpickled object.** A ``.pt2`` archive stores tensors as raw bytes, but the format also
allows pickled weights, constants and custom objects, and ``torch.export.load`` unpickles those
(falling back to ``weights_only=False`` where a safe load fails). :func:`check_archive` reads the
archive's own tables first and refuses one that holds anything but raw tensors and JSON, before
torch reads it: an artifact from elsewhere cannot run code by being opened.

An fp32 program is traced on the CPU (:func:`sfdeploy.export.formats.trace_device`); on a GPU it
is moved there with ``torch.export.passes.move_to_device_pass``, which also rewrites the devices
the graph names (a plain ``.to()`` of its module would leave those on the CPU).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from sfdeploy.artifacts import ARTIFACT_INFO_KEY
from sfdeploy.clipspec import SPEC_KEY, ClipSpec
from sfdeploy.errors import InputError
from sfdeploy.runtime.torch_base import Loaded, TorchPredictor, parse_info

SPEC_FILE = f"{SPEC_KEY}.json"  # extra files inside the archive, as in model.pt
INFO_FILE = f"{ARTIFACT_INFO_KEY}.json"
_FIX = "use a model written by `sfdeploy export` (re-run it)"
#: constants stored as pickled objects, by the prefix of their file name in the archive
_OBJECT_PREFIXES = ("custom_obj", "opaque_obj")


def _refuse(why: str, path: Path) -> InputError:
    return InputError(f"not a safe ExportedProgram: {why}; sfdeploy never unpickles a model file", path=path,
                      fix=_FIX)


def check_archive(path: Path) -> None:
    """Refuse a ``.pt2`` file that is not a zip archive, or whose weights, constants or sample
    inputs are pickled objects (anything torch would load with ``weights_only=False``)."""
    import torch

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"not an ExportedProgram (.pt2) archive ({exc})", path=path, fix=_FIX) from exc
    with archive:
        names = archive.namelist()
        if not any(n.endswith("/models/model.json") for n in names):
            raise InputError("not an ExportedProgram (.pt2) archive (no models/model.json)", path=path, fix=_FIX)
        for name in names:
            folder = name.split("/")
            if name.endswith("_config.json") and "data" in folder:  # weights / constants tables
                for fqn, entry in json.loads(archive.read(name)).get("config", {}).items():
                    if entry.get("use_pickle") or str(entry.get("path_name", "")).startswith(_OBJECT_PREFIXES):
                        raise _refuse(f"'{fqn}' is a pickled object", path)
            elif "data" in folder and name.endswith(".pt"):  # legacy pickled weights, sample inputs
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception as exc:  # noqa: BLE001 - any failure of the safe loader: refused
                    raise _refuse(f"{name.split('/', 1)[-1]} does not load as plain tensors", path) from exc


def load_exported_program(path: Path, device: str = "cpu") -> Loaded:
    """The program's module on ``device``, its clip spec and facts (after :func:`check_archive`)."""
    import torch

    check_archive(path)
    extra = {SPEC_FILE: "", INFO_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:  # torch raises many types for a file it cannot read
        raise InputError(f"not a loadable ExportedProgram ({type(exc).__name__}: {str(exc)[:200]})", path=path,
                         fix=_FIX + "; an ExportedProgram loads in the torch that wrote it or newer") from exc
    if not extra[SPEC_FILE]:
        raise InputError("the ExportedProgram has no sfdeploy clip spec", path=path, fix=_FIX)
    if torch.device(device) != _program_device(program):
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return Loaded(program.module(), ClipSpec.from_json(extra[SPEC_FILE]), parse_info(extra[INFO_FILE], path))


def _program_device(program: object) -> object:
    import torch

    state = list(program.state_dict.values())  # type: ignore[attr-defined]
    return state[0].device if state else torch.device("cpu")


class ExportedProgramPredictor(TorchPredictor):
    """An ExportedProgram (``model.pt2``), run eagerly by torch from its recorded graph."""

    format = "torch_export"

    def load(self, path: Path, device: str) -> Loaded:
        """The ExportedProgram's module on ``device``, with its clip spec and facts."""
        return load_exported_program(path, device)
