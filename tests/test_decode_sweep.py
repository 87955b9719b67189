"""Every frame width from 16 to 1920 px decodes, with the same pixels in training and serving.

One h264 clip per width (even widths yuv420p, which needs even sizes; odd widths yuv444p), small
heights and four frames so that the whole sweep of 1905 clips runs in seconds. Each clip goes
through MMAction2's pipeline with the registered ``SfdeployVideoInit`` / ``SfdeployVideoDecode``
(what ``WORK/config.py`` trains with; it decodes with ``sfdeploy.decode``, the client's decoder:
decord's index, PyAV's frames), is decoded independently with PyAV, and by decord itself. Asserted:

* every width decodes;
* the frame counts agree: decord's (the pipeline's ``total_frames``, which sampling uses), the
  frames PyAV decodes, and the container's count that MMAction2's ``PyAVInit`` reads;
* the pipeline's frames are byte-identical to PyAV's, and decoded by PyAV (``decoder == "pyav"``);
* PyAV's frames are byte-identical to decord's on every width decord decodes (what makes PyAV a
  stand-in for MMAction2's decoder), and decord fails, with its width-bug error, on exactly
  :data:`DECORD_FAILS`, where MMAction2's own ``PyAVInit`` / ``PyAVDecode`` give the same frames.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from sfdeploy.data.synth import encode_h264, render_clip

from conftest import run_cli

FRAMES = 4
DECORD_FAILS = {16, 24, 48, 72}  # measured with decord 0.6.0 over this sweep
DECORD_MISDECODE = "DECORDArrayCopyFromTo"  # the message of decord's width bug


def _sweep() -> list[tuple[int, int, str]]:
    """(width, height, pixel format): every width 16..1920."""
    return [(w, 16, "yuv420p") if w % 2 == 0 else (w, 17, "yuv444p") for w in range(16, 1921)]


def _pyav_frames(data: bytes) -> tuple[np.ndarray, int]:
    """All frames, decoded sequentially with PyAV (independently of sfdeploy), and the container's
    count. One reformatter for all frames: ``to_ndarray(format="rgb24")`` would build a swscale
    context per frame (the same pixels, three times slower on this sweep)."""
    import av
    from av.video.reformatter import VideoReformatter

    with av.open(io.BytesIO(data)) as container:
        stream, rgb = container.streams.video[0], VideoReformatter()
        frames = np.stack([rgb.reformat(f, format="rgb24").to_ndarray() for f in container.decode(stream)])
        return frames, stream.frames


def _pipeline(steps: list[dict], path: Path) -> dict:
    from mmengine.dataset import Compose

    return Compose(steps)(dict(filename=str(path), label=-1, start_index=0, modality="RGB"))


def test_every_width_decodes_alike_in_training_and_serving(tmp_path: Path) -> None:
    import decord
    from mmengine.registry import init_default_scope

    import sfdeploy.train.transforms  # noqa: F401 - registers SfdeployVideoInit / SfdeployVideoDecode
    from sfdeploy.compat import ensure_mmaction

    ensure_mmaction()
    init_default_scope("mmaction")
    sample = dict(type="SampleFrames", clip_len=FRAMES, frame_interval=1, num_clips=1, test_mode=True)
    trained = [dict(type="SfdeployVideoInit"), sample, dict(type="SfdeployVideoDecode")]
    mmaction_pyav = [dict(type="PyAVInit"), sample, dict(type="PyAVDecode")]
    rng = np.random.default_rng(0)
    path = tmp_path / "clip.mp4"
    problems: list[str] = []
    decord_fails: list[int] = []
    alike: list[int] = []  # widths whose frames the pipeline and PyAV agree on, counts included
    for width, height, pix_fmt in _sweep():
        data = encode_h264(rng.integers(0, 256, (FRAMES, height, width, 3), dtype=np.uint8), pix_fmt=pix_fmt)
        path.write_bytes(data)
        reference, container_count = _pyav_frames(data)
        result = _pipeline(trained, path)
        counts = {"decord": result["total_frames"], "pyav": len(reference), "container": container_count}
        if set(counts.values()) != {FRAMES}:
            problems.append(f"{width}x{height}: frame counts differ {counts}")
        elif result["decoder"] != "pyav" or not np.array_equal(np.stack(result["imgs"]), reference):
            problems.append(f"{width}x{height}: frames decoded by {result['decoder']} differ from PyAV's")
        else:
            alike.append(width)
        try:
            by_decord = decord.VideoReader(str(path), num_threads=1).get_batch(list(range(FRAMES))).asnumpy()
        except decord.DECORDError as exc:
            if DECORD_MISDECODE not in str(exc):
                problems.append(f"{width}x{height}: decord fails otherwise than by its width bug: {exc}")
            decord_fails.append(width)
            if not np.array_equal(np.stack(_pipeline(mmaction_pyav, path)["imgs"]), reference):
                problems.append(f"{width}x{height}: MMAction2's own PyAV pipeline differs")
        else:
            if not np.array_equal(by_decord, reference):
                problems.append(f"{width}x{height}: decord's frames differ from PyAV's")
    assert problems == []
    assert alike == list(range(16, 1921))  # every width, each checked frame by frame
    assert set(decord_fails) == DECORD_FAILS  # PyAV equals decord everywhere else


@pytest.mark.parametrize("width", sorted(DECORD_FAILS))
def test_client_path_and_bytes_read_the_widths_decord_cannot(width: int, tmp_path: Path) -> None:
    """``load_video`` from a path and from the bytes of the file: the same views, decoded by PyAV,
    equal to MMAction2's own PyAV pipeline with resize and crop."""
    from dataclasses import replace

    from mmengine.dataset import Compose
    from mmengine.registry import init_default_scope

    from sfdeploy.clipspec import ClipSpec
    from sfdeploy.compat import ensure_mmaction
    from sfdeploy.decode.clips import load_video

    spec = ClipSpec(clip_len=8, frame_interval=2, num_clips=2, crop_mode="center", short_side=32, crop_size=28,
                    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    frames = np.random.default_rng(width).integers(0, 256, (21, 40, width, 3), dtype=np.uint8)
    path = tmp_path / f"w{width}.mp4"
    path.write_bytes(encode_h264(frames))
    ours = load_video(path, spec)
    assert np.array_equal(load_video(path.read_bytes(), spec), ours)
    ensure_mmaction()
    init_default_scope("mmaction")
    for view in (spec, replace(spec, num_clips=1)):
        theirs = Compose(view.mmaction_pipeline("pyav"))(dict(filename=str(path), label=-1, start_index=0,
                                                              modality="RGB"))
        expected = theirs["inputs"].permute(0, 2, 3, 4, 1).numpy()
        assert np.array_equal(load_video(path, view), expected)


def test_narrow_odd_and_wide_videos_are_prepared_trained_on_and_classified(tmp_path: Path) -> None:
    """The widths decord mis-decodes, an odd one and a 1920 px one, beside ordinary videos, through
    the real CLI: prepare accepts them (PyAV decodes every width), finetune trains and validates on
    them (MMAction2 decoding through SfdeployVideoDecode), and MMAction2's inference_recognizer on
    WORK classifies them (in a fresh interpreter: test_library_use.py)."""
    videos, data, work = tmp_path / "videos", tmp_path / "data", tmp_path / "work"
    run_cli("data", "synth", str(videos), "--classes", "2", "--per-class", "3", "--frames", "40", "--seed", "3")
    rng = np.random.default_rng(4)
    odd = {}
    for i, (width, pix_fmt) in enumerate([(16, "yuv420p"), (24, "yuv420p"), (48, "yuv420p"), (72, "yuv420p"),
                                          (131, "yuv444p"), (1920, "yuv420p")]):
        cls = ("move_left", "move_right")[i % 2]
        clip = render_clip(cls, 40, 96, rng)
        clip = np.tile(clip, (1, 1, 20, 1))[:, :, :width] if width > 96 else clip[:, :, 48 - width // 2:][:, :, :width]
        odd[width] = videos / cls / f"w{width}.mp4"
        odd[width].write_bytes(encode_h264(np.ascontiguousarray(clip), pix_fmt=pix_fmt))
    run_cli("data", "prepare", str(videos), "--out", str(data), "--preset", "slowfast_tiny")
    report = json.loads((data / "prepare_report.json").read_text())
    assert report["rejected"] == [] and report["accepted"] == 12
    decoders = {Path(v["path"]).name: (v["width"], v["decoder"]) for v in report["videos"]}
    for width, path in odd.items():
        assert decoders[path.name] == (width, "pyav")

    run_cli("finetune", str(data), "--work-dir", str(work), "--preset", "slowfast_tiny", "--epochs", "1",
            "--batch-size", "4")
    summary = json.loads((work / "finetune_summary.json").read_text())
    from mmaction.apis import inference_recognizer, init_recognizer

    from sfdeploy.compat import ensure_mmaction

    ensure_mmaction()
    model = init_recognizer(str(work / "config.py"), summary["best_checkpoint"], device="cpu")
    scores = np.array([inference_recognizer(model, str(p)).pred_score.numpy() for p in odd.values()])
    assert scores.shape == (len(odd), 2) and np.isfinite(scores).all()


def test_the_parity_reference_decodes_with_mmaction2s_own_decoder_where_it_can(tmp_path: Path) -> None:
    from sfdeploy.export.parity import reference_decoder

    from badvideos import encoded_video

    cases = {"decord": ("wide.mp4", 96), "pyav": ("narrow.mp4", 72),
             "sfdeploy": ("narrow.mkv", 72)}  # matroska records no frame count for MMAction2's PyAVInit
    for expected, (name, width) in cases.items():
        path = encoded_video(tmp_path / name, width, 64, frames=12, pix_fmt="yuv420p")
        assert reference_decoder(path) == expected, name
