"""What ``--engine ray`` costs on one machine: videos/s of ``sfdeploy infer`` with ``--engine ray`` vs
``--engine local`` on the same inputs, with the same model and batch size.

::

    python benchmarks/ray_vs_local.py                      # the tiny demo model, 640 and 1920 videos
    python benchmarks/ray_vs_local.py --export EXPORT --videos DIR --copies 1

Each run is the real command in a fresh process, timed from start to exit (imports, model load,
Ray start: what a user waits for), and its rows are checked against the local engine's. Three ways
are timed, interleaved and repeated (the median is reported; on a shared machine the spread is
large, so the load average is recorded too):

* ``local``: ``--engine local`` (decode processes + the model in the command's process);
* ``ray``: ``--engine ray`` starting its own Ray (what a single-machine user gets);
* ``ray, running cluster``: ``--engine ray --ray-address`` of a Ray already running on this
  machine (what a cluster user gets: the cluster is up before the job).

Writes ``benchmarks/results/ray-vs-local-<device>-<date>.{json,md}``. Without ``--export`` it uses
(or makes, with ``sfdeploy demo``, ~3 minutes) the demo's slowfast_tiny export and 64 videos,
hard-linked ``--copies`` times.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from sfdeploy.artifacts import MANIFEST_FILE
from sfdeploy.data.probe import VIDEO_EXTENSIONS

REPO = Path(__file__).resolve().parents[1]
GOAL = 0.8  # ray / local videos/s on one machine


def _inputs(videos: Path, copies: int, scratch: Path) -> Path:
    """``copies`` hard-linked copies of every video under ``videos`` (distinct paths, no extra disk)."""
    root = scratch / f"videos-x{copies}"
    for copy in range(copies):
        for video in sorted(p for p in videos.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS):
            target = root / f"copy{copy}" / video.relative_to(videos)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.link(video, target)
    return root


def _run(inputs: Path, export: Path, out: Path, args: argparse.Namespace, engine: list[str], env: dict) -> dict:
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "sfdeploy", "-q", "infer", str(inputs), "--backend", args.backend,
               "--export", str(export), "--batch-size", str(args.batch_size), "--out", str(out), *engine]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return {"command_s": round(seconds, 2), "videos": summary["ok"] + summary["failed"],
            "videos_per_s": round((summary["ok"] + summary["failed"]) / seconds, 2),
            "in_run_s": summary["wall_time_s"], "load_average_1m": round(load, 2),
            "rows": {r["path"]: (r["status"], r["label"]) for r in csv.DictReader(out.open())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=REPO / "sfdeploy-demo",
                        help="an `sfdeploy demo` workdir (made if missing) for the export and videos")
    parser.add_argument("--export", type=Path, help="export folder [demo's]")
    parser.add_argument("--videos", type=Path, help="folder of videos [demo's 64 synthetic ones]")
    parser.add_argument("--copies", default="10,30", help="input sizes, as copies of --videos (comma list)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torchscript"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, help="results .json [benchmarks/results/ray-vs-local-<device>-<date>]")
    args = parser.parse_args()

    import ray

    from sfdeploy.bench.measure import device_info, device_slug

    if args.export is None or args.videos is None:
        if not (args.demo_dir / "export" / MANIFEST_FILE).is_file():
            subprocess.run([sys.executable, "-m", "sfdeploy", "demo", "--workdir", str(args.demo_dir)], check=True)
    export, videos = args.export or args.demo_dir / "export", args.videos or args.demo_dir / "videos"
    info = device_info("cpu")
    info["packages"].update({"ray": ray.__version__, "pyarrow": __import__("pyarrow").__version__})
    modes = ("local", "ray", "ray, running cluster")
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sfdeploy-raybench-") as tmp:
        scratch = Path(tmp)
        # The running cluster has the CPUs a Ray started by the command gets: a decode task per
        # core beside one model actor (1 CPU), so both Ray modes run the same stages.
        cluster = ray.init(num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False,
                           logging_level=logging.WARNING)
        engines = {"local": [], "ray": ["--engine", "ray"],
                   "ray, running cluster": ["--engine", "ray", "--ray-address", cluster.address_info["address"]]}
        own_ray = {"RAY_ADDRESS": ""}  # "ray" starts its own even though this process runs one
        try:
            for copies in (int(c) for c in args.copies.split(",")):
                inputs = _inputs(videos, copies, scratch)
                for repeat in range(args.repeats):
                    order = modes[repeat % 3:] + modes[:repeat % 3]  # rotate, so no mode always runs first
                    for mode in order:
                        run = _run(inputs, export, scratch / "p.csv", args, engines[mode],
                                   own_ray if mode == "ray" else {})
                        print(f"{copies} copies, repeat {repeat + 1}, {mode}: {run['videos_per_s']} videos/s "
                              f"({run['command_s']} s, load {run['load_average_1m']})", file=sys.stderr)
                        runs.append({"copies": copies, "repeat": repeat, "mode": mode, **run})
        finally:
            ray.shutdown()

    reference = {r["copies"]: r["rows"] for r in runs if r["mode"] == "local"}
    for run in runs:
        run["rows_equal_local"] = run.pop("rows") == reference[run["copies"]]
    sizes = sorted({r["copies"] for r in runs})
    summary = []
    for copies in sizes:
        median = {m: statistics.median(r["videos_per_s"] for r in runs if r["copies"] == copies and r["mode"] == m)
                  for m in modes}
        videos = next(r["videos"] for r in runs if r["copies"] == copies)
        summary.append({"videos": videos, "median_videos_per_s": median,
                        "ray_vs_local": round(median["ray"] / median["local"], 2),
                        "running_cluster_vs_local": round(median["ray, running cluster"] / median["local"], 2)})
    fit = _fit(runs, modes) if len(sizes) > 1 else None
    results = {"schema": 1, "date": date.today().isoformat(), "benchmark": "sfdeploy infer --engine ray vs local",
               "device_info": info, "goal": f"ray >= {GOAL}x local videos/s on one machine",
               "settings": {"backend": args.backend, "batch_size": args.batch_size, "repeats": args.repeats,
                            "export": str(export), "videos": str(videos), "copies": sizes,
                            "timing": "whole command in a fresh process; median of repeats"},
               "summary": summary, "fit": fit, "runs": runs}
    out = args.out or REPO / "benchmarks" / "results" / f"ray-vs-local-{device_slug(info)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(results))
    print(out)


def _fit(runs: list[dict], modes: tuple[str, ...]) -> dict:
    """Seconds = start-up + videos / rate, through the medians of the smallest and largest runs:
    the rate each engine keeps up once running, what it costs to start, and from how many videos
    on ``ray`` reaches the goal."""
    sizes = sorted({r["videos"] for r in runs})
    small, large = sizes[0], sizes[-1]
    fit = {}
    for mode in modes:
        t_small, t_large = (statistics.median(r["command_s"] for r in runs if r["videos"] == n and r["mode"] == mode)
                            for n in (small, large))
        rate = (large - small) / (t_large - t_small)
        fit[mode] = {"videos_per_s_once_running": round(rate, 1), "start_up_s": round(t_small - small / rate, 1)}
    local = fit["local"]
    for mode in modes[1:]:
        ray = fit[mode]
        # videos n where (a_l + n/r_l) / (a_r + n/r_r) = GOAL
        slope = 1 / local["videos_per_s_once_running"] - GOAL / ray["videos_per_s_once_running"]
        gap = GOAL * ray["start_up_s"] - local["start_up_s"]
        ray["videos_for_goal"] = round(gap / slope) if slope > 0 else None
    return fit


def _markdown(results: dict) -> str:
    info = results["device_info"]
    lines = [f"# sfdeploy infer: --engine ray vs --engine local on {info['cpu']} ({info['cpu_cores']} cores)", "",
             f"{results['date']}, ray {info['packages']['ray']}, onnxruntime {info['packages'].get('onnxruntime')}, "
             f"torch {info['packages'].get('torch')}; backend {results['settings']['backend']}, batch "
             f"{results['settings']['batch_size']}; {results['settings']['timing']} "
             f"({results['settings']['repeats']} repeats, interleaved). Goal: {results['goal']}.", "",
             "| videos | local videos/s | ray videos/s | ray, running cluster videos/s | ray / local | "
             "running cluster / local |", "| --- | --- | --- | --- | --- | --- |"]
    for row in results["summary"]:
        m = row["median_videos_per_s"]
        lines.append(f"| {row['videos']} | {m['local']:.1f} | {m['ray']:.1f} | {m['ray, running cluster']:.1f} | "
                     f"{row['ray_vs_local']:.2f}x | {row['running_cluster_vs_local']:.2f}x |")
    if results.get("fit"):
        lines += ["", "Seconds = start-up + videos / rate (through the medians of both sizes):", "",
                  "| mode | videos/s once running | start-up s | videos for ray >= 0.8x local |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {mode} | {f['videos_per_s_once_running']} | {f['start_up_s']} | {f.get('videos_for_goal', '-')} |"
                  for mode, f in results["fit"].items()]
    lines += ["", "Every run, in order:", "",
              "| videos | repeat | mode | seconds | videos/s | load (1 min) | rows = local |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['videos']} | {r['repeat'] + 1} | {r['mode']} | {r['command_s']} | {r['videos_per_s']} | "
              f"{r['load_average_1m']} | {r['rows_equal_local']} |" for r in results["runs"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
