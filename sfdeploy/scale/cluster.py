"""Where ``--engine ray`` runs (join a cluster, or start Ray on this machine) and how much of the
object store decoded clips may hold.

A decoded clip is large (R50, 30 views of 32 frames at 224 px: 145 MB of uint8), so the run
does not let Ray Data fill the object store with them: its object-store budget is sized to the
batches the stages need in flight (a few per model actor, one or two per decode task) and capped
at Ray Data's default share of the store. Decode tasks then wait (backpressure) rather than
spill decoded video to disk. The settings are logged at the start of every run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

from sfdeploy.errors import EnvironmentProblem, InputError

log = logging.getLogger("sfdeploy")

MiB = 1024 * 1024
DATA_SHARE = 0.5  # Ray Data's default share of the object store (RAY_DATA_OBJECT_STORE_MEMORY_LIMIT_FRACTION)
BATCHES_PER_ACTOR = 4  # queued for each model actor, so it never waits for the next batch
BATCHES_PER_DECODE_TASK = 2  # one being filled, one waiting to be taken
MIN_BUDGET = 64 * MiB
# A run with no row for this long while Ray cannot place its work stops (sfdeploy.scale.stall): long
# enough for an autoscaler to add a node, short of leaving a user to wonder for an hour.
STALL_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Cluster:
    """The Ray this run works on, and what it has: sizes the stages, and says at the end whether
    this process stops or leaves it."""

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
    address = cluster_address(address)
    if owned:
        quiet = {"logging_level": logging.WARNING, "log_to_driver": False}  # stdout stays the summary
        try:
            if address:
                check_address(address)
                ray.init(address=address, **quiet)
            else:
                # "local": a Ray of our own, even where `ray start` left a cluster running. It sends
                # no usage statistics home unless the user's environment says otherwise.
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                # Ray says it turned token authentication on for the Ray it starts: as it should.
                with quiet_loggers({"ray._private.authentication.authentication_token_setup": logging.ERROR}):
                    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)
        except (ConnectionError, ValueError, RuntimeError, ray.exceptions.RayError) as exc:
            raise EnvironmentProblem(f"cannot {'join the Ray cluster at ' + address if address else 'start Ray'} "
                                     f"({type(exc).__name__}: {exc})",
                                     fix=f"start the head with `ray start --head` and pass its address (`ray status` "
                                         f"prints it); {TOKEN_FIX}") from exc
    resources = ray.cluster_resources()
    return Cluster(address=address or "local", started_here=owned and not address, owned=owned,
                   cpus=float(resources.get("CPU", 0)), gpus=float(resources.get("GPU", 0)),
                   object_store_bytes=int(resources.get("object_store_memory", 0)))


TOKEN_FIX = ("a cluster with token authentication (Ray's default once a token exists) needs `export "
             "RAY_AUTH_MODE=token` in every shell that runs `ray` or sfdeploy, and the head's token (`ray "
             "get-auth-token` there) in ~/.ray/auth_token or RAY_AUTH_TOKEN")
PROBE_S = 5.0  # a head answers in milliseconds; Ray's own join retries for ~20 s before it gives up


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: ``--ray-address``, else ``RAY_ADDRESS`` (``ray job submit`` sets it), else none."""
    return address or os.environ.get("RAY_ADDRESS") or None


def preflight(address: str | None) -> None:
    """:func:`check_address` for the cluster :func:`connect` would join, if it would join one."""
    try:
        import ray
    except ImportError:
        return  # connect says how to install it
    address = cluster_address(address)
    if address and not ray.is_initialized():
        check_address(address)


def check_address(address: str) -> None:
    """Ask the head at ``HOST:PORT`` for its cluster id, as Ray's first call would, and say at once
    what is wrong: nothing answers there, or it wants a token this shell does not send.

    ``ray.init`` would retry for ~20 s and then name Ray's own node IP rather than the address
    typed. ``auto`` and ``ray://`` (Ray Client) addresses, and TLS clusters, are left to Ray.
    """
    if address == "auto" or "://" in address or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise InputError(f"--ray-address {address} is not HOST:PORT",
                         fix="pass the head's address, e.g. 10.0.0.1:6379 (`ray start --head --port 6379`), "
                             "auto (a Ray started on this machine), or ray://HOST:10001")
    import grpc
    import ray
    from ray._raylet import AuthenticationTokenLoader
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    token_mode = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    metadata: tuple[tuple[str, str], ...] = ()
    if token_mode:
        try:  # Ray raises rather than answer False when token mode is on and no token is found
            loader = AuthenticationTokenLoader.instance()
            metadata = tuple((k.lower(), v) for k, v in loader.get_token_for_http_header().items())
        except ray.exceptions.AuthenticationError as exc:
            raise EnvironmentProblem("RAY_AUTH_MODE is 'token' and this machine has no Ray token",
                                     fix=TOKEN_FIX) from exc
    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=PROBE_S, metadata=metadata)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                mode = os.environ.get("RAY_AUTH_MODE")
                what = (f"this shell sends no token (RAY_AUTH_MODE is {repr(mode) if mode else 'unset'})"
                        if not token_mode else
                        "the token here is not the cluster's")
                raise EnvironmentProblem(f"the Ray cluster at {address} uses token authentication and {what}",
                                         fix=TOKEN_FIX) from exc
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise EnvironmentProblem(f"no Ray head answers at {address} (nothing listens there, or it cannot "
                                         f"be reached within {PROBE_S:g} s)",
                                         fix="check HOST:PORT: the head's `ray start --head --port PORT` (`ray status "
                                             "--address HOST:PORT` on a node tells), and that this machine can reach "
                                             "it") from exc
            # anything else (an older head, a proxy): ray.init decides


@contextlib.contextmanager
def quiet_loggers(levels: dict[str, int]) -> Iterator[None]:
    """Raise these loggers' levels while the block runs: Ray's notices stay off the user's
    terminal, its warnings and errors (at or above the level given) do not."""
    saved = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


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
    """How much of the object store decoded clips may take in this run, and why (the batches the
    stages want in flight, at most half the store), so that decoding cannot fill it and spill."""

    clip_bytes: int
    batch_bytes: int
    budget_bytes: int  # Ray Data's object-store limit for this run
    batches_in_flight: int  # what the stages want in flight; the budget holds min(this, what fits)

    def describe(self) -> str:
        """The sizing in one log line, saying when fewer batches fit than the stages could use."""
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
    """Free ``/dev/shm``, for the log: Ray keeps its object store there, and a container's default
    64 MB sends it to slower disk."""
    free = shm_free_bytes()
    if free is None:
        return "no /dev/shm"
    note = f"/dev/shm {free / 2**30:.1f} GiB free"
    if free < SMALL_SHM:
        note += " (small: Ray falls back to slower disk; give containers --shm-size, see README 'Scale out')"
    return note
