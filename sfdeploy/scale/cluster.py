"""Where ``--engine ray`` runs (join a cluster, or start Ray on this machine) and how much of the
object store decoded clips may hold.

A decoded clip is large (R50, 30 views of 32 frames at 224 px: 145 MB of uint8), so the run
does not let Ray Data fill the object store with them: its object-store budget is sized to the
batches the stages need in flight (a few per model actor, one or two per decode task) and capped
at Ray Data's default share of the store. Decode tasks then wait (backpressure) rather than
spill decoded video to disk. The settings are logged at the start of every run.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

from sfdeploy.errors import EnvironmentProblem

log = logging.getLogger("sfdeploy")

MiB = 1024 * 1024
DATA_SHARE = 0.5  # Ray Data's default share of the object store (RAY_DATA_OBJECT_STORE_MEMORY_LIMIT_FRACTION)
BATCHES_PER_ACTOR = 4  # queued for each model actor, so it never waits for the next batch
BATCHES_PER_DECODE_TASK = 2  # one being filled, one waiting to be taken
MIN_BUDGET = 64 * MiB


@dataclass(frozen=True)
class Cluster:
    address: str  # what was joined, or "local" for a Ray started here
    started_here: bool  # this process started Ray (and shuts it down)
    owned: bool  # this process connected (and disconnects); False when the caller had called ray.init
    cpus: float
    gpus: float
    object_store_bytes: int


def connect(address: str | None, *, num_cpus: int | None = None) -> Cluster:
    """Join the Ray cluster at ``address`` (``auto``, ``host:6379``, ``ray://host:10001``; else
    ``RAY_ADDRESS``, which ``ray job submit`` sets), or start Ray on this machine with ``num_cpus``
    logical CPUs; reuse Ray if this process already runs it."""
    try:
        import ray
    except ImportError as exc:
        raise EnvironmentProblem("--engine ray needs Ray, which is not installed",
                                 fix="pip install 'sfdeploy[ray]' (ray[data] with pins that fit sfdeploy's)") from exc
    owned = not ray.is_initialized()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if owned:
        quiet = {"logging_level": logging.WARNING, "log_to_driver": False}  # stdout stays the summary
        try:
            if address:
                ray.init(address=address, **quiet)
            else:
                # "local": a Ray of our own, even where `ray start` left a cluster running. It sends
                # no usage statistics home unless the user's environment says otherwise.
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise EnvironmentProblem(f"cannot {'join the Ray cluster at ' + address if address else 'start Ray'} "
                                     f"({type(exc).__name__}: {exc})",
                                     fix="start the head with `ray start --head` and pass its address (`ray status` "
                                         "prints it); a cluster with token authentication (Ray's default) also needs "
                                         "RAY_AUTH_MODE=token and its token (`ray get-auth-token` on the head) in "
                                         "~/.ray/auth_token or RAY_AUTH_TOKEN") from exc
    resources = ray.cluster_resources()
    return Cluster(address=address or "local", started_here=owned and not address, owned=owned,
                   cpus=float(resources.get("CPU", 0)), gpus=float(resources.get("GPU", 0)),
                   object_store_bytes=int(resources.get("object_store_memory", 0)))


def disconnect(cluster: Cluster) -> None:
    """Stop the Ray this run started, or leave the cluster it joined (the cluster keeps running)."""
    import ray

    if cluster.owned:
        ray.shutdown()


def check_placement(cluster: Cluster, *, actors: int, actor_cpus: float, actor_gpus: int) -> None:
    """Model actors that cannot all be placed beside at least one decode task would wait for ever
    on a Ray of fixed size: say so now. A joined cluster may grow (autoscaler): warn and go on."""
    cpus, gpus = actors * actor_cpus + 1, actors * actor_gpus
    if cpus <= cluster.cpus and gpus <= cluster.gpus:
        return
    what = (f"{actors} model actor(s) and a decode task need {cpus:g} CPU(s) and {gpus} GPU(s); "
            f"the Ray cluster has {cluster.cpus:g} CPU(s) and {cluster.gpus:g} GPU(s)")
    if cluster.started_here:
        raise EnvironmentProblem(what, fix="lower --concurrency or --actor-cpus, use --device cpu, or join a "
                                           "cluster with GPU nodes (--ray-address)")
    log.warning("ray: %s: waiting for the cluster to grow", what)


@dataclass(frozen=True)
class Sizing:
    clip_bytes: int
    batch_bytes: int
    budget_bytes: int  # Ray Data's object-store limit for this run
    batches_in_flight: int  # what the stages want in flight; the budget holds min(this, what fits)

    def describe(self) -> str:
        fits = self.budget_bytes // max(1, self.batch_bytes)
        note = "" if fits >= self.batches_in_flight else (
            f"; only {fits} of the {self.batches_in_flight} batches the stages could use fit: decoding waits "
            "for the model (a bigger object store, or a smaller --batch-size, keeps more in flight)")
        return (f"decoded clip {self.clip_bytes / MiB:.1f} MiB, batch {self.batch_bytes / MiB:.1f} MiB; "
                f"decoded data in the object store bounded to {self.budget_bytes / MiB:.0f} MiB{note}")


def size_object_store(clip_bytes: int, batch_size: int, actors: int, decode_tasks: int,
                      object_store_bytes: int) -> Sizing:
    """The object-store budget for decoded clips: what the stages need in flight, within Ray
    Data's share of the store."""
    batch_bytes = clip_bytes * batch_size
    wanted = BATCHES_PER_ACTOR * actors + BATCHES_PER_DECODE_TASK * decode_tasks
    budget = min(int(object_store_bytes * DATA_SHARE), max(MIN_BUDGET, wanted * batch_bytes))
    return Sizing(clip_bytes, batch_bytes, budget, wanted)


SMALL_SHM = 2**30  # docker gives containers 64 MB of /dev/shm unless told (--shm-size)


def shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm, where Ray keeps its object store (None: no /dev/shm here)."""
    return shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else None


def shm_note() -> str:
    free = shm_free_bytes()
    if free is None:
        return "no /dev/shm"
    note = f"/dev/shm {free / 2**30:.1f} GiB free"
    if free < SMALL_SHM:
        note += " (small: Ray falls back to slower disk; give containers --shm-size, see README 'Scale out')"
    return note
