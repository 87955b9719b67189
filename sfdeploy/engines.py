"""Run ``sfdeploy infer`` on either engine, from the command line or a plain Python script.

::

    from sfdeploy.engines import run_infer
    from sfdeploy.infer_options import InferOptions
    from sfdeploy.target import ModelTarget

    summary = run_infer(["videos/"], "p.csv", ModelTarget(export_dir="EXPORT"), InferOptions(batch_size=8))
    summary = run_infer(["videos/"], "p.csv", ModelTarget(export_dir="EXPORT"), engine="ray", address="auto")

The same options mean the same on both engines and are refused alike
(:class:`~sfdeploy.errors.OptionError` names the option an engine cannot honour); ``local`` runs
:func:`sfdeploy.client.infer` in this process, ``ray`` :func:`sfdeploy.scale.engine.infer_ray`
on a Ray cluster. Both are imported only when chosen (Ray is an optional extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfdeploy.errors import OptionError
from sfdeploy.infer_options import InferOptions

if TYPE_CHECKING:
    from sfdeploy.output import InferSummary
    from sfdeploy.target import ModelTarget

ENGINES = ("local", "ray")  # this machine's processes; a Ray cluster (README "Scale out")


def check_local(target: ModelTarget, options: InferOptions) -> None:
    """Refuse what the local engine cannot do with ``target``, naming the option (the Ray engine's
    own refusals are :class:`~sfdeploy.scale.engine.RayOptions`')."""
    from sfdeploy.decode.gpu.select import SERVER_DECODE_MODES

    if options.decode not in SERVER_DECODE_MODES and target.server_decode:
        raise OptionError(f"--decode {options.decode} names a decoder of this machine; with --server-decode the "
                          "server chooses among its own", option="--decode",
                          fix=f"use --decode {' or '.join(SERVER_DECODE_MODES)} (asked of the server), or drop "
                              "--server-decode")
    if len(target.urls) > 1:
        raise OptionError("one server per run with --engine local", option="--url",
                          fix="--engine ray spreads over several")


def run_infer(inputs: Sequence[str | Path], out: str | Path, target: ModelTarget, options: InferOptions | None = None,
              *, engine: str = "local", resume: bool = False, show_progress: bool = True, **ray: Any) -> InferSummary:
    """Classify ``inputs`` (files and folders) with ``target`` into ``out`` on ``engine``, one row
    per input, and return the run's summary (:class:`~sfdeploy.output.InferSummary`; on Ray its
    :class:`~sfdeploy.scale.engine.RaySummary`). ``ray``: the cluster's share, as
    :class:`~sfdeploy.scale.engine.RayOptions` fields (``address``, ``actor_cpus``,
    ``stall_timeout_s``); the local engine does not use them."""
    options = options or InferOptions()
    if engine == "local":
        check_local(target, options)
        from sfdeploy.client import Classifier, infer

        with Classifier.open(target) as classifier:
            return infer(inputs, out, classifier, options, resume=resume, show_progress=show_progress)
    if engine != "ray":
        raise OptionError(f"unknown engine '{engine}'", option="--engine", fix=f"use one of {', '.join(ENGINES)}")
    from sfdeploy.scale.engine import RayOptions, infer_ray

    return infer_ray(inputs, out, RayOptions(target, options, **ray), resume=resume, show_progress=show_progress)
