"""Where a record stands against the issue's targets, computed from whatever rows it has.

Honest by construction:

* the headline speed-up is the configuration ``sfdeploy repo`` serves by default (python backend,
  its default runtime and precision, named in the table), over the MMAction2 batch-1 baseline of
  the same run, never the best of all rows;
* the served model is compared with its runtime in this process at the same batch, the same
  concurrency (N threads for N requests in flight) and the same precision, each pair measured side
  by side by the same timing function;
* variants sfdeploy does not serve (eager, channels_last, torch.compile, CUDA graphs) are listed
  apart, as what could be had, not as what users get.

A target whose rows are not in the record yet says so (``missing``) instead of being left out.
"""

from __future__ import annotations

from typing import Any

from sfdeploy.artifacts import LOCAL_BACKENDS
from sfdeploy.bench.record import OK, ROW_KEY

MET, NOT_MET, REPORTED, MISSING = "met", "not met", "reported", "missing"


def _key(row: dict[str, Any]) -> dict[str, Any]:
    return {name: row[name] for name in ROW_KEY}


def _status(ok: bool | None) -> str:
    return REPORTED if ok is None else (MET if ok else NOT_MET)


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(rows, key=lambda r: r["clips_per_s"], default=None)


def _describe(row: dict[str, Any]) -> str:
    return f"{row['backend']} {row['precision']}, batch {row['batch']}, concurrency {row['concurrency']}"


def served_label(record: dict[str, Any]) -> str:
    served = record.get("served", {})
    return f"python backend running {served.get('runtime', '?')} {served.get('precision', '?')}"


def targets(record: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [r for r in record.get("rows", []) if r.get("status", OK) == OK]
    clips = [r for r in rows if r["kind"] == "clips" and r["clips_per_s"] > 0]
    gpu_full = record.get("profile") == "full" and record["device_info"]["device"].startswith("cuda")
    served = record.get("served", {})
    baseline = next((r for r in clips if r["stage"] == "model" and r["backend"] == "mmaction2"), None)
    out: list[dict[str, Any]] = []

    def add(target: str, measured: str, status: str, group: str = "targets", **rows_used: Any) -> None:
        out.append({"target": target, "measured": measured, "status": status, "group": group,
                    **{name: _key(r) for name, r in rows_used.items() if r is not None}})

    # 1. The headline: what `sfdeploy repo` serves by default, over MMAction2 batch 1.
    triton = [r for r in clips if r["stage"] == "triton" and r["backend"].startswith("triton")]
    headline = _best([r for r in triton if r["precision"] == served.get("precision")])
    name = f"Headline: `sfdeploy repo` default ({served_label(record)}) " + \
           (">= 30x the MMAction2 batch-1 baseline" if gpu_full else "over the MMAction2 batch-1 baseline")
    if headline and baseline:
        speedup = headline["clips_per_s"] / baseline["clips_per_s"]
        add(name, f"{speedup:.1f}x ({_describe(headline)}: {headline['clips_per_s']:.1f} vs "
                  f"{baseline['clips_per_s']:.1f} clips/s)", _status(speedup >= 30 if gpu_full else None),
            row=headline, reference=baseline)
    else:
        add(name, "needs the model stage (baseline) and the triton stage", MISSING)

    # 2. Model-only throughput of what sfdeploy runs in process.
    in_process = [r for r in clips if r["stage"] == "model" and r["backend"] in LOCAL_BACKENDS]
    if gpu_full:
        best = _best([r for r in in_process if r["precision"] == "fp16"])
        name = "Model-only fp16 >= 4,000 clips/s (TorchScript / ONNX Runtime in process)"
    else:
        best = _best(in_process)
        name = "Best model-only throughput (TorchScript / ONNX Runtime in process)"
    if best:
        add(name, f"{best['clips_per_s']:.1f} clips/s ({_describe(best)})",
            _status(best["clips_per_s"] >= 4000 if gpu_full else None), row=best)
    else:
        add(name, "needs the model stage", MISSING)

    # 3. Triton against in-process, same batch, same concurrency, same precision.
    for row in sorted(triton, key=lambda r: (r["backend"], r["concurrency"])):
        reference = next((r for r in clips if r["stage"] == "triton" and r["backend"] == served.get("runtime")
                          and (r["precision"], r["batch"], r["concurrency"]) ==
                          (row["precision"], row["batch"], row["concurrency"])), None)
        name = (f"Triton ({row['backend'].split('-')[1]}) >= 95% of in-process at batch {row['batch']}, "
                f"concurrency {row['concurrency']}")
        if reference is None:
            add(name, "in-process reference not measured yet", MISSING, row=row)
            continue
        ratio = row["clips_per_s"] / reference["clips_per_s"]
        add(name, f"{ratio:.0%} ({row['clips_per_s']:.1f} vs {reference['clips_per_s']:.1f} clips/s "
                  f"{reference['backend']} {reference['precision']} with {reference['concurrency']} thread(s))",
            _status(ratio >= 0.95), row=row, reference=reference)

    # 4. End to end against the decode-only ceiling.
    decode = next((r for r in rows if r["stage"] == "e2e" and r["backend"] == "decode-only"), None)
    e2e = next((r for r in rows if r["stage"] == "e2e" and r["backend"].startswith("sfdeploy:")), None)
    if decode and e2e:
        efficiency = e2e["videos_per_s"] / decode["videos_per_s"]
        add("End to end >= 90% of decode-only", f"{efficiency:.0%} ({e2e['backend']}: {e2e['videos_per_s']:.1f} "
            f"vs {decode['videos_per_s']:.1f} videos/s)", _status(efficiency >= 0.9), row=e2e, reference=decode)
    else:
        add("End to end >= 90% of decode-only", "needs the e2e stage", MISSING)

    # 5. CPU: ONNX Runtime against eager, per batch (reported: which runtime to serve on a CPU).
    if not record["device_info"]["device"].startswith("cuda"):
        for batch in sorted({r["batch"] for r in in_process}):
            ort = _best([r for r in in_process if (r["backend"], r["precision"], r["batch"]) ==
                         ("onnxruntime", "fp32", batch)])
            ts = _best([r for r in in_process if (r["backend"], r["precision"], r["batch"]) ==
                        ("torchscript", "fp32", batch)])
            if ort and ts:
                add(f"CPU: ONNX Runtime / TorchScript at batch {batch}",
                    f"{ort['clips_per_s'] / ts['clips_per_s']:.2f}x", REPORTED, row=ort, reference=ts)

    # Best of what sfdeploy does not serve, apart from the targets.
    for backend in sorted({r["backend"] for r in clips if r["backend"].startswith("eager")}):
        best = _best([r for r in clips if r["backend"] == backend])
        speedup = f", {best['clips_per_s'] / baseline['clips_per_s']:.1f}x MMAction2" if baseline else ""
        add(f"Best {backend} (not served)", f"{best['clips_per_s']:.1f} clips/s ({_describe(best)}{speedup})",
            REPORTED, group="variants", row=best)
    return out
