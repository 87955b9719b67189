"""SlowFast R50 4x16 through `sfdeploy export` and `sfdeploy repo` on this machine, as a user runs
them: every format and precision through the parity gate (bf16 included where the CPU has it),
timed by the export, and the runtime `repo --runtime auto --precision auto` then serves, with its
reason. The weights are random but non-degenerate (a peaked softmax, so the gate's verdicts mean
something; R50 does not train on 2 CPU cores in minutes): speed and agreement do not depend on
what the weights learnt.

    python benchmarks/r50_export.py --out benchmarks/results/cpu-2c-r50-export-<date>.json

Writes the record (the manifest's parity verdicts, timings, host, and the served choice) to --out;
the work (synthetic videos, DATA, WORK, EXPORT, the repository) stays in --work for inspection.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path


def sfdeploy(*args: str) -> subprocess.CompletedProcess:
    """``sfdeploy ARGS`` as a user runs it (its own process); its console goes to ours."""
    return subprocess.run([sys.executable, "-m", "sfdeploy", *args], check=True, text=True, stdout=subprocess.PIPE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the record (JSON)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sfdeploy-r50-export"), help="working folder")
    parser.add_argument("--formats", default="torchscript,onnx,torch_export,aoti")
    parser.add_argument("--parity-videos", default="8")
    args = parser.parse_args()

    from sfdeploy.artifacts import Manifest
    from sfdeploy.bench.model import write_random_work
    from sfdeploy.data.layout import DATASET_JSON
    from sfdeploy.serving.config import parse_config

    videos, data, work, export, repo = (args.work / name for name in ("videos", "DATA", "WORK", "EXPORT", "REPO"))
    if not (data / DATASET_JSON).is_file():
        sfdeploy("data", "synth", str(videos), "--classes", "4", "--per-class", "4", "--frames", "72", "--size", "128")
        sfdeploy("data", "prepare", str(videos), "--out", str(data), "--preset", "slowfast_r50_4x16")
    write_random_work("slowfast_r50_4x16", data, work)
    sfdeploy("export", str(work), "--out", str(export), "--device", "cpu", "--formats", args.formats,
             "--parity-videos", args.parity_videos)
    sfdeploy("repo", str(export), "--repo", str(repo), "--device", "cpu", "--no-native", "--no-video")
    manifest = Manifest.read(export)
    served = parse_config((repo / "slowfast" / "config.pbtxt").read_text()).parameters
    record = {
        "date": date.today().isoformat(), "model": "slowfast_r50_4x16 (random, non-degenerate weights), 4 classes",
        "host": manifest.host, "timings": manifest.timings,
        "parity": {key: {k: r[k] for k in ("precision", "device", "runtime", "max_abs_diff", "top1_agreement",
                                            "passed", "criterion")}
                   for key, r in manifest.parity["artifacts"].items()},
        "parity_videos": len(manifest.parity["videos"]),
        "artifacts": {key: {"file": a.file, "size_bytes": a.size_bytes, "info": a.info, "loads_in": a.loads_in}
                      for key, a in manifest.artifacts.items()},
        "served": {name: served[name].string_value for name in ("runtime", "precision", "artifact",
                                                                 "chosen_because")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["served"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
