"""Every stage's planner, by stage name: the one registry :func:`sfdeploy.bench.run.run_bench` reads.

The inference stages' planners live in :mod:`sfdeploy.bench.stages`; training speed
(:mod:`sfdeploy.bench.training`) and the distilled student (:mod:`sfdeploy.bench.distill`) build on
its :class:`~sfdeploy.bench.stages.Task`, so they are gathered here, above all three.
"""

from __future__ import annotations

from collections.abc import Callable

from sfdeploy.bench import distill, stages, training
from sfdeploy.bench.context import Context
from sfdeploy.bench.stages import Task

PLANNERS: dict[str, Callable[[Context], list[Task]]] = {
    **stages.PLANNERS, "train": training.plan, "distill": distill.plan}
