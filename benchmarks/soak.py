"""Load soak of server-side decoding: ``sfdeploy serve``'s server under many concurrent
``<name>_video`` requests, 1% of them corrupt, on loopback, bounded in requests and time.

::

    python benchmarks/soak.py                                   # the demo's repository and videos
    python benchmarks/soak.py --repo REPO --videos DIR --requests 10000 --concurrency 64 128

Starts the server (:class:`sfdeploy.serving.server.TritonServer`, on free 127.0.0.1 ports, as
``sfdeploy serve`` does: guard, limits, cleanup), runs :func:`sfdeploy.bench.soak.run_soak` once per
``--concurrency``, and writes ``benchmarks/results/soak-<device>-<date>.json``: per run the
requests, corrupt share, lost, wrong and refused counts, p50/p90/p99 latency, the server's
process-tree memory before and after, and where a request's time went on the server (queue vs
compute, per model). Without ``--repo`` it uses the repository and videos of an ``sfdeploy demo``
workdir (made if missing, ~3 minutes).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sfdeploy.bench.measure import device_info, device_slug
from sfdeploy.bench.soak import SoakOptions, run_soak
from sfdeploy.data.probe import VIDEO_EXTENSIONS
from sfdeploy.fsutil import atomic_write_text
from sfdeploy.serving.ports import free_port
from sfdeploy.serving.server import TritonServer

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="slowfast", help="requests go to <model>_video")
    parser.add_argument("--repo", type=Path, help="the model repository to serve [the demo's]")
    parser.add_argument("--videos", type=Path, help="the good videos [the demo's 64 synthetic ones]")
    parser.add_argument("--demo-dir", type=Path, default=REPO / "sfdeploy-demo",
                        help="without --repo: an `sfdeploy demo` workdir, made if missing")
    parser.add_argument("--requests", type=int, default=2000, help="requests per run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64], help="one run per value")
    parser.add_argument("--corrupt-share", type=float, default=0.01)
    parser.add_argument("--protocol", default="http", choices=["http", "grpc"])
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds per run; the rest is not sent")
    parser.add_argument("--note", default="", help="what the record should say about the machine")
    parser.add_argument("--out", type=Path, help="record [benchmarks/results/soak-<device>-<date>.json]")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="soak: %(message)s")

    if args.repo is None and not (args.demo_dir / "model_repository").is_dir():
        from sfdeploy.demo import run_demo

        run_demo(args.demo_dir, bench=False)
    repo = args.repo or args.demo_dir / "model_repository"
    videos = sorted(p for p in (args.videos or args.demo_dir / "videos").rglob("*")
                    if p.suffix.lower() in VIDEO_EXTENSIONS)
    info = device_info("cpu")
    out = args.out or REPO / "benchmarks" / "results" / f"soak-{device_slug(info)}.json"
    record = {"what": "load soak of <name>_video (benchmarks/soak.py)", "device": info, "note": args.note,
              "repo": str(repo), "runs": []}
    with TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                      models=[args.model, f"{args.model}_video"]) as server:
        record["server"] = {"request_limits_mb": {m: round(v / 2**20, 1) for m, v in server.limits.items()},
                            "idle_timeout_s": server.idle_timeout_s, "max_connections": server.max_connections}
        for concurrency in args.concurrency:
            opts = SoakOptions(requests=args.requests, concurrency=concurrency, corrupt_share=args.corrupt_share,
                               protocol=args.protocol, model=args.model, time_limit_s=args.time_limit)
            logging.info("%d requests at concurrency %d (%s)", opts.requests, concurrency, opts.protocol)
            run = run_soak(server, videos, opts)
            record["runs"].append(run)
            logging.info("%s", json.dumps({k: run[k] for k in ("outcomes", "latency_s", "server_memory_mb")}))
            atomic_write_text(out, json.dumps(record, indent=2) + "\n")  # each run kept as it finishes
    print(out)


if __name__ == "__main__":
    main()
