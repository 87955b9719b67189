"""Benchmark results -> ``<name>.json`` (the record), ``<name>.md`` (tables), ``<name>.png`` (plot)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    info, spec = results["device_info"], results["clip_spec"]
    device = info.get("gpu") or f"{info['cpu']} ({info['cpu_cores']} cores)"
    lines = [
        f"# {results['model']} on {device}",
        "",
        f"{results['date']}, sfdeploy {info['packages'].get('sfdeploy', '?')}, torch {info['packages'].get('torch')}, "
        f"onnxruntime {info['packages'].get('onnxruntime') or info['packages'].get('onnxruntime-gpu')}, "
        f"{results['profile']} profile. A clip is {spec['views']} view(s) of {spec['clip_len']} frames at "
        f"{spec['crop_size']}x{spec['crop_size']}. Warm-up {results['settings']['warmup']}, "
        f"{results['settings']['iters']} timed calls per row; `x mmaction2` is clips/s over the MMAction2 "
        "batch-1 baseline measured in the same run. `peak MB`: torch's peak GPU allocation for the row on "
        "CUDA; on CPU the benchmark process's peak RSS so far.",
        "",
        "## Model only",
        "",
        _table(["backend", "precision", "batch", "concurrency", "clips/s", "p50 ms", "p95 ms", "p99 ms",
                "peak MB", "x mmaction2"],
               [[r["backend"], r["precision"], r["batch"], r["concurrency"], f"{r['clips_per_s']:.1f}",
                 f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}", f"{r['p99_ms']:.1f}",
                 f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] else "-", f"{r['speedup_vs_mmaction2']:.2f}"]
                for r in results["model_only"]]),
    ]
    e2e = results.get("end_to_end")
    if e2e:
        lines += ["", "## End to end (videos -> predictions)", "",
                  _table(["path", "videos/s", "note"], [
                      ["decode only (ceiling)", f"{e2e['decode_only_videos_per_s']:.1f}",
                       f"{e2e['workers']} decode workers, {e2e['videos']} videos"],
                      [f"sfdeploy ({e2e['backend']})", f"{e2e['sfdeploy_videos_per_s']:.1f}",
                       f"batch {e2e['batch']}, concurrency {e2e['concurrency']}; "
                       f"efficiency {e2e['efficiency']:.0%} of decode-only"],
                      ["MMAction2 inference_recognizer", f"{e2e['mmaction2_videos_per_s']:.1f}",
                       f"one video at a time ({e2e['mmaction2_videos']} videos); sfdeploy is "
                       f"{e2e['speedup_vs_mmaction2']:.1f}x"]])]
    if results.get("triton_video"):
        from sfdeploy.bench.video import markdown_rows

        lines += markdown_rows(results["triton_video"])
    if results.get("targets"):
        lines += ["", "## Against the targets", "",
                  _table(["target", "measured", "status"],
                         [[t["target"], t["measured"], t["status"]] for t in results["targets"]])]
    if results.get("ops"):
        lines += ["", "## Where the time goes (profiler, top operators)", "",
                  _table(["operator", "ms per call", "share"],
                         [[o["op"], o["self_ms_per_call"], f"{o['share']:.0%}"] for o in results["ops"]])]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput vs batch size, one line per backend and precision (served model: its best
    concurrency, as a marker at its request batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[str, list[tuple[int, float]]] = {}
    for row in results["model_only"]:
        if row["clips_per_s"] <= 0:
            continue
        key = f"{row['backend']} {row['precision']}"
        if row["backend"].startswith("triton"):
            best = series.get(key, [(row["batch"], 0.0)])[0][1]
            series[key] = [(row["batch"], max(best, row["clips_per_s"]))]
        else:
            series.setdefault(key, []).append((row["batch"], row["clips_per_s"]))
    for key, points in sorted(series.items()):
        points.sort()
        xs, ys = zip(*points, strict=True)
        style = "s" if key.startswith("triton") else "o-"
        ax.plot(xs, ys, style, label=key)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (clips per call)")
    ax.set_ylabel("clips / s")
    device = results["device_info"].get("gpu") or f"{results['device_info']['cpu_cores']}-core CPU"
    ax.set_title(f"{results['model']}, {device}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(results: dict[str, Any], out: Path) -> list[Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    md, png = out.with_suffix(".md"), out.with_suffix(".png")
    md.write_text(markdown(results))
    plot(results, png)
    return [out, md, png]
