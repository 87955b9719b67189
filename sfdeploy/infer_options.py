"""How videos are classified, whichever engine runs them: the one owner of the inference options.

``sfdeploy infer`` (both engines), :meth:`sfdeploy.client.Classifier.classify`,
:func:`sfdeploy.client.infer` and :class:`sfdeploy.scale.engine.RayOptions` take one
:class:`InferOptions`; its defaults are the CLI's defaults, and its check is the one input check
(with one fix) of every engine. The model is the other half of a run (:class:`sfdeploy.target.ModelTarget`);
where the work runs is the engine's own (a Ray cluster's share: ``RayOptions``).
"""

from __future__ import annotations

from dataclasses import dataclass

from sfdeploy.decode import MAX_VIDEO_PIXELS
from sfdeploy.errors import InputError

#: Requests in flight on one machine when ``concurrency`` is not given: enough to keep a server or
#: a local model busy while the next batch is packed.
LOCAL_CONCURRENCY = 4
#: Model actors of ``--engine ray`` when ``concurrency`` is not given: one (a GPU each with ``--device cuda``).
RAY_ACTORS = 1


@dataclass(frozen=True)
class InferOptions:
    """Batching, concurrency, decoding and output shape of one run, checked once when built.

    A frozen value, so that one set of options can be handed to either engine (or reused for the
    next run) and mean the same there."""

    batch_size: int = 8  # videos per request (local) or per model-actor call (ray)
    # requests in flight (local engine) or model actors (ray); None: the engine's default
    # (LOCAL_CONCURRENCY, RAY_ACTORS), because a model actor holds a CPU or GPU and a request does not
    concurrency: int | None = None
    workers: int | None = None  # decode processes (local) or decode tasks at once (ray) [one per CPU]
    topk: int = 5  # classes per row
    max_pixels: int = MAX_VIDEO_PIXELS  # videos with larger frames are refused before decoding
    # where videos are decoded: auto, cpu, gpu, or a GPU decoder by name (sfdeploy.decode.gpu.select);
    # only the local engine, decoding into a local model's GPU, uses more than the CPU
    decode: str = "auto"

    def __post_init__(self) -> None:
        counts = {"batch size": self.batch_size, "concurrency": self.concurrency, "workers": self.workers}
        bad = [name for name, value in counts.items() if value is not None and value < 1]
        if bad:
            raise InputError(f"{' and '.join(bad)} must be >= 1",
                             fix=f"use e.g. --batch-size 8 --concurrency {LOCAL_CONCURRENCY}")

    def in_flight(self) -> int:
        """Requests in flight at once on the local engine."""
        return self.concurrency or LOCAL_CONCURRENCY

    def model_actors(self) -> int:
        """Model actors of the Ray engine."""
        return self.concurrency or RAY_ACTORS
