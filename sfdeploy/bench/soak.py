"""A load soak of a served ``<name>_video``: many encoded videos, some of them corrupt, at high
concurrency, against a server started here on loopback; what it measures is what a hostile or just
busy world costs the server.

Every request carries one video. The good ones come from a folder of videos, each classified once
alone first (its reference label); the corrupt ones (``corrupt_share`` of the requests: random
bytes, a truncated file, an empty one, text) are spread over the run. Recorded: requests sent;
their outcomes: classified as the reference or not, corrupt ones refused or not, refused as busy by
the queue policy (503: an answer, retry later), **lost** (no answer, or a failure that is neither
the video's own nor busy); latency percentiles (p50/p90/p99/max); how many later requests overtook
each one (first come, first served keeps this near the number of instances; starvation shows as
far more); the server's process-tree memory (:meth:`TritonServer.memory`) before and after; and
Triton's statistics per model (mean queue and compute time per request): where a slow request
waited. The run is bounded in requests and in time (``time_limit_s``: requests not started by then
are not sent, and counted).
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfdeploy.artifacts import video_model_name
from sfdeploy.decode.clips import ServerDecoded
from sfdeploy.endpoints import DEFAULT_MODEL
from sfdeploy.errors import ServingError
from sfdeploy.runtime.triton import TritonPredictor
from sfdeploy.runtime.triton_video import BUSY, TritonVideoPredictor


@dataclass(frozen=True)
class SoakOptions:
    """How hard and how long to soak: the defaults are the recorded run (benchmarks/soak.py); one
    seed draws the same corrupt requests in the same places, so two runs are comparable."""

    requests: int = 2000
    concurrency: int = 64
    corrupt_share: float = 0.01
    protocol: str = "http"
    model: str = DEFAULT_MODEL  # requests go to <model>_video
    time_limit_s: float = 600.0
    seed: int = 0


def corrupt_payloads(good: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    """Four kinds of bad upload made from a good file (what a careless or hostile client sends)."""
    return [("random", rng.randbytes(len(good))), ("truncated", good[:len(good) // 3]), ("empty", b""),
            ("text", b"this is not a video\n" * 50)]


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _stats(url: str, protocol: str, model: str) -> dict[str, float]:
    """Triton's cumulative counts for ``model``: requests, and nanoseconds queued and computing."""
    predictor = TritonPredictor(url, model=model, protocol=protocol)
    try:
        stats = predictor.statistics()
    finally:
        predictor.close()
    infer = stats.get("inference_stats", {})
    return {"requests": int(infer.get("success", {}).get("count", 0)) + int(infer.get("fail", {}).get("count", 0)),
            "queue_ns": int(infer.get("queue", {}).get("ns", 0)), "compute_ns":
            sum(int(infer.get(k, {}).get("ns", 0)) for k in ("compute_input", "compute_infer", "compute_output"))}


def _where_time_went(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    requests = max(1, after["requests"] - before["requests"])
    return {"requests": after["requests"] - before["requests"],
            "mean_queue_ms": round((after["queue_ns"] - before["queue_ns"]) / requests / 1e6, 2),
            "mean_compute_ms": round((after["compute_ns"] - before["compute_ns"]) / requests / 1e6, 2)}


def _overtaken(spans: list[tuple[float, float]]) -> dict[str, float]:
    """How many requests sent later were answered earlier, per request: near the number of model
    instances where requests are served first come, first served; far more where some starve."""
    ends = np.array([end for _, end in sorted(spans)])
    counts = [int((ends[i + 1:] < end).sum()) for i, end in enumerate(ends)]
    return {"p50": _percentile(counts, 50), "p99": _percentile(counts, 99), "max": max(counts, default=0)}


def run_soak(server: Any, videos: Sequence[Path], opts: SoakOptions) -> dict[str, Any]:
    """Soak ``server`` (a started :class:`~sfdeploy.serving.server.TritonServer`) with ``videos``."""
    rng = random.Random(opts.seed)
    url = server.url(opts.protocol)
    predictor = TritonVideoPredictor(url, model=opts.model, protocol=opts.protocol)
    good = [(str(path), path.read_bytes()) for path in videos]
    reference = _reference_labels(predictor, good)
    plan = _plan(good, reference, corrupt_payloads(good[0][1], rng), opts, rng)
    models = [video_model_name(opts.model), opts.model]
    stats_before = {m: _stats(url, opts.protocol, m) for m in models}
    memory_before = server.memory()
    tally, wall = _send_all(predictor, plan, opts)
    predictor.close()
    memory_after = server.memory()
    stats_after = {m: _stats(url, opts.protocol, m) for m in models}
    latencies = tally.latencies
    return {
        "settings": asdict(opts), "videos": len(good),
        "corrupt_sent": sum(1 for _, _, expected in plan if expected is None),
        "outcomes": tally.outcomes, "lost_examples": tally.lost_errors[:5],
        "wall_s": round(wall, 1), "requests_per_s": round(len(latencies) / wall, 2) if wall else 0.0,
        "latency_s": {"p50": round(_percentile(latencies, 50), 3), "p90": round(_percentile(latencies, 90), 3),
                      "p99": round(_percentile(latencies, 99), 3), "max": round(max(latencies, default=0.0), 3),
                      "mean": round(statistics.fmean(latencies), 3) if latencies else None},
        "overtaken": _overtaken(tally.spans),
        "server_memory_mb": {"before": memory_before, "after": memory_after},
        "triton_per_request": {m: _where_time_went(stats_before[m], stats_after[m]) for m in models},
    }


#: one request of the plan: (name, payload, the reference label; None: a corrupt one, must be refused)
Request = tuple[str, bytes, str | None]


def _reference_labels(predictor: TritonVideoPredictor, good: list[tuple[str, bytes]]) -> dict[str, str]:
    """Each good video's label, asked alone before the load: the answer the load must not change."""
    classes = predictor.spec.class_names
    reference = {}
    for name, payload in good:
        answer = predictor.predict([payload])[0]
        if isinstance(answer, str):
            raise ServingError(f"a good video was refused before the soak: {answer}", path=name)
        reference[name] = classes[int(np.argmax(answer.probs))]
    return reference


def _plan(good: list[tuple[str, bytes]], reference: dict[str, str], corrupt: list[tuple[str, bytes]],
          opts: SoakOptions, rng: random.Random) -> list[Request]:
    """``opts.requests`` requests in sending order: the good videos in turn, a corrupt upload instead
    with probability ``opts.corrupt_share`` (drawn from ``rng``: the same seed, the same run)."""
    plan: list[Request] = []
    for i in range(opts.requests):
        if rng.random() < opts.corrupt_share:
            kind, payload = corrupt[i % len(corrupt)]
            plan.append((f"corrupt:{kind}", payload, None))
        else:
            name, payload = good[i % len(good)]
            plan.append((name, payload, reference[name]))
    return plan


@dataclass
class _Tally:
    """What the client threads record, each change under ``lock``."""

    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("correct", "wrong", "refused_corrupt", "accepted_corrupt", "refused_good", "busy", "lost", "not_sent"), 0))
    latencies: list[float] = field(default_factory=list)
    spans: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each answered request
    lost_errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _outcome(answer: ServerDecoded | str, expected: str | None, classes: Sequence[str]) -> str:
    """The outcome key of one answered request (a ``str`` answer: the server refused the video)."""
    refused = isinstance(answer, str)
    if expected is None:
        return "refused_corrupt" if refused else "accepted_corrupt"
    if refused:
        return "refused_good"
    return "correct" if classes[int(np.argmax(answer.probs))] == expected else "wrong"


def _send_all(predictor: TritonVideoPredictor, plan: list[Request], opts: SoakOptions) -> tuple[_Tally, float]:
    """Send ``plan`` from ``opts.concurrency`` threads, each taking the next request as it is free,
    until ``opts.time_limit_s`` (later ones are counted as not sent); the tally and the wall time."""
    classes = predictor.spec.class_names
    tally = _Tally()
    cursor = iter(range(len(plan)))
    deadline = time.monotonic() + opts.time_limit_s

    def client() -> None:
        while True:
            with tally.lock:
                index = next(cursor, None)
            if index is None:
                return
            name, payload, expected = plan[index]
            if time.monotonic() > deadline:
                with tally.lock:
                    tally.outcomes["not_sent"] += 1
                continue
            start = time.perf_counter()
            try:
                answer = predictor.predict([payload])[0]
            except ServingError as exc:  # refused by the queue policy (an answer: retry later), or lost
                busy = any(reason in exc.message for reason in BUSY)
                with tally.lock:
                    tally.outcomes["busy" if busy else "lost"] += 1
                    if not busy:
                        tally.lost_errors.append(f"{name}: {exc.message}"[:300])
                continue
            seconds = time.perf_counter() - start
            kind = _outcome(answer, expected, classes)
            with tally.lock:
                tally.outcomes[kind] += 1
                tally.latencies.append(seconds)
                tally.spans.append((start, start + seconds))

    started = time.monotonic()
    threads = [threading.Thread(target=client, name=f"soak-{i}") for i in range(opts.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally, time.monotonic() - started
