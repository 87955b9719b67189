"""Notice an ``--engine ray`` run that cannot go on, say why, and stop it.

Ray redoes the work of a lost node, but only where the resources it asks for are free. On a
cluster with no spare capacity (two nodes of 1 CPU: the model actor on one, decode tasks on the
other, and the second one is lost) the retried decode task waits for a CPU the model actor holds,
for ever, and the run prints nothing. Ray Data's own guard would fail it after 30 minutes with
no word of the cause.

The run is stalled when no row has come for ``timeout_s`` *and* Ray reports work of this run's
stages that it cannot place (the "Pending Demands" of ``ray status``, read from the head, which
needs no ``ray[default]``). A slow stage with everything placed (a long video, a big batch on a
CPU) is not a stall: it is said once, and the run goes on. The check runs in the driver, in Ray
Data's own scheduling loop (an execution callback), so stopping the run shuts its tasks and
actors down as any failed run would; the rows already written stay, and ``--resume`` completes
the rest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from ray.data._internal.execution.execution_callback import ExecutionCallback

from sfdeploy.errors import ServingError

log = logging.getLogger("sfdeploy")

CONFIG_KEY = "sfdeploy.stall_rule"  # where the rule rides in the dataset's DataContext
CHECK_EVERY_S = 2.0  # how often an idle run asks the head what it waits for
NOTICE_AFTER_S = 30.0  # an idle run says what it waits for after this long, before it gives up


@dataclass(frozen=True)
class StageNeed:
    """What one task or actor of a stage asks Ray for, as Ray reports a demand for it."""

    stage: str  # "decode task", "model actor"
    resources: tuple[tuple[str, float], ...]  # (name, amount); memory in bytes

    def matches(self, bundle: dict[str, float]) -> bool:
        """Whether Ray's pending demand ``bundle`` is a task or actor of this stage."""
        wanted = dict(self.resources)
        given = {name: amount for name, amount in bundle.items() if amount}
        return given.keys() == wanted.keys() and all(abs(given[k] - wanted[k]) <= 1e-6 * max(1.0, wanted[k])
                                                     for k in wanted)

    def describe(self) -> str:
        """What it asks for, in words (e.g. 1 CPU, 259 MiB memory)."""
        return ", ".join(_amount(name, amount) for name, amount in self.resources)


@dataclass(frozen=True)
class StallRule:
    """When a run that waits on Ray counts as stalled, and what its stages ask Ray for: handed to
    the watch through Ray Data's context (the watch runs inside Ray's executor)."""

    timeout_s: float  # no row for this long while Ray cannot place this run's work: stop
    needs: tuple[StageNeed, ...]
    notice_s: float = NOTICE_AFTER_S  # say what the run waits for after this long


def watch_settings(context: Any, rule: StallRule | None) -> dict[str, Any]:
    """DataContext attributes that make a dataset's execution run :class:`StallWatch` with ``rule``
    (none for ``timeout_s`` 0: the check is off)."""
    if rule is None or rule.timeout_s <= 0:
        return {}
    configs = dict(context._kv_configs)  # get_config's store; a copy, as set_config would change the caller's
    configs[CONFIG_KEY] = rule
    return {"custom_execution_callback_classes": [*context.custom_execution_callback_classes, StallWatch],
            "_kv_configs": configs}


class StallWatch(ExecutionCallback):
    """Ray Data calls this at every step of its scheduling loop, in the driver."""

    def before_execution_starts(self, executor: Any) -> None:
        """Ray Data's hook: read this run's rule and start the clock."""
        self.rule: StallRule | None = executor._data_context.get_config(CONFIG_KEY)
        self.rows_out = -1
        self.since = self.next_check = time.monotonic()
        self.said: set[bool] = set()  # the notices given since the last row: waiting for room (True), slow (False)

    def on_execution_step(self, executor: Any) -> None:
        """Ray Data's hook, each scheduling step: restart the clock on a new row, else say once what
        the run waits for, and stop it once it has waited ``timeout_s`` for work Ray cannot place."""
        if self.rule is None:
            return
        output, _ = executor._output_node
        now = time.monotonic()
        if output.metrics.num_outputs_taken != self.rows_out:  # rows came: not stalled
            self.rows_out, self.since, self.said = output.metrics.num_outputs_taken, now, set()
            return
        idle = now - self.since
        if idle < min(self.rule.notice_s, self.rule.timeout_s) or now < self.next_check:
            return
        self.next_check = now + CHECK_EVERY_S
        found = unplaced_work(self.rule.needs)
        if found is None:  # the head did not answer this time: decide at the next check
            return
        waiting, cluster = found
        if waiting and idle >= self.rule.timeout_s:
            raise stall_error(idle, waiting, cluster)
        if bool(waiting) in self.said:
            return
        self.said.add(bool(waiting))
        if waiting:
            log.warning("ray: no row for %.0f s: Ray cannot place %s (%s); the run stops after %.0f s of this "
                        "(--stall-timeout)", idle, _work(waiting), cluster, self.rule.timeout_s)
        else:
            log.warning("ray: no row for %.0f s, and Ray has placed all of this run's work: a stage is slow "
                        "(a long video, a big batch on a CPU); waiting", idle)


def unplaced_work(needs: tuple[StageNeed, ...]) -> tuple[list[tuple[StageNeed, int]], str] | None:
    """This run's tasks and actors that Ray holds for lack of resources (from the head's view,
    what ``ray status`` shows as Pending Demands), and the cluster's totals in words; None if the
    head did not answer."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    try:
        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=10)
    except (ray.exceptions.RayError, ConnectionError, TimeoutError) as exc:
        log.debug("ray: cluster status unavailable: %s", exc)
        return None
    waiting: dict[StageNeed, int] = {}
    for demand in status.resource_demands.ray_task_actor_demand:
        for request in demand.bundles_by_count:
            need = next((n for n in needs if n.matches(request.bundle)), None)
            if need is not None:  # other jobs' demands on a shared cluster are not this run's stall
                waiting[need] = waiting.get(need, 0) + request.count
    usage = {u.resource_name: u for u in status.cluster_resource_usage}
    nodes = len(status.active_nodes) + len(status.idle_nodes)
    held = "; ".join(f"{_amount(name, usage[name].used)} of {_amount(name, usage[name].total)} in use"
                     for name in ("CPU", "GPU") if name in usage and usage[name].total)
    return list(waiting.items()), f"Ray counts {nodes} node(s), {held or 'no CPU'}"


def stall_error(idle: float, waiting: list[tuple[StageNeed, int]], cluster: str) -> ServingError:
    """The error that stops a stalled run: what Ray cannot place, why, and how to go on."""
    largest = max((need for need, _ in waiting), key=lambda n: dict(n.resources).get("CPU", 0))
    return ServingError(
        f"the Ray run stalled: no row for {idle:.0f} s, and Ray cannot place {_work(waiting)} ({cluster}). "
        "Ray redoes lost work (a lost node's tasks and actors) only where what it asks for is free",
        fix=f"give the cluster room for a {largest.stage} (a node with {largest.describe()} free: "
            "`ray start --address HEAD:PORT` on it), or ask for less (--concurrency, --actor-cpus)")


def _work(waiting: list[tuple[StageNeed, int]]) -> str:
    return ", ".join(f"{count} {need.stage}(s) needing {need.describe()} each" for need, count in waiting)


def _amount(name: str, amount: float) -> str:
    if name == "memory":
        return f"{amount / 2**20:.0f} MiB memory"
    return f"{amount:g} {name}"
