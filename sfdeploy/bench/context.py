"""What the tasks of one ``sfdeploy bench`` run share (:class:`Context`): the bench export (made
once, kept), the one predictor or module held at a time (GPU memory goes to the row being timed),
the Triton server (started on first use), the videos, and the served choice (what `sfdeploy repo
--runtime auto` would serve, chosen from the run's own model rows and kept in the record).
Everything is made on first use, so a resumed run whose stage is complete makes nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sfdeploy.artifacts import LOCAL_BACKENDS, backend_format
from sfdeploy.bench import suites
from sfdeploy.bench.exports import ensure_bench_export
from sfdeploy.bench.model import BenchModel
from sfdeploy.device import Device
from sfdeploy.endpoints import DEFAULT_MODEL as SERVED_MODEL
from sfdeploy.errors import EnvironmentProblem, InputError
from sfdeploy.precision import auto_precisions, servable_by_auto, supported
from sfdeploy.target import SERVED, ModelTarget


class Context:
    """What the tasks of one run share; everything is made on first use and kept for the run."""

    def __init__(self, opts: Any, model: BenchModel, device: Device, work: Path, export_dir: Path,
                 record: Any = None) -> None:
        self.opts, self.model, self.work, self.export_dir = opts, model, work, export_dir
        self.device = Device(device)  # resolved: cpu or cuda[:N]
        self.record = record  # the run's record: the measured rows the served choice is made from
        self.workers = opts.workers or os.cpu_count() or 1
        self._held: tuple[Any, Any, Callable[[Any], None]] | None = None
        self._server: Any = None
        self._choice: Any = None
        self._stack = contextlib.ExitStack()

    @property
    def choice(self) -> Any:
        """What `sfdeploy repo --runtime auto --precision auto` serves, chosen the way it chooses
        (:func:`sfdeploy.serving.choice.choose`) from this run's own model rows (at the first
        stage that serves; kept in the record, so a resumed run serves the same)."""
        if self._choice is None:
            from sfdeploy.serving.choice import ServedChoice, choose

            kept = (self.record.data.get("served_choice") if self.record is not None else None) or {}
            if kept:
                self._choice = ServedChoice.from_dict(kept)
            else:
                self._choice = choose(*self._measured(), self.device.instance_kind,
                                      measured_on=f"{self.device} by this run's model stage")
                if self.record is not None:
                    self.record.data["served_choice"] = self._choice.to_dict()
                    self.record.save()
        return self._choice

    def _measured(self) -> tuple[list[tuple[str, str]], dict[tuple[str, str], dict[str, float]]]:
        """The (runtime, precision) pairs this run may serve, and its model rows' ms per clip for each."""
        precisions = self.opts.precisions or auto_precisions(self.device)  # (run_bench gives them normalised)
        candidates = [(r, p) for r in LOCAL_BACKENDS if r in self.opts.backends for p in precisions
                      if supported(backend_format(r), p) and p in servable_by_auto(self.device)]  # as `repo` does
        rows = self.record.rows if self.record is not None else []
        timings: dict[tuple[str, str], dict[str, float]] = {}
        for row in rows:
            pair = (row["backend"], row["precision"])
            if row["stage"] == "model" and row.get("status") == "ok" and pair in candidates and row["clips_per_s"]:
                timings.setdefault(pair, {})[str(row["batch"])] = 1000.0 / row["clips_per_s"]
        return candidates, timings

    @property
    def served_runtime(self) -> str:
        """The runtime the served model runs (:attr:`choice`)."""
        return self.choice.runtime

    @property
    def served_precision(self) -> str:
        """The precision the served model runs (:attr:`choice`)."""
        return self.choice.precision

    def export(self, *needs: tuple[str, str], rewrites: str = suites.REWRITTEN) -> Path:
        """The bench export with ``needs``: made with the rewrites `sfdeploy export` applies on this
        device (what is served), or, ``rewrites="none"``, the plain graph in a folder beside it."""
        folder = self.export_dir if rewrites == suites.REWRITTEN else \
            self.export_dir.with_name(f"{self.export_dir.name}-plain")
        return ensure_bench_export(self.model, list(needs), self.device, folder, rewrites)

    def hold(self, key: Any, factory: Callable[[], Any], close: Callable[[Any], None] = lambda _: None) -> Any:
        """The resource for ``key``, made by ``factory`` unless it is the one held already. Only
        one is held: making another first closes the last (and returns its GPU memory)."""
        if self._held is not None and self._held[0] == key:
            return self._held[1]
        self.release()
        resource = factory()
        self._held = (key, resource, close)
        return resource

    def release(self) -> None:
        """Close what is held (between stages: the next one's rows get the GPU memory)."""
        if self._held is not None:
            _, resource, close = self._held
            self._held = None
            close(resource)
            del resource
        if self.device.is_cuda:
            torch.cuda.empty_cache()

    def local_target(self, backend: str, precision: str, device: Device, rewrites: str = suites.REWRITTEN
                     ) -> ModelTarget:
        """The bench export's artifact for ``backend`` and ``precision`` (made if missing), on ``device``."""
        export_dir = self.export((backend_format(backend), precision), rewrites=rewrites)
        return ModelTarget(backend=backend, export_dir=export_dir, precision=precision, device=device)

    def served_target(self, protocol: str, *, shm: bool | str = False, server_decode: bool = False) -> ModelTarget:
        """The served model of :meth:`server`, over ``protocol``; ``shm``: how the input travels
        (:class:`sfdeploy.transport.SharedMemory` or its name; CUDA shared memory on this run's GPU)."""
        server = self.server()
        return ModelTarget(backend=SERVED, urls=(server.url(protocol),), protocol=protocol, model=SERVED_MODEL,
                           shm=shm, server_decode=server_decode, device=self.device)

    def local(self, backend: str, precision: str, device: Device, rewrites: str = suites.REWRITTEN,
              cuda_graphs: bool = True) -> Any:
        """An in-process predictor (the runtime's own loader, as ``sfdeploy infer`` uses it); for the
        plain TorchScript rows, the plain graph run as loaded: no rewrites, no CUDA graphs, no CPU
        optimisation (what sfdeploy ran before them, measured beside what it runs now); without
        ``cuda_graphs``, the runtime as it runs but for its CUDA graphs (what they give)."""
        from sfdeploy.artifacts import Manifest, artifact_key
        from sfdeploy.runtime import predictor_class

        target = self.local_target(backend, precision, device, rewrites)
        plain = target.backend == "torchscript" and rewrites == suites.PLAIN
        if plain or not cuda_graphs:
            fmt = backend_format(backend)
            path = Manifest.read(target.export_dir).artifact_path(target.export_dir, artifact_key(fmt, precision))
            factory = lambda: predictor_class(fmt)(path, device=device, cuda_graphs=False,  # noqa: E731
                                                   optimize=not plain)
        else:
            factory = target.open
        return self.hold((backend, precision, device, rewrites, cuda_graphs), factory, lambda p: p.close())

    def ort_device(self) -> tuple[Device | str, str]:
        """Where ONNX Runtime runs rows asked for on ``self.device`` (``""`` if not there), and why not."""
        from sfdeploy.runtime.placement import backend_device

        try:
            where = backend_device("onnxruntime", self.device)
        except EnvironmentProblem as exc:
            return "", exc.message
        if where != self.device:
            return "", f"onnxruntime cannot run on {self.device} here (install onnxruntime-gpu: sfdeploy[gpu])"
        return where, ""

    def server(self) -> Any:
        """tritonserver on free 127.0.0.1 ports, serving what `sfdeploy repo` writes by default."""
        if self._server is None:
            from sfdeploy.serving.ports import free_port
            from sfdeploy.serving.repo import RepoOptions, write_repository
            from sfdeploy.serving.server import TritonServer

            export_dir = self.export((backend_format(self.served_runtime), self.served_precision))
            repo = self.work / "repo"
            batches = [*self.opts.batch_sizes, self.opts.triton_batch]
            # the runtime and precision `repo` picks by default here: the configuration users get
            write_repository(export_dir, RepoOptions(repo=repo, name=SERVED_MODEL, max_batch=max(batches),
                                                     runtime=self.served_runtime, precision=self.served_precision,
                                                     device=self.device, native=False, require_parity=False,
                                                     instances=self.opts.instances,
                                                     decode="gpu" if self.server_gpu_decoding()[0] else "auto"))
            self._server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(),
                                        metrics_port=free_port()).start()
            self._stack.callback(self._server.stop)
        return self._server

    def server_gpu_decoding(self) -> tuple[bool, str]:
        """Whether the bench's server decodes on its GPU (a CUDA bench with a GPU decoder here: the
        server runs on this machine; the bench export has no fidelity record, so ``--decode gpu``,
        and the CPU rows ask for the CPU per request), and why not."""
        if not self.device.is_cuda:
            return False, f"GPU decoding on the server is measured with --device cuda (this run: {self.device})"
        from sfdeploy.decode.gpu.select import probe_backends

        statuses = probe_backends()
        if not any(s.available for s in statuses):
            return False, "no GPU video decoder here (" + "; ".join(f"{s.name}: {s.detail}" for s in statuses) + ")"
        return True, ""

    def videos(self) -> list[Path]:
        """The end-to-end stage's videos: ``--videos``, or a synthetic set made once in the work folder."""
        from sfdeploy.data.probe import VIDEO_EXTENSIONS

        opts = self.opts
        if opts.videos:
            paths = sorted(p for p in Path(opts.videos).rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
            if not paths:
                raise InputError("no videos in --videos", path=opts.videos, fix="pass a folder of videos")
            return paths[: opts.e2e_videos]
        import json

        from sfdeploy.data.synth import HINTS_JSON, SynthOptions, synthesize

        spec, folder = self.model.spec, self.work / "videos"
        size = max(96, spec.short_side + spec.short_side // 4)  # a little larger than the resize target
        synth = SynthOptions(classes=4, per_class=max(1, -(-opts.e2e_videos // 4)), frames=max(48, spec.min_frames),
                             size=size + size % 2)
        meta = folder / HINTS_JSON  # written last: its presence means the set is complete
        made = json.loads(meta.read_text()) if meta.is_file() else {}
        if any(made.get(k) != getattr(synth, k) for k in ("per_class", "frames", "size", "seed")):
            shutil.rmtree(folder, ignore_errors=True)
            synthesize(folder, synth, show_progress=False)
        return sorted(folder.rglob("*.mp4"))[: opts.e2e_videos]

    def close(self) -> None:
        """Release what is held and stop the server, if one was started."""
        self.release()
        self._stack.close()
