"""sfdeploy as a library, run the ways users run Python: the README's example as a script without a
``__main__`` guard, from standard input and from ``python -c``; MMAction2's own APIs on WORK in a
fresh interpreter after a plain ``import sfdeploy``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

NARROW = "move_right/narrow_72.mp4"  # a width decord mis-decodes: PyAV reads it, in every path


def readme_python_example(marker: str) -> str:
    """The README's ```python block that contains ``marker``, verbatim."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"expected one README python block with {marker!r}, found {len(found)}"
    return found[0]


def _narrow_video(path: Path, seed: int) -> Path:
    from sfdeploy.data.synth import encode_h264, render_clip

    frames = render_clip("move_right", 48, 96, np.random.default_rng(seed))[:, :, 12:84]  # 72 px wide
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_h264(frames))
    return path


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory: pytest.TempPathFactory, tiny_export: Path, synth_root: Path) -> Path:
    """A user's folder after `sfdeploy demo`: sfdeploy-demo/export (the suite's export) and
    sfdeploy-demo/videos (a few of the synthetic videos)."""
    root = tmp_path_factory.mktemp("user")
    (root / "sfdeploy-demo").mkdir()
    (root / "sfdeploy-demo" / "export").symlink_to(tiny_export)
    videos = root / "sfdeploy-demo" / "videos"
    for cls in ("move_left", "move_right"):
        for video in sorted((synth_root / cls).glob("*.mp4"))[:3]:
            (videos / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(video, videos / cls / video.name)
    _narrow_video(videos / NARROW, seed=3)
    return root


@pytest.mark.parametrize("how", ["script", "stdin", "-c"])
def test_readme_python_example_runs_as_users_run_it(user_dir: Path, how: str) -> None:
    code = readme_python_example("Classifier.from_export(EXPORT")
    assert "__main__" not in code  # the point: no guard
    script = user_dir / "classify.py"
    script.write_text(code)
    command = {"script": [sys.executable, str(script)], "stdin": [sys.executable, "-"],
               "-c": [sys.executable, "-c", code]}[how]
    result = subprocess.run(command, cwd=user_dir, input=code if how == "stdin" else None, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    videos = sorted(p.relative_to(user_dir).as_posix() for p in (user_dir / "sfdeploy-demo/videos").rglob("*.mp4"))
    rows = [line.split() for line in result.stdout.splitlines()]
    classified = {row[0]: row for row in rows if len(row) == 5}
    assert sorted(classified) == videos  # every video once
    assert all(row[1] == "ok" and row[4] == "None" for row in classified.values()), classified
    from_bytes = [row for row in rows if row[1:3] == ["from", "bytes:"]]
    assert len(from_bytes) == 1 and from_bytes[0][3] == classified[from_bytes[0][0]][2]


def test_the_readme_example_without_the_demo_says_the_export_folder_does_not_exist(tmp_path: Path) -> None:
    code = readme_python_example("Classifier.from_export(EXPORT")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    said = result.stderr.strip().splitlines()
    assert said[-2] == "sfdeploy.errors.InputError: the export folder does not exist: sfdeploy-demo/export", said
    assert "`sfdeploy demo`" in said[-1] and said[-1].startswith("  fix: ")


def test_mmaction2_apis_work_on_work_after_import_sfdeploy(tiny_run: Path, synth_root: Path,
                                                           tmp_path: Path) -> None:
    """A fresh interpreter: ``import sfdeploy`` (light), then MMAction2's init_recognizer and
    inference_recognizer on WORK, whose checkpoint loads under torch's weights_only default and
    whose test pipeline decodes with SfdeployVideoDecode (a 72 px video included). Predictions equal
    MMAction2's, computed here with MMAction2's own decoders (DecordDecode, PyAVDecode)."""
    from sfdeploy.clipspec import ClipSpec
    from sfdeploy.export.parity import mmaction_reference
    from sfdeploy.train.trained import find_checkpoint, load_trained

    videos = [str(v) for cls in ("move_left", "move_right", "move_up")
              for v in sorted((synth_root / cls).glob("*.mp4"))[:2]]
    videos.append(str(_narrow_video(tmp_path / "narrow_72.mp4", seed=5)))
    code = f"""
import json, sys
import sfdeploy
heavy = [m for m in ("torch", "mmaction", "mmengine", "mmcv", "decord", "av", "cv2") if m in sys.modules]
assert heavy == [], heavy
from mmaction.apis import inference_recognizer, init_recognizer
model = init_recognizer({str(tiny_run / "config.py")!r}, {str(find_checkpoint(tiny_run))!r}, device="cpu")
print(json.dumps([int(inference_recognizer(model, path).pred_score.argmax()) for path in {videos!r}]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    predicted = json.loads(result.stdout.strip().splitlines()[-1])

    trained = load_trained(tiny_run)
    spec = ClipSpec.from_config(trained.cfg, trained.class_names)  # the config's test pipeline, all views
    reference = mmaction_reference({"cpu": trained.recognizer}, spec, [Path(v) for v in videos],
                                   show_progress=False).probs["cpu"]
    assert predicted == [int(i) for i in reference.argmax(1)]
    labels = [trained.class_names.index(Path(v).parent.name) for v in videos[:-1]]
    assert sum(p == t for p, t in zip(predicted[:-1], labels, strict=True)) >= len(labels) - 1  # not chance
