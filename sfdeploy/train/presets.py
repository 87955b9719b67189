"""Finetuning presets: the MMAction2 configs in ``finetune/`` (installed as ``sfdeploy.presets``)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from sfdeploy.errors import InputError

DEFAULT_PRESET = "slowfast_r50_4x16"


def _preset_dir() -> Path:
    return Path(str(importlib.resources.files("sfdeploy.presets")))


def available_presets() -> list[str]:
    """The preset names ``--preset`` accepts: the configs shipped in ``finetune/`` (installed as
    ``sfdeploy.presets``), helpers (``_*.py``) left out."""
    return sorted(p.stem for p in _preset_dir().glob("*.py") if not p.name.startswith("_"))


def preset_path(name_or_path: str) -> Path:
    """The config file of a preset name, or a user's own MMAction2 config given by path."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".py":
        if not candidate.is_file():
            raise InputError("config file not found", path=candidate,
                             fix=f"pass an existing MMAction2 config or one of: {', '.join(available_presets())}")
        return candidate.resolve()
    path = _preset_dir() / f"{name_or_path}.py"
    if name_or_path.startswith("_") or not path.is_file():
        raise InputError(f"unknown preset '{name_or_path}'",
                         fix=f"use one of: {', '.join(available_presets())} (or a path to a config .py)")
    return path


def clip_frames(name_or_path: str = DEFAULT_PRESET) -> int:
    """Frames one clip of the preset's test pipeline spans (clip_len x frame_interval): videos
    shorter than this are what ``data prepare`` keeps and reports as short."""
    from sfdeploy.clipspec import ClipSpec
    from sfdeploy.compat import load_config

    return ClipSpec.from_config(load_config(preset_path(name_or_path))).min_frames
