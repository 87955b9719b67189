"""The clip spec: how a video becomes model input. Derived once, from the training config.

Training, export, the Triton repository, the client and the benchmarks must agree on clip length,
frame interval, the temporal and spatial views, the resize and crop, mean/std and the class names.
None of them keeps its own copy: :meth:`ClipSpec.from_config` reads them from the MMAction2 test
pipeline and data preprocessor of the training config, the export writes the result into
``manifest.json`` and into the artifacts' metadata, and everything downstream reads it back with
:meth:`ClipSpec.from_dict`.

Views follow MMAction2's test-time augmentation: ``num_clips`` temporal clips (``SampleFrames``
in test mode spreads them evenly; one clip is the centre clip) times the spatial crops
(``CenterCrop``: 1, ``ThreeCrop``: 3, along the long side after resizing the short side).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from sfdeploy.errors import InputError

CROP_MODES = {"center": 1, "three": 3}
SPEC_KEY = "sfdeploy_clip_spec"  # key of the JSON spec in artifact metadata and Triton parameters


@dataclass(frozen=True)
class ClipSpec:
    """How a video becomes model input, and the class names its outputs mean: the one copy that
    training, export, the served model and the client all read (see the module docstring). Frozen,
    so a spec read back from an artifact can be compared with ``==``."""

    clip_len: int
    frame_interval: int
    num_clips: int  # temporal views
    crop_mode: str  # "center" or "three": spatial views per clip
    short_side: int  # frames are resized so that their short side is this (aspect kept)
    crop_size: int  # square crop after resizing
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str = "RGB"
    class_names: tuple[str, ...] = ()

    @property
    def crops(self) -> int:
        """Spatial views per clip (1 for ``center``, 3 for ``three``)."""
        return CROP_MODES[self.crop_mode]

    @property
    def views(self) -> int:
        """Views per video: the V axis of the deployed model's input."""
        return self.num_clips * self.crops

    @property
    def min_frames(self) -> int:
        """Frames a video needs for one clip without looping (MMAction2's training clip span)."""
        return self.clip_len * self.frame_interval

    @property
    def input_shape(self) -> tuple[int, int, int, int, int]:
        """Per-video input shape ``(V, T, H, W, 3)``, uint8 RGB."""
        return (self.views, self.clip_len, self.crop_size, self.crop_size, 3)

    @property
    def num_classes(self) -> int:
        """Length of the model's output: one probability per class name."""
        return len(self.class_names)

    def mmaction_pipeline(self, decode: str = "decord") -> list[dict[str, Any]]:
        """The MMAction2 test pipeline that this spec stands for: the reference in parity checks and
        tests (sampling, resize and crop are MMAction2's own transforms; both sides must give the
        same frames).

        ``decode`` picks the decoding steps: ``"decord"``, MMAction2's own ``DecordInit`` /
        ``DecordDecode``, the independent reference wherever decord reads the stream;
        ``"pyav"``, MMAction2's own ``PyAVInit`` / ``PyAVDecode``, the independent reference on
        the streams decord mis-decodes (it counts frames from the container's metadata, so only
        where the container has a count: mp4, mov, avi); ``"sfdeploy"``, the registered
        ``SfdeployVideoInit`` / ``SfdeployVideoDecode`` that ``WORK/config.py`` trains with
        (needs ``sfdeploy.train.transforms`` imported); ``"rawframes"``.
        """
        heads = {"decord": [dict(type="DecordInit", io_backend="disk")],
                 "pyav": [dict(type="PyAVInit", io_backend="disk")],
                 "sfdeploy": [dict(type="SfdeployVideoInit", io_backend="disk")],
                 "rawframes": []}
        tails = {"decord": [dict(type="DecordDecode")],
                 "pyav": [dict(type="PyAVDecode")],
                 "sfdeploy": [dict(type="SfdeployVideoDecode")],
                 "rawframes": [dict(type="RawFrameDecode", io_backend="disk")]}
        if decode not in heads:
            raise ValueError(f"decode must be one of {sorted(heads)}, got {decode!r}")
        head, tail = heads[decode], tails[decode]
        crop = (dict(type="ThreeCrop", crop_size=self.crop_size) if self.crop_mode == "three"
                else dict(type="CenterCrop", crop_size=self.crop_size))
        return [
            *head,
            dict(type="SampleFrames", clip_len=self.clip_len, frame_interval=self.frame_interval,
                 num_clips=self.num_clips, test_mode=True),
            *tail,
            dict(type="Resize", scale=(-1, self.short_side)),
            crop,
            dict(type="FormatShape", input_format="NCTHW"),
            dict(type="PackActionInputs"),
        ]

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON-able data, with the derived ``views`` written too, so that a reader can check it
        against clips x crops (:meth:`from_dict` does)."""
        data = asdict(self)
        data["views"] = self.views
        return data

    def to_json(self) -> str:
        """The form stored in ``manifest.json``, artifact metadata and Triton parameters: sorted keys, so the same
        spec always gives the same text."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClipSpec:
        """Read back what :meth:`to_dict` wrote (lists become tuples; unknown keys from newer writers are ignored);
        an :class:`InputError` when the stored ``views`` disagree with clips x crops, i.e. the spec was edited or is
        corrupt."""
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["mean"] = tuple(float(x) for x in fields["mean"])
        fields["std"] = tuple(float(x) for x in fields["std"])
        fields["class_names"] = tuple(fields.get("class_names", ()))
        spec = cls(**fields)
        if "views" in data and data["views"] != spec.views:
            raise InputError(f"clip spec says views={data['views']} but its clips x crops is {spec.views}",
                             fix="re-export the model")
        return spec

    @classmethod
    def from_json(cls, text: str) -> ClipSpec:
        """Read back what :meth:`to_json` wrote (see :meth:`from_dict`)."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_config(cls, cfg: Any, class_names: tuple[str, ...] = (), views: int | None = None) -> ClipSpec:
        """Read the spec from an MMAction2 config and its ``model.data_preprocessor``.

        ``views=None`` takes the test pipeline as written (MMAction2's multi-view test);
        ``views=1`` the single centre view of the val pipeline (what MMAction2 validates with);
        other values a subset of the test pipeline's clips x crops.
        """
        name = cfg.filename or "the config"
        test = _parse_pipeline(_pipeline(cfg, "test"), f"test pipeline of {name}")
        if views is None:
            sampling = test
        elif views == 1:
            val = _parse_pipeline(_pipeline(cfg, "val"), f"val pipeline of {name}")
            single = val if val["num_clips"] == 1 and val["crop_mode"] == "center" else test
            sampling = {**single, "num_clips": 1, "crop_mode": "center"}
        else:
            test_crops = CROP_MODES[test["crop_mode"]]
            choices = {
                test_crops: (1, test["crop_mode"]),
                test["num_clips"]: (test["num_clips"], "center"),
                test["num_clips"] * test_crops: (test["num_clips"], test["crop_mode"]),
            }
            if views not in choices:
                raise InputError(
                    f"--views {views} is not available from the test pipeline of {name} "
                    f"({test['num_clips']} clip(s) x {test_crops} crop(s))",
                    fix=f"use --views {' / '.join(str(v) for v in sorted({1, *choices}))}",
                )
            num_clips, crop_mode = choices[views]
            sampling = {**test, "num_clips": num_clips, "crop_mode": crop_mode}
        pre = cfg.model.get("data_preprocessor", {})
        if pre.get("to_rgb") or pre.get("format_shape", "NCTHW") != "NCTHW":
            raise InputError("data_preprocessor must keep RGB order and format NCTHW",
                             path=cfg.filename, fix="remove to_rgb / set format_shape='NCTHW'")
        mean, std = pre.get("mean"), pre.get("std")
        if mean is None or std is None:
            raise InputError("model.data_preprocessor has no mean/std", path=cfg.filename,
                             fix="set data_preprocessor mean and std (0-255 scale)")
        return cls(
            **sampling,
            mean=tuple(float(x) for x in mean),  # type: ignore[arg-type]
            std=tuple(float(x) for x in std),  # type: ignore[arg-type]
            class_names=tuple(class_names),
        )


def spec_of(config: Any) -> ClipSpec:
    """The clip spec a served model carries in its Triton config's ``parameters`` (``sfdeploy repo``
    writes it there), read the one way for every reader: the client (whatever served config it got),
    the model backends inside Triton, tests reading a ``config.pbtxt`` back. ``config`` is either form
    Triton hands a config out in: the ``ModelConfig`` protobuf, or its JSON form (the HTTP client's
    answer, a gRPC answer through ``MessageToDict``, a python backend's ``model_config``).

    Raises ``KeyError`` when the config carries no spec (a model not written by ``sfdeploy repo``).
    """
    if isinstance(config, Mapping):
        text = config.get("parameters", {})[SPEC_KEY]["string_value"]
    elif SPEC_KEY in config.parameters:  # (indexing a protobuf map would add the missing key)
        text = config.parameters[SPEC_KEY].string_value
    else:
        raise KeyError(SPEC_KEY)
    return ClipSpec.from_json(text)


def _pipeline(cfg: Any, split: str) -> list[dict]:
    pipeline = cfg.get(f"{split}_pipeline") or cfg.get(f"{split}_dataloader", {}).get("dataset", {}).get("pipeline")
    if not pipeline:
        raise InputError(f"the config has no {split} pipeline", path=cfg.filename,
                         fix=f"define {split}_pipeline (or {split}_dataloader.dataset.pipeline)")
    return list(pipeline)


#: Steps the client reproduces exactly. Decoding steps all map to sfdeploy's decoder (PyAV, as
#: decord indexes and decodes): the same frames as decord and MMAction2's PyAV pair,
#: proven over every width (tests/test_decode_sweep.py); OpenCV's decoder is accepted as before.
VIDEO_INIT_STEPS = ("DecordInit", "OpenCVInit", "PyAVInit", "SfdeployVideoInit")
VIDEO_DECODE_STEPS = ("DecordDecode", "OpenCVDecode", "PyAVDecode", "SfdeployVideoDecode")
_SUPPORTED_STEPS = {
    *VIDEO_INIT_STEPS, *VIDEO_DECODE_STEPS, "RawFrameDecode", "SampleFrames", "Resize", "CenterCrop", "ThreeCrop",
    "FormatShape", "PackActionInputs",
}


def _parse_pipeline(pipeline: list[dict], where: str) -> dict[str, Any]:
    """Sampling and spatial settings of one MMAction2 test-style pipeline, or a clear error for
    steps the client could not reproduce exactly."""
    steps = {step["type"]: step for step in pipeline}
    unsupported = set(steps) - _SUPPORTED_STEPS
    if unsupported:
        raise InputError(f"{where}: steps sfdeploy cannot reproduce in the client: {sorted(unsupported)}",
                         fix="keep it to decode, SampleFrames, Resize, CenterCrop/ThreeCrop, FormatShape")
    sample = _need(steps, "SampleFrames", where)
    if sample.get("twice_sample") or sample.get("target_fps") or sample.get("temporal_jitter"):
        raise InputError(f"{where}: SampleFrames twice_sample / target_fps / temporal_jitter are not "
                         "supported", fix="remove them")
    resize = _need(steps, "Resize", where)
    scale = tuple(resize.get("scale", ()))
    if len(scale) != 2 or min(scale) != -1 or not resize.get("keep_ratio", True):
        raise InputError(f"{where}: unsupported Resize {dict(resize)}",
                         fix="use Resize(scale=(-1, SHORT_SIDE)) (resize the short side)")
    if resize.get("interpolation", "bilinear") != "bilinear":
        raise InputError(f"{where}: unsupported Resize interpolation", fix="use bilinear")
    if "ThreeCrop" in steps:
        crop_mode, crop = "three", steps["ThreeCrop"]["crop_size"]
    elif "CenterCrop" in steps:
        crop_mode, crop = "center", steps["CenterCrop"]["crop_size"]
    else:
        raise InputError(f"{where}: no CenterCrop or ThreeCrop",
                         fix="end the spatial steps with CenterCrop or ThreeCrop")
    if not isinstance(crop, int):
        if crop[0] != crop[1]:
            raise InputError(f"{where}: non-square crop {crop}", fix="use a square crop_size")
        crop = crop[0]
    return dict(
        clip_len=int(sample["clip_len"]),
        frame_interval=int(sample.get("frame_interval", 1)),
        num_clips=int(sample.get("num_clips", 1)),
        crop_mode=crop_mode,
        short_side=int(max(scale)),
        crop_size=int(crop),
    )


def _need(steps: dict[str, dict], name: str, where: str) -> dict:
    if name not in steps:
        raise InputError(f"no {name} step in the {where}", fix=f"add {name} to the test pipeline")
    return steps[name]
