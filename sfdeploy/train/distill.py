"""Knowledge distillation: a small student trained to imitate a finetuned teacher, for deployment.

``sfdeploy finetune DATA --distill-from TEACHER_WORK`` trains the student preset (by default the
teacher preset's student, :data:`STUDENT_PRESETS`) on DATA with

    loss = (1 - W) * CE(student logits, labels) + W * T^2 * KL(softmax(teacher / T) || softmax(student / T))

through MMAction2, as a recognizer wrapper (not a fork): :class:`DistillRecognizer3D` is the
student's own ``Recognizer3D`` whose :meth:`~DistillRecognizer3D.loss` adds the distillation term
(logged as ``loss_distill``). ``WORK/config.py`` builds it (``model.type='DistillRecognizer3D'``,
the teacher in ``model.distill``; this module is in its ``custom_imports``). The teacher, built
from ``TEACHER_WORK/config.py`` and its best checkpoint (``torch.load(weights_only=True)``), is
frozen, always in eval mode, and not a submodule: it is in neither the optimizer nor the
checkpoints, so the student's checkpoint is a plain ``Recognizer3D``'s and ``sfdeploy export WORK``
exports the student (:func:`sfdeploy.train.trained.plain_model_cfg`).

A teacher that cannot teach this student is refused before training (:func:`check_teacher`): no
checkpoint, other classes (the same classes in another order are mapped), another clip spec.
After training, :func:`summarise` adds the ``distillation`` section to ``finetune_summary.json``:
both val top-1s, their difference, and the student's speed against the teacher's, measured here.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from sfdeploy.compat import ensure_mmaction

ensure_mmaction()  # WORK/config.py imports this module: mmaction must be importable first

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from mmaction.models.recognizers import Recognizer3D  # noqa: E402
from mmaction.registry import MODELS  # noqa: E402

from sfdeploy.clipspec import ClipSpec  # noqa: E402
from sfdeploy.data.layout import CLASS_INDEX, read_class_index  # noqa: E402
from sfdeploy.errors import InputError  # noqa: E402
from sfdeploy.train.files import CONFIG_FILE, SUMMARY_FILE  # noqa: E402
from sfdeploy.train.options import STUDENT_PRESETS, FinetuneOptions, add_custom_imports  # noqa: E402
from sfdeploy.train.trained import DISTILL_KEY, find_checkpoint, load_trained  # noqa: E402

log = logging.getLogger("sfdeploy")

WRAPPER = "DistillRecognizer3D"
MODULE = "sfdeploy.train.distill"
#: the clip spec fields teacher and student must share: the teacher sees the student's batches
SHARED_SPEC = ("clip_len", "frame_interval", "crop_size", "mean", "std", "channel_order")


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch (Hinton et
    al.: the T^2 keeps its gradients on the scale of the cross-entropy's as T changes)."""
    return F.kl_div(F.log_softmax(student / temperature, dim=-1), F.softmax(teacher / temperature, dim=-1),
                    reduction="batchmean") * temperature ** 2


@MODELS.register_module()
class DistillRecognizer3D(Recognizer3D):
    """The student ``Recognizer3D`` (every argument but ``distill`` is its own) whose training loss
    adds the distillation term; the teacher is held outside the module tree (see the module
    docstring), moved with the student (:meth:`_apply`) and kept in eval mode (:meth:`train`)."""

    def __init__(self, *, distill: dict[str, Any], **student: Any) -> None:
        super().__init__(**student)
        self.temperature = float(distill["temperature"])
        self.weight = float(distill["weight"])
        self.class_map = list(distill["class_map"]) if distill.get("class_map") else None
        teacher = load_trained(Path(distill["teacher_work"]), Path(distill["teacher_checkpoint"])).recognizer
        teacher.requires_grad_(False)
        # object.__setattr__: not registered as a submodule, so not in state_dict(), parameters(), DDP
        object.__setattr__(self, "teacher", teacher.eval())

    def train(self, mode: bool = True) -> DistillRecognizer3D:
        """The student's mode; the teacher stays in eval mode (its BatchNorm statistics, no dropout)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> DistillRecognizer3D:
        super()._apply(fn, *args, **kwargs)  # .to(device), .cuda(), .half() of the student ...
        self.teacher._apply(fn, *args, **kwargs)  # ... and of the teacher beside it
        return self

    @torch.no_grad()
    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's logits for the student's (preprocessed) batch, in the student's class order."""
        feats, kwargs = self.teacher.extract_feat(inputs)
        logits = self.teacher.cls_head(feats, **kwargs)
        return logits[:, self.class_map] if self.class_map else logits

    def loss(self, inputs: torch.Tensor, data_samples: Any, **kwargs: Any) -> dict:
        """``loss_cls`` (the head's own loss, weighted 1 - W) and ``loss_distill`` (W x
        :func:`distill_loss`), and the head's accuracy entries; mmengine sums the ``loss*`` keys."""
        feats, loss_kwargs = self.extract_feat(inputs, data_samples=data_samples)
        logits = self.cls_head(feats, **loss_kwargs)
        losses = dict(self.cls_head.loss_by_feat(logits, data_samples))
        losses["loss_cls"] = losses["loss_cls"] * (1.0 - self.weight)
        teacher = self.teacher_logits(inputs).to(logits.dtype)
        losses["loss_distill"] = self.weight * distill_loss(logits, teacher, self.temperature)
        losses.update(loss_kwargs.get("loss_aux") or {})
        return losses


# -- before training: the teacher, checked ---------------------------------------------------------

def _teacher_checkpoint(teacher: Path) -> Path:
    if not teacher.is_dir() or not (teacher / CONFIG_FILE).is_file():
        raise InputError(f"--distill-from is not a finetune work dir (no {CONFIG_FILE})", path=teacher,
                         fix="pass the --work-dir of the teacher's `sfdeploy finetune` run")
    try:
        return find_checkpoint(teacher)
    except InputError:
        raise InputError("the teacher work dir has no checkpoint to distill from (no best_*.pth)", path=teacher,
                         fix="finish the teacher's `sfdeploy finetune` first (its best checkpoint is the teacher), "
                             "or pass another --distill-from") from None


def _class_map(teacher: Path, classes: list[str]) -> list[int] | None:
    """The teacher's index of each of DATA's classes (None when the order is the same)."""
    names = read_class_index(teacher / CLASS_INDEX)
    if names == list(classes):
        return None
    if sorted(names) != sorted(classes):
        missing, extra = sorted(set(classes) - set(names)), sorted(set(names) - set(classes))
        raise InputError(f"the teacher was trained on other classes than DATA's (DATA only: {missing or 'none'}; "
                         f"teacher only: {extra or 'none'})", path=teacher / CLASS_INDEX,
                         fix="distill from a teacher finetuned on these classes (the same DATA), or train without "
                             "--distill-from")
    log.info("distillation: the teacher lists DATA's classes in another order; its outputs are reordered")
    return [names.index(name) for name in classes]


def _check_clips(teacher_cfg: Any, student_cfg: Any, teacher: Path, preset: str) -> None:
    """The teacher must see clips like those it was trained on: the student's clip spec (frames,
    sampling, crop, normalisation) and input layout must be the teacher's."""
    mine, theirs = ClipSpec.from_config(student_cfg), ClipSpec.from_config(teacher_cfg)
    differ = [f"{f} {getattr(theirs, f)} vs {getattr(mine, f)}" for f in SHARED_SPEC
              if getattr(theirs, f) != getattr(mine, f)]
    shapes = [c.model.data_preprocessor.get("format_shape") for c in (teacher_cfg, student_cfg)]
    if shapes[0] != shapes[1]:
        differ.append(f"input layout {shapes[0]} vs {shapes[1]}")
    if differ:
        raise InputError(f"the teacher's clips differ from those of student preset '{preset}' (teacher vs student: "
                         f"{'; '.join(differ)}): the teacher would judge clips it never saw",
                         path=teacher / CONFIG_FILE,
                         fix="use a student preset with the teacher's clip spec (e.g. "
                             f"{', '.join(f'{t} -> {s}' for t, s in STUDENT_PRESETS.items())})")


def check_teacher(teacher: Path, classes: list[str], student_cfg: Any, preset: str) -> dict[str, Any]:
    """Refuse a teacher that cannot teach this student on this data (see the module docstring); returns
    the ``model.distill`` entry of the student's config (without the options)."""
    teacher = Path(teacher).resolve()
    checkpoint = _teacher_checkpoint(teacher)
    class_map = _class_map(teacher, classes)
    trained = load_trained(teacher, checkpoint)  # the checkpoint must fit its config, exactly
    _check_clips(trained.cfg, student_cfg, teacher, preset)
    return dict(teacher_work=str(teacher), teacher_checkpoint=str(checkpoint.resolve()), class_map=class_map,
                teacher_preset=trained.preset)


def apply_distillation(cfg: Any, classes: list[str], opts: FinetuneOptions) -> None:
    """Make ``cfg`` (the student's full config) train with the teacher of ``opts.distill_from``:
    ``model.type`` becomes :class:`DistillRecognizer3D`, the teacher and options go to ``model.distill``."""
    entry = check_teacher(Path(opts.distill_from), classes, cfg, opts.preset)
    entry.update(temperature=float(opts.distill_temperature), weight=float(opts.distill_weight),
                 student_type=cfg.model.type)
    cfg.model[DISTILL_KEY] = entry
    cfg.model.type = WRAPPER
    add_custom_imports(cfg, MODULE)


def run_facts(cfg: Any) -> dict[str, Any] | None:
    """What ``sfdeploy_run.json`` (and so the summary) records of the distillation, None if not distilled."""
    entry = cfg.model.get(DISTILL_KEY)
    if not entry:
        return None
    teacher = Path(entry["teacher_work"])
    summary = teacher / SUMMARY_FILE
    top1 = json.loads(summary.read_text()).get("best_top1") if summary.is_file() else None
    return {"teacher_work": str(teacher), "teacher_checkpoint": entry["teacher_checkpoint"],
            "teacher_preset": entry.get("teacher_preset"), "teacher_best_top1": top1,
            "temperature": entry["temperature"], "weight": entry["weight"],
            "classes_reordered": bool(entry.get("class_map"))}


# -- after training: how the student compares ---------------------------------------------------------

SPEED_BATCH, SPEED_WARMUP, SPEED_ITERS = 8, 2, 7


def _recognizer(work: Path) -> tuple[torch.nn.Module, ClipSpec]:
    trained = load_trained(work)
    return trained.recognizer.eval(), ClipSpec.from_config(trained.cfg, trained.class_names, views=1)


def measure_speed(teacher_work: Path, student_work: Path, batch: int = SPEED_BATCH,
                  iters: int = SPEED_ITERS) -> dict[str, Any]:
    """Clips/s of teacher and student on this machine: each recognizer (backbone and head, what the
    export wraps; its cast and normalisation are the same for both, and cheap) in eager fp32 on one
    normalised view, ``batch`` random clips per call, ``iters`` timed calls each after warm-up, teacher
    and student alternating (so both see the same background load); the median."""
    (teacher, spec), (student, _) = _recognizer(teacher_work), _recognizer(student_work)
    views, frames, height, width, channels = spec.input_shape
    clips = torch.randn((batch, views, channels, frames, height, width), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"teacher": [], "student": []}
    with torch.inference_mode():
        for i in range(SPEED_WARMUP + iters):
            for name, module in (("teacher", teacher), ("student", student)):
                start = time.perf_counter()
                module(clips, mode="tensor")
                if i >= SPEED_WARMUP:
                    times[name].append(time.perf_counter() - start)
    rate = {name: batch / statistics.median(t) for name, t in times.items()}
    return {"teacher_clips_per_s": round(rate["teacher"], 2), "student_clips_per_s": round(rate["student"], 2),
            "speed_ratio": round(rate["student"] / rate["teacher"], 2),
            "speed_how": f"this machine, eager fp32 recognizer (backbone and head, 1 view), batch {batch}, median of "
                         f"{iters} timed calls after {SPEED_WARMUP} warm-up, teacher and student alternating, "
                         f"{torch.get_num_threads()} torch thread(s)"}


def summarise(work: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` with its ``distillation`` section complete: the student's best val top-1 beside the
    teacher's (and the difference, in points) and their measured speed ratio."""
    section = dict(summary["distillation"])
    student, teacher = summary.get("best_top1"), section.get("teacher_best_top1")
    section["student_best_top1"] = student
    section["top1_difference_points"] = (round(100 * (student - teacher), 2)
                                         if student is not None and teacher is not None else None)
    section.update(measure_speed(Path(section["teacher_work"]), work))
    log.info("distillation: student val top-1 %s vs teacher %s; %.2fx the teacher's clips/s", student, teacher,
             section["speed_ratio"])
    return {**summary, "distillation": section}
