"""Which artifact the served model runs: ``repo --runtime auto --precision auto``, decided from a
recorded measurement and said with its reason.

The fastest runtime and precision depend on the device (on 2 CPU cores: bf16 TorchScript; on a GPU
fp16, with the runtime still to be measured there), so nothing here ranks them by name. The
candidates are the export's artifacts that passed the parity gate and that the python backend can
run on the repository's instance kind (an AOTInductor package only on the device kind it was
compiled for). The measurement is the export's own (:mod:`sfdeploy.export.timing`, taken on its
device) or, for ``sfdeploy bench``, the model rows it has just measured; the score is the mean of
the per-clip times over the batch sizes measured (latency at batch 1 and throughput at a served
batch count alike). Without a measurement for the instance kind (a repository for GPU servers
written from a CPU export) the rule is the one sfdeploy served before it measured: TorchScript,
fp16 on a GPU if it passed the gate, fp32 otherwise; the reason says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from sfdeploy.artifacts import BACKEND_FORMAT, FORMAT_BACKEND, Manifest, artifact_key
from sfdeploy.device import Device
from sfdeploy.errors import InputError
from sfdeploy.precision import PRECISIONS, servable_by_auto, unmeasured_preference

AUTO = "auto"
#: the rule without a measurement: this runtime, and the first precision of
#: :func:`sfdeploy.precision.unmeasured_preference` the export has (fp16 on a GPU, fp32 on the CPU)
DEFAULT_RUNTIME = "torchscript"

Candidate = tuple[str, str]  # (runtime, precision)


@dataclass(frozen=True)
class ServedChoice:
    """The runtime and precision the served model runs, and why (logged, and written into the
    model's config.pbtxt ``parameters``)."""

    runtime: str
    precision: str
    why: str

    def to_dict(self) -> dict[str, str]:
        """As JSON: the bench record keeps it, so a resumed run serves the same."""
        return {"runtime": self.runtime, "precision": self.precision, "why": self.why}

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> ServedChoice:
        """The choice :meth:`to_dict` wrote."""
        return cls(data["runtime"], data["precision"], data["why"])


def _score(per_batch: dict[str, float]) -> float:
    return sum(per_batch.values()) / len(per_batch)


def choose(candidates: list[Candidate], timings: dict[Candidate, dict[str, float]], kind: str, *,
           measured_on: str = "") -> ServedChoice:
    """The fastest measured candidate, or the rule without a measurement (see the module
    docstring). ``timings``: ms per clip by batch size (as text), per candidate measured on an
    instance of ``kind``; ``measured_on``: where, for the reason."""
    if not candidates:
        raise InputError("nothing the served model could run",
                         fix="export an artifact that passes the parity gate for this device (sfdeploy export)")
    measured = {c: timings[c] for c in candidates if timings.get(c)}
    if measured:
        best = min(measured, key=lambda c: _score(measured[c]))
        figures = ", ".join(f"{ms:.1f} ms/clip at batch {b}" for b, ms in measured[best].items())
        return ServedChoice(*best, f"the fastest of {len(measured)} measured on {measured_on or kind}: "
                                   f"{best[0]} {best[1]} ({figures})")
    runtimes = [r for r, _ in candidates]
    runtime = DEFAULT_RUNTIME if DEFAULT_RUNTIME in runtimes else runtimes[0]
    precisions = [p for r, p in candidates if r == runtime]
    order = unmeasured_preference(kind)
    precision = next((p for p in order if p in precisions), precisions[0])
    return ServedChoice(runtime, precision, f"no measurement on {kind} in this export (an export made on the "
                                            f"serving host measures one): {runtime} {precision} by the default rule")


def export_candidates(manifest: Manifest, kind: str, runtime: str = AUTO, precision: str = AUTO
                      ) -> list[Candidate]:
    """The (runtime, precision) pairs of ``manifest`` a python-backend instance of ``kind`` may
    serve: artifacts that passed the gate (all of a bench export, which has no gate), runnable on
    ``kind``, matching ``runtime`` and ``precision`` (``auto``: any runtime; the precisions
    :func:`sfdeploy.precision.servable_by_auto` allows on ``kind``)."""
    passed = manifest.parity.get("artifacts")
    device_kind = Device.of_instance_kind(kind).compiled_kind
    out = []
    for key, artifact in manifest.artifacts.items():
        served_by = FORMAT_BACKEND[artifact.format]
        wanted = servable_by_auto(kind) if precision == AUTO else (precision,)
        if (runtime not in (AUTO, served_by) or artifact.precision not in wanted
                or (passed is not None and not passed.get(key, {}).get("passed"))
                or artifact.device_kind not in (None, device_kind)):
            continue
        out.append((served_by, artifact.precision))
    return sorted(out, key=lambda c: (c[0], PRECISIONS.index(c[1])))


def choose_for_export(manifest: Manifest, kind: str, runtime: str = AUTO, precision: str = AUTO) -> ServedChoice:
    """What a repository of ``manifest`` for ``kind`` instances serves (``runtime`` / ``precision``:
    the user's, or ``auto``); refused when the export has nothing that fits."""
    candidates = export_candidates(manifest, kind, runtime, precision)
    if candidates and AUTO not in (runtime, precision):
        return ServedChoice(runtime, precision, f"as asked: --runtime {runtime} --precision {precision}")
    if not candidates:
        wanted = f"{'' if runtime == AUTO else runtime + ' '}{'' if precision == AUTO else precision + ' '}"
        raise InputError(f"the export has no {wanted}artifact that passed its parity gate and runs on a {kind} "
                         f"instance (it has: {', '.join(manifest.artifacts)})",
                         fix="re-export with the format / precision you need (an AOTInductor package on the host "
                             "that serves it), or pass --runtime auto --precision auto")
    timings = manifest.timings
    measured_here = timings.get("device_kind") == Device.of_instance_kind(kind).compiled_kind
    by_key = timings.get("ms_per_clip", {}) if measured_here else {}
    measured = {c: by_key.get(artifact_key(BACKEND_FORMAT[c[0]], c[1]), {}) for c in candidates}
    where = f"{timings.get('device', '')} at export ({timings.get('threads', '?')} threads)" if by_key else ""
    return choose(candidates, measured, kind, measured_on=where)


