"""``sfdeploy export``: a trained work dir -> artifacts + manifest, gated by parity.

Stages (each logged): load the trained model, derive the clip spec, export each artifact (every
format of ``--formats`` at every precision of ``--precisions``) and check it reloads and matches
its module, run the parity gate against MMAction2 on val clips, time the artifacts that passed
where they were gated (what ``repo --runtime auto`` chooses from), write ``manifest.json``. The
manifest is written even when the gate fails (with the numbers), and then export raises, so the
failure can be inspected and nothing is silently shipped.

Atomic: every artifact is written under a hidden temporary name and checked there; only when
all are done are they renamed onto their final names, and the manifest (with each file's
sha256) is written last. A run killed before that leaves the previous export untouched; a run
killed during the renames leaves files that no longer match the old manifest's hashes, which
every reader refuses (:meth:`sfdeploy.artifacts.Manifest.artifact_path`). Never a mix that loads.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfdeploy.artifacts import (
    DEFAULT_FORMATS,
    FORMAT_BACKEND,
    MANIFEST_FILE,
    Artifact,
    Manifest,
    artifact_file,
    artifact_key,
    parse_formats,
    sha256,
)
from sfdeploy.clipspec import ClipSpec
from sfdeploy.device import DEFAULT_DEVICE, Device
from sfdeploy.errors import ExportError, InputError
from sfdeploy.fsutil import commit, ensure_writable_dir, partial_path, remove_partials
from sfdeploy.precision import AUTO, UNSUPPORTED, parse_precisions, torch_dtype
from sfdeploy.runtime.placement import format_device

if TYPE_CHECKING:
    from sfdeploy.export.rewrites import Rewrites

log = logging.getLogger("sfdeploy")


@dataclass
class ExportOptions:
    """What ``sfdeploy export`` does, with its defaults (the command's options, for a library call)."""

    out: Path
    checkpoint: Path | None = None
    formats: tuple[str, ...] = DEFAULT_FORMATS
    # "auto" (fp32, and the device's native reduced precision: fp16 on a GPU, bf16 on a CPU with
    # AVX512-BF16 or AMX; sfdeploy.precision), or a comma-separated list; fp32 is always written
    precisions: str | tuple[str, ...] = AUTO
    fp16: bool = False  # also fp16, whatever `precisions` says (the older spelling of adding it)
    views: int = 1
    # where the reduced precisions are traced, the AOTInductor package compiled, the self-checks
    # and the parity gate run: auto, cpu, cuda (per format, see sfdeploy.runtime.placement.format_device)
    device: Device = Device(DEFAULT_DEVICE)
    parity_videos: int = 64
    parity_data: Path | None = None  # a prepared DATA folder to take parity clips from
    # graph rewrites (sfdeploy.export.rewrites): "auto" = the measured choice for `device`, "none",
    # or a comma-separated list of steps
    rewrites: str = "auto"
    measure: bool = True  # time the artifacts that passed the gate (what `repo --runtime auto` reads)
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.device = Device(self.device)  # a str given in Python is parsed here, once


def _parity_cfg(trained_cfg: object, parity_data: Path | None) -> object:
    if parity_data is None:
        return trained_cfg
    from sfdeploy.data.layout import PreparedData

    data = PreparedData.from_dir(parity_data)
    cfg = copy.deepcopy(trained_cfg)
    cfg.val_dataloader.dataset = dict(type="VideoDataset", ann_file=str(data.val.path),
                                      data_prefix=dict(video=str(data.media_root)))
    return cfg


def export_work(work_dir: Path, opts: ExportOptions) -> Manifest:
    """Export the model trained in ``work_dir``: every artifact of ``opts``, checked, gated against
    MMAction2, timed, committed with its manifest (see the module docstring)."""
    from sfdeploy.export.parity import val_videos
    from sfdeploy.train.trained import load_trained

    formats = parse_formats(opts.formats)
    out = Path(opts.out)
    ensure_writable_dir(out, "export folder", "--out folder")
    remove_partials(out)  # left by an export killed before it finished
    device = opts.device.resolve()
    plan = plan_artifacts(formats, opts.precisions, opts.fp16, device)
    # Where each format's artifacts are checked and gated; an explicit device ONNX Runtime cannot
    # use fails here, before any work. The torch formats run on the export's device.
    run_on = {fmt: format_device(fmt, opts.device) for fmt in formats}
    started = time.monotonic()

    log.info("[1/6] loading the trained model from %s", work_dir)
    trained = load_trained(work_dir, opts.checkpoint)
    log.info("[2/6] clip spec from %s (%d view(s))", trained.config_path.name, opts.views)
    spec = ClipSpec.from_config(trained.cfg, trained.class_names, views=opts.views)
    videos = val_videos(_parity_cfg(trained.cfg, opts.parity_data), opts.parity_videos)
    if not videos:
        raise InputError("no val videos to check parity on", path=trained.config_path,
                         fix="pass --parity-data DATA (a folder from `sfdeploy data prepare`)")
    rewrites = resolve_rewrites(opts.rewrites, device)
    if rewrites.names:
        log.info("[2/6] graph rewrites for %s: %s", device, ", ".join(rewrites.names))
    staged = _Staged(out, spec, device, rewrites, run_on, opts.show_progress)
    staged.export(trained.recognizer, plan, videos[0][0])

    manifest = Manifest(
        clip_spec=spec,
        artifacts={key: artifact for key, (artifact, _) in staged.artifacts.items()},
        averaging=trained.recognizer.cls_head.average_clips,
        source={
            "work_dir": str(trained.work_dir.resolve()),
            "config": str(trained.config_path.resolve()),
            "checkpoint": str(trained.checkpoint.resolve()),
            "checkpoint_sha256": sha256(trained.checkpoint),
            "preset": trained.preset,
        },
        host=host_facts(device),
    )
    manifest.parity = staged.gate(trained.recognizer, [p for p, _ in videos])
    if opts.measure:
        manifest.timings = staged.time(spec, manifest.parity)
    manifest.parity["wall_time_s"] = round(time.monotonic() - started, 1)
    log.info("[6/6] writing %s", out / MANIFEST_FILE)
    _commit(out, manifest, staged.artifacts)
    failed = {k: r for k, r in manifest.parity["artifacts"].items() if not r["passed"]}
    if failed:
        detail = "; ".join(f"{k}: max_abs_diff {r['max_abs_diff']:.2e}, top-1 agreement "
                           f"{r['top1_agreement']:.1%} (needs {r['criterion']})" for k, r in failed.items())
        raise ExportError(f"parity gate failed: {detail}", path=out / MANIFEST_FILE,
                          fix="do not deploy these artifacts; the numbers are in manifest.json 'parity'")
    return manifest


def plan_artifacts(formats: tuple[str, ...], precisions: str | tuple[str, ...], fp16: bool, device: Device
                   ) -> list[tuple[str, str]]:
    """The (format, precision) pairs an export on ``device`` writes: every format at every
    precision (``precisions`` as :func:`sfdeploy.precision.parse_precisions` reads it, plus fp16
    with ``fp16``) that the format can hold; refused when that leaves nothing."""
    chosen = parse_precisions(precisions, device, fp16=fp16)
    for fmt, precision in ((f, p) for p in chosen for f in formats if (f, p) in UNSUPPORTED):
        log.info("no %s %s artifact: %s", precision, fmt, UNSUPPORTED[fmt, precision])
    plan = [(fmt, precision) for precision in chosen for fmt in formats if (fmt, precision) not in UNSUPPORTED]
    if not plan:
        raise InputError(f"nothing to export: {', '.join(formats)} at {', '.join(chosen)}",
                         fix="add a format that holds these precisions to --formats (e.g. torchscript)")
    return plan


def host_facts(device: Device) -> dict[str, Any]:
    """The manifest's ``host``: the device the export ran on and what its CPU runs natively."""
    import platform

    import torch

    from sfdeploy.precision import cpu_bf16

    facts: dict[str, Any] = {"device": device, "machine": platform.machine(),
                             "cpu_isa": torch.backends.cpu.get_cpu_capability(), "cpu_bf16": cpu_bf16().to_dict(),
                             "torch": torch.__version__}
    if device != "cpu":
        facts["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return facts


class _Staged:
    """The artifacts of one export, written under temporary names until the gate has run."""

    def __init__(self, out: Path, spec: ClipSpec, device: Device, rewrites: Rewrites, run_on: dict[str, Device],
                 show_progress: bool) -> None:
        self.out, self.spec, self.device, self.rewrites, self.run_on = out, spec, device, rewrites, run_on
        self.show_progress = show_progress
        self.artifacts: dict[str, tuple[Artifact, Path]] = {}  # key -> (what it will be, where it is now)
        self.self_checks: dict[str, dict] = {}  # key -> what its reload-and-compare ran on and found
        self.graph: dict[str, Any] = {}  # the fp32 graph as eager modules, for the gate's noise measurement

    def export(self, recognizer: Any, plan: list[tuple[str, str]], video: Path) -> None:
        """Trace/export every (format, precision) of ``plan`` and self-check each reloaded file.
        One deploy module per precision and trace device (:func:`sfdeploy.export.formats.trace_device`)."""
        import torch

        from sfdeploy.export.deploy import deploy_module
        from sfdeploy.export.formats import trace_device, write_artifact

        example_cpu = torch.from_numpy(_example_batch(video, self.spec))
        spec_json = self.spec.to_json()
        groups: dict[tuple[str, str], list[str]] = {}
        for fmt, precision in plan:
            groups.setdefault((precision, trace_device(fmt, precision, self.device)), []).append(fmt)
        for (precision, where), formats in groups.items():
            module, changed = deploy_module(recognizer, self.spec.mean, self.spec.std, torch_dtype(precision),
                                            where, self.rewrites)
            if precision == "fp32":
                self.graph[where] = module
            example = example_cpu.to(where)
            for fmt in formats:
                filename, key = artifact_file(fmt, precision), artifact_key(fmt, precision)
                tmp = partial_path(self.out / filename)
                log.info("[3/6] exporting %s (%s, on %s) -> %s", fmt, precision, where, self.out / filename)
                # fp32 ONNX is checked on the CPU, where no TF32 blurs the 1e-5 self-check; a reduced
                # precision on the device it will be served on when there is one.
                check_on = self.run_on[fmt] if precision != "fp32" else "cpu"
                written = write_artifact(fmt, module, example, tmp, spec_json, precision, check_device=check_on,
                                         show_progress=self.show_progress)
                self.self_checks[key] = {**written.check, "rewrites": changed}  # what each rewrite changed
                self.artifacts[key] = (Artifact.of(fmt, precision, tmp, file=filename, rewrites=self.rewrites.names,
                                                   optimized_for=self.device if self.rewrites.names else "",
                                                   info=written.info), tmp)

    def gate(self, recognizer: Any, videos: list[Path]) -> dict[str, Any]:
        """The parity gate over the staged artifacts (see :mod:`sfdeploy.export.parity`), with the
        self-checks: the manifest's ``parity``."""
        import torch

        from sfdeploy.export.deploy import deploy_module
        from sfdeploy.export.parity import run_gate
        from sfdeploy.runtime import open_artifact

        log.info("[4/6] parity gate: %d val video(s); MMAction2 on %s, %s; TF32 off", len(videos), self.device,
                 ", ".join(f"{FORMAT_BACKEND[fmt]} on {where}" for fmt, where in self.run_on.items()))
        predictors = {key: (open_artifact(tmp, a.format, device=self.run_on[a.format], tf32=False), a.precision)
                      for key, (a, tmp) in self.artifacts.items()}
        for where in {"cpu", self.device} - set(self.graph):  # the fp32 graph on the CPU and on the device
            self.graph[where] = deploy_module(recognizer, self.spec.mean, self.spec.std, torch.float32, where,
                                              self.rewrites)[0]
        try:
            parity = run_gate(recognizer.to(device=self.device, dtype=torch.float32), self.spec, predictors, videos,
                              graph=self.graph, show_progress=self.show_progress)
        finally:
            for predictor, _ in predictors.values():
                predictor.close()
        parity["self_checks"] = self.self_checks
        return parity

    def time(self, spec: ClipSpec, parity: dict[str, Any]) -> dict[str, Any]:
        """The timings of the artifacts that passed the gate and that ``repo --runtime auto`` may serve
        on this device (:mod:`sfdeploy.export.timing`; fp16 on a CPU is never its choice)."""
        from sfdeploy.export import timing
        from sfdeploy.precision import servable_by_auto

        passed = {key: (artifact.format, tmp) for key, (artifact, tmp) in self.artifacts.items()
                  if parity["artifacts"][key]["passed"] and artifact.precision in servable_by_auto(self.device)}
        if not passed:
            return {}
        log.info("[5/6] timing %d artifact(s) on %s (what `repo --runtime auto` chooses from)", len(passed),
                 self.device)
        return timing.measure(passed, self.run_on, spec, self.device, show_progress=self.show_progress)


def resolve_rewrites(value: str, device: Device) -> Rewrites:
    """``auto`` -> the measured choice for ``device``; ``none``; or a comma-separated list of steps."""
    from sfdeploy.export.rewrites import STEPS, Rewrites

    value = value.strip().lower()
    if value == "auto":
        return Rewrites.for_device(device)
    if value == "none":
        return Rewrites.none()
    try:
        return Rewrites.parse([v.strip() for v in value.split(",") if v.strip()])
    except ValueError as exc:
        raise InputError(str(exc), fix=f"--rewrites auto, none, or a comma-separated list of: {', '.join(STEPS)}") \
            from exc


def _commit(out: Path, manifest: Manifest, staged: dict[str, tuple[Artifact, Path]]) -> None:
    """Rename the checked artifacts onto their names, write the manifest last, then remove the
    files of a previous export that the new manifest no longer lists."""
    try:
        previous = {a.file for a in Manifest.read(out).artifacts.values()}
    except InputError:  # no (readable) previous export
        previous = set()
    for artifact, tmp in staged.values():
        commit(tmp, out / artifact.file)
    manifest.write(out)
    for name in previous - {a.file for a in manifest.artifacts.values()}:
        (out / name).unlink(missing_ok=True)


def _example_batch(video: Path, spec: ClipSpec):
    """Two real clips (the same video twice) to trace with: batch 2 keeps the batch axis honest."""
    import numpy as np

    from sfdeploy.decode.clips import load_video

    clip = load_video(str(video), spec)
    return np.stack([clip, clip])
