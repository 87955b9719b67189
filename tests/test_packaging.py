"""What a wheel install gets: every sfdeploy package, and the presets from finetune/."""

from __future__ import annotations

import sys

from conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10, which pyproject.toml allows: the backport (in the dev extra)
    import tomli as tomllib


def test_every_subpackage_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "sfdeploy").rglob("__init__.py")}
    assert on_disk | {"sfdeploy.presets"} == listed


def test_presets_in_finetune_are_the_installed_presets() -> None:
    from sfdeploy.train.presets import available_presets

    assert sorted(p.stem for p in (REPO / "finetune").glob("*.py") if not p.name.startswith("_")) == \
        available_presets()
