"""``infer --engine ray`` on a real local Ray: the same rows as the local engine, and no row lost or
doubled when a Ray worker or the driver is killed.

The first test runs the README's command as a user would (Ray started by the command itself);
the others join one Ray started for the module (``ray.init(num_cpus=2)``), as a cluster user would.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from sfdeploy.cli import cli
from sfdeploy.errors import EnvironmentProblem, InputError
from sfdeploy.scale.cluster import PROBE_S, Cluster, check_address, check_placement
from sfdeploy.target import ModelTarget

from badvideos import not_a_video, truncated, zero_byte
from conftest import csv_rows, link_copies, run_cli, running_triton, wait_for_rows


def _summary(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_same_rows_as_the_local_engine_and_broken_files_are_error_rows(tiny_export: Path, synth_root: Path,
                                                                       tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    failing = {zero_byte(broken / "empty.mp4"), not_a_video(broken / "notes.mp4"),
               truncated(broken / "cut.mp4", sorted(synth_root.rglob("*.mp4"))[0])}
    common = ["infer", str(synth_root), str(broken), "--backend", "onnxruntime", "--export", str(tiny_export)]
    local = run_cli(*common, "--out", str(tmp_path / "local.csv"), check=False)
    on_ray = run_cli(*common, "--engine", "ray", "--out", str(tmp_path / "ray.csv"), check=False)

    assert local.returncode == on_ray.returncode == 1, on_ray.stderr[-3000:]
    same = {"wall_time_s": 0, "out": "-"}
    assert _summary(on_ray) | same == _summary(local) | same == {"ok": 64, "failed": 3, "skipped": 0, **same}
    expected = {str(p) for p in synth_root.rglob("*.mp4")} | {str(p) for p in failing}
    here, there = csv_rows(tmp_path / "local.csv"), csv_rows(tmp_path / "ray.csv")
    assert len(there) == len({r["path"] for r in there}) == len(expected) == 67  # every input exactly once
    assert {r["path"] for r in there} == expected
    by_path = {r["path"]: r for r in here}
    for row in there:
        mine = by_path[row["path"]]
        assert (row["status"], row["label"], row["error"]) == (mine["status"], mine["label"], mine["error"])
        ray_top, local_top = json.loads(row["top_k"] or "[]"), json.loads(mine["top_k"] or "[]")
        assert [label for label, _ in ray_top] == [label for label, _ in local_top]
        assert all(abs(a[1] - b[1]) <= 1e-6 for a, b in zip(ray_top, local_top, strict=True))
    assert {r["path"] for r in there if r["status"] == "error"} == {str(p) for p in failing}
    assert all(f"failed: {p}" in on_ray.stderr for p in failing)
    assert "object store" in on_ray.stderr  # the sizing it ran with is printed


def test_a_cpu_model_actor_runs_two_threads_that_do_not_spin(tiny_export: Path) -> None:
    """The model actor's ONNX Runtime session: one reserved CPU, two threads that wait without
    spinning (so they leave the cores to the decode tasks); --actor-cpus N gives N of both."""
    from sfdeploy.artifacts import Manifest
    from sfdeploy.scale.engine import RayOptions
    from sfdeploy.scale.stages import PredictStage

    spec_json = Manifest.read(tiny_export).clip_spec.to_json()
    local = ModelTarget(export_dir=tiny_export)
    for options, cpus, threads in ((RayOptions(local), 1.0, 2), (RayOptions(local, actor_cpus=3), 3, 3),
                                   (RayOptions(ModelTarget()), 0.25, 2)):
        assert (options.model_cpus(), options.model_threads()) == (cpus, threads)
        if options.target.local:
            stage = PredictStage(target=options.target, spec_json=spec_json, threads=options.model_threads())
            session = stage.predictors[0].session.get_session_options()
            assert session.intra_op_num_threads == threads
            assert session.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_model_actors_that_cannot_be_placed_fail_at_once_on_a_ray_of_fixed_size(
        caplog: pytest.LogCaptureFixture) -> None:
    """--device cuda on a Ray without GPUs would wait for ever: an error naming the fix, unless the
    cluster was joined (an autoscaler may add the nodes): then a warning."""
    here = Cluster(address="local", started_here=True, owned=True, cpus=3, gpus=0, object_store_bytes=2**30)
    with pytest.raises(EnvironmentProblem, match=r"need 2 CPU\(s\) and 1 GPU\(s\).* 0 GPU") as caught:
        check_placement(here, actors=1, actor_cpus=1, actor_gpus=1)
    assert "--device cpu" in caught.value.fix
    check_placement(here, actors=1, actor_cpus=2, actor_gpus=0)  # the actor and a decode task fit
    logging.getLogger("sfdeploy").addHandler(caplog.handler)
    try:
        check_placement(replace(here, started_here=False), actors=2, actor_cpus=1, actor_gpus=1)
    finally:
        logging.getLogger("sfdeploy").removeHandler(caplog.handler)
    assert "waiting for the cluster to grow" in caplog.text


def test_an_address_where_no_head_answers_fails_at_once_naming_it() -> None:
    """Ray alone retries for ~20 s, then names its own node IP rather than the address typed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"  # bound, never listening: nothing answers
        started = time.monotonic()
        with pytest.raises(EnvironmentProblem, match=f"no Ray head answers at {address}") as caught:
            check_address(address)
    assert time.monotonic() - started < PROBE_S + 1 and "HOST:PORT" in caught.value.fix
    with pytest.raises(InputError, match="is not HOST:PORT"):
        check_address("head-without-port")


def test_only_the_harmless_ray_line_is_kept_off_stderr() -> None:
    """Ray's C++ logger writes straight to fd 2, after a progress bar's text on the same terminal
    line: that one line goes, the bar's text, Ray's other errors and Python's own lines stay."""
    script = (
        "import os, sys\n"
        "from sfdeploy.scale.console import without_harmless_ray_line\n"
        "with without_harmless_ray_line():\n"
        "    sys.stderr.write('\\rinfer 0/64 [00:00<?]'); sys.stderr.flush()\n"
        "    os.write(2, b\"[2026-12-04 17:10:18,737 E 19398 19398] core_worker.cc:2465: Actor with class name: "
        "'MapWorker(MapBatches(PredictStage))' has constructor arguments in the object store and max_restarts > 0. "
        "See ...\\n\")\n"
        "    os.write(2, b'[2026-12-04 17:10:19,001 E 19398 19398] core_worker.cc:99: something else\\n')\n"
        "    print('a python line', file=sys.stderr)\n"
        "print('after', file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)  # bytes: keep the \r
    assert result.returncode == 0, result.stderr
    assert result.stderr == (b"\rinfer 0/64 [00:00<?][2026-12-04 17:10:19,001 E 19398 19398] core_worker.cc:99: "
                             b"something else\na python line\nafter\n")


@pytest.fixture(scope="module")
def ray_cluster() -> dict:
    """One local Ray for the tests below: what `ray start --head` gives a cluster user."""
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield context.address_info
    ray.shutdown()


@pytest.fixture(scope="module")
def many_videos(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """128 inputs (hard links to the 64 synthetic videos): a run long enough to kill midway."""
    return link_copies(synth_root, tmp_path_factory.mktemp("many"), 2)


def _start(inputs: Path, export: Path | None, address: str, out: Path, *extra: str) -> subprocess.Popen:
    """`sfdeploy infer --engine ray` joined to ``address`` (onnxruntime on ``export``, or as ``extra`` says)."""
    model = ["--backend", "onnxruntime", "--export", str(export)] if export else []
    command = [sys.executable, "-m", "sfdeploy", "infer", str(inputs), "--engine", "ray", "--ray-address", address,
               *model, "--batch-size", "4", "--out", str(out), *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ray_workers(session_dir: str, title: str) -> list[int]:
    """PIDs of this cluster's worker processes whose title starts with ``title`` (children of its raylet)."""
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    raylets = {p for p in pids if "raylet/raylet" in _cmdline(p) and session_dir in _cmdline(p)}
    found = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if parent in raylets and _cmdline(pid).startswith(title):
            found.append(pid)
    return found


def test_a_killed_ray_worker_costs_no_row(ray_cluster: dict, tiny_export: Path, many_videos: Path,
                                          tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    proc = _start(many_videos, tiny_export, ray_cluster["address"], out)
    wait_for_rows(out, proc, 16)
    titles = ("ray::MapWorker(MapBatches(PredictStage))", "ray::MapBatches(decode_videos)")  # model actor, decode task
    deadline, victims = time.monotonic() + 60, {}
    while len(victims) < len(titles) and time.monotonic() < deadline and proc.poll() is None:
        for title in titles:
            victims.setdefault(title, next(iter(_ray_workers(ray_cluster["session_dir"], title)), None))
        victims = {title: pid for title, pid in victims.items() if pid is not None}
        time.sleep(0.05)
    assert set(victims) == set(titles), f"found only {victims} while the run was going"
    for pid in victims.values():
        os.kill(pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    rows = csv_rows(out)
    assert len(rows) == len({r["path"] for r in rows}) == 128  # none lost, none twice
    assert all(r["status"] == "ok" for r in rows)
    assert json.loads(stdout.strip().splitlines()[-1])["ok"] == 128  # stdout is still just the summary


def test_a_killed_driver_resumes_with_every_input_exactly_once(ray_cluster: dict, tiny_export: Path,
                                                               many_videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    proc = _start(many_videos, tiny_export, ray_cluster["address"], out)
    wait_for_rows(out, proc, 16)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(csv_rows(out))
    assert 16 <= written < 128
    resumed = _start(many_videos, tiny_export, ray_cluster["address"], out, "--resume")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    paths = [r["path"] for r in csv_rows(out)]
    assert len(paths) == len(set(paths)) == 128
    assert f"{written} already in" in stderr
    assert json.loads(stdout.strip().splitlines()[-1])["skipped"] == written


def test_inputs_from_lists_and_parquet_output(ray_cluster: dict, tiny_export: Path, synth_root: Path,
                                              tmp_path: Path) -> None:
    import pyarrow as pa

    videos = [str(p) for p in sorted(synth_root.rglob("*.mp4"))[:7]]
    missing = str(tmp_path / "gone.mp4")
    (tmp_path / "a.txt").write_text(f"# part one\n{videos[0]}\n\n{videos[1]}\n")
    (tmp_path / "b.csv").write_text(f"label,path\nx,{videos[2]}\ny,{videos[3]}\n")
    pq.write_table(pa.table({"path": [videos[4], missing]}), tmp_path / "c.parquet")
    out = tmp_path / "p.parquet"
    command = ["infer", "--inputs-from", str(tmp_path / "a.txt"), "--inputs-from", str(tmp_path / "b.csv"),
               "--inputs-from", str(tmp_path / "c.parquet"), videos[5], "--engine", "ray", "--ray-address",
               ray_cluster["address"], "--backend", "torchscript", "--export", str(tiny_export), "--out", str(out)]
    first = CliRunner().invoke(cli, command)
    assert first.exit_code == 1, first.output  # the missing path is an error row
    table = pq.read_table(out).to_pylist()
    assert sorted(r["path"] for r in table) == sorted([*videos[:6], missing])
    assert [r["error"] for r in table if r["status"] == "error"] == ["file not found; check the path"]
    assert all(r["label"] and r["top_k"][0]["label"] == r["label"] for r in table if r["status"] == "ok")

    resumed = CliRunner().invoke(cli, [*command, videos[6], "--resume"])
    assert resumed.exit_code == 0, resumed.output
    paths = [r["path"] for r in pq.read_table(out).to_pylist()]
    assert sorted(paths) == sorted([*videos, missing])  # the earlier rows kept, the new one added once
    assert not (tmp_path / "p.parquet.partial.jsonl").exists()


def _executed(server) -> int:
    """Videos the server has run through the model so far (Triton's statistics extension)."""
    from sfdeploy.runtime.triton import TritonPredictor

    predictor = TritonPredictor(server.http_url, model="slowfast")
    try:
        stats = predictor.statistics()
    finally:
        predictor.close()
    return sum(int(b["batch_size"]) * int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", []))


def test_triton_urls_share_the_work_and_a_dead_server_keeps_the_rows(ray_cluster: dict, triton, tiny_repo: Path,
                                                                     synth_root: Path, tmp_path: Path) -> None:
    before, out = _executed(triton), tmp_path / "p.csv"
    served = ["--backend", "triton", "--concurrency", "2"]
    with running_triton(tiny_repo, ["slowfast"]) as second:
        proc = _start(synth_root, None, ray_cluster["address"], out, *served, "--url", triton.http_url,
                      "--url", second.http_url)
        wait_for_rows(out, proc, 8)
        deadline = time.monotonic() + 120
        while _executed(second) == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # each model actor turns to the second server for its second batch
        took = _executed(second)
        os.killpg(second.process.pid, signal.SIGKILL)  # the server and its backend stubs
        _, stderr = proc.communicate(timeout=300)
    assert took > 0 and _executed(triton) > before  # both servers took batches
    assert proc.returncode == 1
    assert "rows were written before it" in stderr and "--resume" in stderr and str(out) in stderr
    written = csv_rows(out)
    assert 8 <= len(written) < 64 and all(r["status"] == "ok" and r["label"] for r in written)

    resumed = _start(synth_root, None, ray_cluster["address"], out, *served, "--url", triton.http_url, "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    paths = [r["path"] for r in csv_rows(out)]
    assert len(paths) == len(set(paths)) == 64
