"""Faults: killed processes lose no finished work, and the server holds up under load.

(SIGKILL during finetune -> --resume: test_finetune.py::test_killed_run_completes_with_resume.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from sfdeploy.runtime.triton import TritonPredictor

from conftest import csv_rows, link_copies, running_triton, wait_for_rows


@pytest.fixture(scope="module")
def many_videos(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """192 inputs (hard links to the 64 synthetic videos), enough for a run to be killed midway."""
    return link_copies(synth_root, tmp_path_factory.mktemp("many"), 3)


def _start_infer(inputs: Path, url: str, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "sfdeploy", "infer", str(inputs), "--url", url, "--out", str(out),
               "--batch-size", "1", "--concurrency", "1"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_infer_resumes_with_every_input_exactly_once(triton, many_videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    proc = _start_infer(many_videos, triton.http_url, out)
    wait_for_rows(out, proc, 20)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(csv_rows(out))
    assert 20 <= written < 192
    result = subprocess.run([sys.executable, "-m", "sfdeploy", "infer", str(many_videos), "--url", triton.http_url,
                             "--out", str(out), "--resume"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = csv_rows(out)
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)) == 192  # each input once: none lost, none twice
    assert all(row["status"] == "ok" for row in rows)
    # The resumed run skipped exactly the rows already written and classified only the rest.
    assert f"{192 - written} classified, 0 failed, {written} already in {out}" in result.stderr


def test_server_killed_during_infer_keeps_the_finished_rows(tiny_repo: Path, many_videos: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    with running_triton(tiny_repo, ["slowfast"]) as server:
        proc = _start_infer(many_videos, server.http_url, out)
        wait_for_rows(out, proc, 20)
        os.killpg(server.process.pid, signal.SIGKILL)  # the server and its backend stubs
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "inference on" in stderr and "rows were written before it" in stderr
    assert "--resume" in stderr and str(out) in stderr
    rows = csv_rows(out)
    assert 20 <= len(rows) < 192
    assert all(row["status"] == "ok" and row["label"] for row in rows)  # only finished rows, all whole


def _rss_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process and of each of its children (the backend stubs), in MB, by
    command line (the stubs name their model), so a failure says which one grew."""
    pids = [pid, *map(int, subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split())]
    found: dict[str, float] = {}
    for p in pids:
        name = " ".join(Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace").split("\0")[:2])[-80:]
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                found[f"{p} {name}"] = int(line.split()[1]) / 1024
    return found


def test_load_2000_requests_at_concurrency_32(triton, tiny_export: Path) -> None:
    from sfdeploy.artifacts import Manifest

    spec = Manifest.read(tiny_export).clip_spec
    clip = np.random.default_rng(0).integers(0, 256, size=(1, *spec.input_shape), dtype=np.uint8)
    predictor = TritonPredictor(triton.http_url, model="slowfast")
    errors: list[BaseException] = []
    shapes: list[tuple] = []

    def client(requests: int) -> None:
        for _ in range(requests):
            try:
                shapes.append(predictor.predict(clip).shape)
            except BaseException as exc:  # counted: the test asserts there are none
                errors.append(exc)

    def burst(threads: int, per_thread: int) -> None:
        workers = [threading.Thread(target=client, args=(per_thread,)) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    try:
        # Warm-up. The backend's memory grows once per batch shape it meets (the runtime caches
        # kernels per shape: measured +80 MB when batch 32 first formed, flat after; the JIT
        # specialises again on a shape's later calls), and the dynamic batcher may form any size
        # from 1 to 32 under this load: run each size once, then the same load as measured, so
        # what is measured is growth that comes again with more requests: a leak.
        for size in range(1, 33):
            assert predictor.predict(np.repeat(clip, size, axis=0)).shape == (size, 4)
        burst(32, 63)
        assert errors == []
        before = _rss_mb(triton.process.pid)
        shapes.clear()
        burst(32, 63)  # 2,016 requests, 32 in flight
        after = _rss_mb(triton.process.pid)
    finally:
        predictor.close()
    assert errors == []
    assert len(shapes) == 2016 and set(shapes) == {(1, 4)}
    grew = {name: round(after[name] - before[name]) for name in before if name in after}
    assert sum(after.values()) - sum(before.values()) < 64, f"server memory grew by process (MB): {grew}"
