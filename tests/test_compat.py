"""sfdeploy.compat: the MMAction2, mmengine and decord traps, each handled and each tested."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sfdeploy import compat
from sfdeploy.errors import EnvironmentProblem, InputError


class _Boom:
    """Unpickling this object would create a file: the proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_mmaction_imports_and_builds_slowfast() -> None:
    compat.ensure_mmaction()
    from mmaction.registry import MODELS

    assert MODELS.get("Recognizer3D") is not None
    assert MODELS.get("ResNet3dSlowFast") is not None


def test_drn_placeholder_refuses_to_build_when_the_wheel_lacks_it() -> None:
    compat.ensure_mmaction()
    if not compat.missing_drn_module():
        pytest.skip("this mmaction2 install ships DRN")
    from mmaction.models.localizers import DRN

    with pytest.raises(EnvironmentProblem, match="DRN"):
        DRN()


def test_checkpoint_with_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": _Boom(str(marker))}, path)
    with pytest.raises(InputError, match="weights_only"):
        compat.load_checkpoint_file(path)
    assert not marker.exists()
    # mmengine's own loader (used by load_from, resume, init_recognizer) goes through the same gate
    compat.ensure_mmaction()
    from mmengine.runner.checkpoint import _load_checkpoint

    with pytest.raises(InputError):
        _load_checkpoint(str(path))
    assert not marker.exists()


def test_plain_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pth"
    path.write_bytes(pickle.dumps({"state_dict": {"w": [1, 2]}, "x": _Boom(str(tmp_path / "m"))}))
    with pytest.raises(InputError):
        compat.load_checkpoint_file(path)
    assert not (tmp_path / "m").exists()


def test_numpy_values_in_meta_load(tmp_path: Path) -> None:
    path = tmp_path / "published.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": {"seed": np.int64(3), "arr": np.arange(3.0)}}, path)
    loaded = compat.load_checkpoint_file(path)
    assert loaded["meta"]["seed"] == 3
    assert np.array_equal(loaded["meta"]["arr"], np.arange(3.0))


def test_missing_file_and_unreachable_url_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found") as info:
        compat.load_checkpoint_file(tmp_path / "nope.pth")
    assert info.value.fix
    with pytest.raises(InputError, match="download") as info:
        compat.load_checkpoint_file("http://127.0.0.1:9/weights.pth")
    assert "local .pth" in info.value.fix


def test_scoped_config_paths_resolve_without_pkg_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    from sfdeploy.train.presets import preset_path

    monkeypatch.setattr(compat, "has_pkg_resources", lambda: False)
    for name in ("slowfast_r50_4x16", "slowfast_r50_8x8", "slowfast_tiny"):  # 8x8: a local base too
        cfg = compat.load_config(preset_path(name))
        assert cfg.model.backbone.type == "ResNet3dSlowFast"
        assert cfg.default_scope == "mmaction"  # from the mmaction:: runtime base
        assert cfg.filename == str(preset_path(name))
    assert cfg.optim_wrapper.optimizer.type == "AdamW"
    eight = compat.load_config(preset_path("slowfast_r50_8x8"))
    assert eight.model.backbone.speed_ratio == 4 and eight.optim_wrapper.optimizer.lr == 1e-3


def test_unknown_mmaction_config_is_an_input_error() -> None:
    with pytest.raises(InputError, match="not found"):
        compat.mmaction_config_path("recognition/nope.py")


_MMACTION_BESIDE_TRANSFORMERS = """
import sfdeploy  # installs the import hook, imports nothing heavy
from importlib import metadata
from mmaction.apis import inference_recognizer, init_recognizer  # MMAction2's own API, no sfdeploy call
from mmaction.registry import MODELS
from sfdeploy.compat import multimodal_state
try:
    MODELS.build(dict(type="VindLURetrieval"))  # imports mmaction.models (the registry's locations)
except ImportError as exc:
    print("placeholder:", exc)
print(metadata.version("transformers"), "|", multimodal_state())
"""


def test_mmaction_imports_beside_the_real_transformers_5() -> None:
    """GPU images ship transformers 5, which mmaction2 1.2.0's multimodal models cannot import;
    [dev] installs the real package so this (and every other test) runs beside it."""
    import subprocess
    import sys
    from importlib import metadata

    if int(metadata.version("transformers").split(".")[0]) < 5:
        pytest.skip("needs transformers >= 5 (installed by sfdeploy[dev])")
    out = subprocess.run([sys.executable, "-c", _MMACTION_BESIDE_TRANSFORMERS], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    version, state = out.stdout.splitlines()[-1].split(" | ")
    assert int(version.split(".")[0]) >= 5
    assert state.startswith("multimodal models off: transformers 5")
    assert "placeholder: VindLURetrieval requires extra multi-modal dependencies" in out.stdout


def test_multimodal_gate_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decision, from package metadata: transformers 5 or a missing VindLU import turns the
    multimodal models off; no transformers leaves MMAction2's own rule (it leaves them out)."""
    from importlib import metadata

    def versions(v: str | None, missing: tuple[str, ...] = ()) -> str | None:
        def version(name: str) -> str:
            if name != "transformers" or v is None:
                raise metadata.PackageNotFoundError(name)
            return v
        monkeypatch.setattr(metadata, "version", version)
        monkeypatch.setattr(compat.importlib.util, "find_spec",
                            lambda name, *a: None if name in missing else object())
        return compat.multimodal_unavailable()

    assert versions(None) is None
    assert "transformers 5.0.0" in versions("5.0.0")
    assert "without timm" in versions("4.46.0", missing=("timm",))
    assert versions("4.46.0", missing=("einops", "scipy")).endswith("without einops, scipy (VindLU imports them)")
    assert versions("4.46.0") is None  # everything VindLU imports is there: MMAction2 imports it


_VP9_AFTER_DECORD = """
import sys, tempfile
from pathlib import Path
if sys.argv[1] == "sfdeploy-first":
    import sfdeploy  # noqa: F401  (its import hook)
import ctypes, decord  # decord's library and its libvpx 6.4 loaded first, as a decode would
from sfdeploy.bench.sweep import SweepVideo, make_sweep
paths, refused = make_sweep(Path(tempfile.mkdtemp()), [SweepVideo("vp9", 128, 96)], frames=4)
print(ctypes.RTLD_GLOBAL == ctypes.RTLD_LOCAL, refused or "encoded", decord.VideoReader(str(paths[0]))[0].shape
      if paths else "-")
"""


@pytest.mark.parametrize("order", ["sfdeploy-first", "decord-first"])
def test_decord_keeps_its_libvpx_to_itself_so_pyav_encodes_vp9_after_it(order: str) -> None:
    """Trap 5: decord's RTLD_GLOBAL library once made PyAV's libvpx-vp9 encoder refuse to open
    (EINVAL) in any process that had decoded with decord first. After ``import sfdeploy`` it loads
    locally and both work; without sfdeploy's hook the trap is still there (the proof it is real)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _VP9_AFTER_DECORD, order], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    if order == "sfdeploy-first":
        assert out.stdout.split() == ["False", "encoded", "(96,", "128,", "3)"]  # and ctypes is as it was
    else:  # sfdeploy.decode.gpu imports sfdeploy only after decord had loaded globally
        assert "avcodec_open2(\"libvpx-vp9\"" in out.stdout and "returned 22" in out.stdout
