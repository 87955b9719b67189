"""The record ``<name>.json`` -> ``<name>.md`` (tables) and ``<name>.png`` (plots).

Made from whatever rows the record holds (a run stopped half-way gives a partial table that says
which stages it has), and remade after every row, so the table never lags the record by more
than the row being written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sfdeploy.bench import PRECISIONS, STAGES
from sfdeploy.bench.load import describe as describe_load
from sfdeploy.bench.rows import OK
from sfdeploy.bench.targets import served_label

_ORDER = ("mmaction2", "eager", "eager-rewrites", "torchscript-plain", "torchscript", "onnxruntime", "torch_export",
          "aoti", "triton-http", "triton-grpc", "triton-shm", "triton-cuda-shm",
          "eager-compile", "eager-cudagraphs", "eager-profile", "decode-only", "sfdeploy:triton-grpc",
          "sfdeploy:triton-http", "sfdeploy:torchscript", "sfdeploy:onnxruntime", "sfdeploy:torch_export",
          "sfdeploy:aoti", "mmaction2:inference_recognizer")
_PRECISIONS = (*PRECISIONS, "-")  # "-": rows without one (decode-only)


def _index(sequence: tuple[str, ...], value: str) -> int:
    return sequence.index(value) if value in sequence else len(sequence)


def sort_key(row: dict[str, Any]) -> tuple:
    """Where a row goes in the tables: by stage, then backend in a fixed reading order (unknown ones
    last, by name), precision, batch and concurrency; a table that is remade reads the same."""
    return (_index(STAGES, row["stage"]), _index(_ORDER, row["backend"]), row["backend"],
            _index(_PRECISIONS, row["precision"]), row["batch"], row["concurrency"])


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def baseline_clips_per_s(record: dict[str, Any]) -> float | None:
    """The MMAction2 batch-1 figure every ``x mmaction2`` column divides by (None: not measured)."""
    return next((r["clips_per_s"] for r in record["rows"] if r["stage"] == "model" and r["backend"] == "mmaction2"
                 and r.get("status", OK) == OK), None)


def _device(info: dict[str, Any]) -> str:
    return info.get("gpu") or f"{info['cpu']} ({info['cpu_cores']} cores)"


def markdown(record: dict[str, Any]) -> str:
    """The record as a Markdown page: what was measured and how, then a table per kind of row
    (model only, inside the server, end to end), the targets, and the profiles."""
    rows = sorted(record["rows"], key=sort_key)
    clips = [r for r in rows if r["kind"] == "clips"]
    lines = [*_header(record, rows), *_clips_section(clips, baseline_clips_per_s(record)), *_served_section(rows),
             *_videos_section(rows), *_train_section(rows),
             *_distill_section(rows), *_targets_sections(record), *_ops_sections(rows)]
    return "\n".join(lines) + "\n"


def _header(record: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """Title, versions and settings, the stages recorded so far, and how loaded the machine was."""
    info, spec, settings = record["device_info"], record["clip_spec"], record["settings"]
    stages = [s for s in STAGES if any(r["stage"] == s for r in rows)]
    status = {s: sum(r.get("status", OK) == s for r in rows) for s in ("ok", "failed", "skipped")}
    lines = [
        f"# {record['model']} on {_device(info)}",
        "",
        f"{record['date']}, sfdeploy {info['packages'].get('sfdeploy', '?')}, torch {info['packages'].get('torch')}, "
        f"onnxruntime {info['packages'].get('onnxruntime') or info['packages'].get('onnxruntime-gpu')}, "
        f"{record['profile']} profile. A clip is {spec['views']} view(s) of {spec['clip_len']} frames at "
        f"{spec['crop_size']}x{spec['crop_size']}. Warm-up {settings['warmup']}, {settings['iters']} timed calls "
        f"per row at least, for {settings.get('min_time', 0):g} s at least (with N requests in flight: the calls "
        "split among N threads, at least 3 each); `x mmaction2` "
        "is clips/s over the MMAction2 batch-1 baseline of the same run. `peak MB`: torch's peak GPU allocation "
        "for the row on CUDA; on CPU the benchmark process's peak RSS so far. The served model is what "
        f"`sfdeploy repo` writes by default: {served_label(record)}.",
        "",
        f"Stages recorded: {', '.join(stages) or 'none yet'} ({status['ok']} rows measured, {status['failed']} "
        f"failed, {status['skipped']} skipped; `sfdeploy bench --resume` measures what is missing).",
    ]
    load = describe_load([r for r in rows if not r.get("reference")], info["cpu_cores"])  # measured here
    lines += ["", f"Load: {load} (`others`: cores' worth of CPU that other processes took during the row)"
                  + ("; measure again on a quiet machine." if "BUSY" in load else ".")]
    if record.get("note"):
        lines += ["", f"Note: {record['note']}"]
    return lines


def _clips_section(clips: list[dict[str, Any]], baseline: float | None) -> list[str]:
    """The model-only table (clips in, probabilities out), every backend and stage."""
    if not clips:
        return []
    return ["", "## Model only (preprocessed clips in, probabilities out)", "",
            _table(["stage", "backend", "precision", "batch", "concurrency", "clips/s", "p50 ms", "p95 ms",
                    "p99 ms", "peak MB", "x mmaction2", "others", "note"],
                   [_clips_cells(r, baseline) for r in clips])]


def _served_section(rows: list[dict[str, Any]]) -> list[str]:
    """Where a served request's time goes, from Triton's own statistics of the rows that have them:
    the clip model's (its requests are batches of clips) and ``<name>_video``'s (a video per request;
    its compute infer holds the decoding and the BLS call to the clip model)."""
    served = [r for r in rows if r.get("server")]
    if not served:
        return []
    return ["", "## Where a served request's time goes (Triton's own statistics, per request)", "",
            "Mean ms per request in each phase of the server, over the row's window (warm-up included); "
            "`server /s`: inferences (clips, or videos for `triton-video`) over that window's wall time, beside "
            "the client's figure.", "",
            _table(["backend", "batch", "concurrency", "requests", "batches run", "queue", "compute input",
                    "compute infer", "compute output", "request (server)", "p50 (client)",
                    "server /s", "client /s"],
                   [[r["backend"], r["batch"], r["concurrency"], s["requests"], s["executions"], s["queue_ms"],
                     s["compute_input_ms"], s["compute_infer_ms"], s["compute_output_ms"], s["request_ms"],
                     r.get("p50_ms", "-"), s["server_clips_per_s"], r.get("clips_per_s", r.get("videos_per_s"))]
                    for r in served for s in [r["server"]]])]


def _videos_section(rows: list[dict[str, Any]]) -> list[str]:
    """The end-to-end table: videos in, predictions out."""
    videos = [r for r in rows if r["kind"] == "videos"]
    if not videos:
        return []
    return ["", "## End to end (videos -> predictions)", "",
            _table(["path", "precision", "batch", "concurrency", "videos", "videos/s", "others", "note"],
                   [[r["backend"], r["precision"], r["batch"], r["concurrency"], r.get("videos", "-"),
                     f"{r['videos_per_s']:.1f}" if r.get("status", OK) == OK else r["status"], others_cell(r),
                     r["note"]] for r in videos])]


def _train_section(rows: list[dict[str, Any]]) -> list[str]:
    """Training speed (``--stage train``): the measured finetune rows beside the guide's reference
    rows (other hardware, not measured here), then raw frames against videos."""
    train = [r for r in rows if r["kind"] == "train"]
    if not train:
        return []

    def cells(r: dict[str, Any]) -> list[Any]:
        ok = r.get("status", OK) == OK
        share = r.get("data_wait_share")
        return [r["backend"] + (" (reference)" if r.get("reference") else ""), r.get("media", "-"), r["precision"],
                r["batch"], r.get("workers", "-"), "yes" if r.get("persistent_workers") else "no" if ok and
                not r.get("reference") else "-", f"{r['videos_per_s']:.1f}" if ok else r["status"],
                "-" if share is None else f"{share:.0%}", f"{r['peak_mem_mb']:.0f}" if ok and r.get("peak_mem_mb")
                else "-", f"{r['disk_bytes'] / 1e6:.1f}" if r.get("disk_bytes") else "-", r.get("device", "-"),
                "-" if r.get("reference") else others_cell(r), r.get("note", "")]
    lines = ["", "## Training speed (finetune on synthetic videos; the guide's figures beside, not measured here)", "",
             "videos/s: videos of all processes over the timed epoch's wall time; `data wait`: the share of step "
             "time spent waiting for the next batch; `peak MB`: torch.cuda.max_memory_allocated on CUDA, the "
             "training process's peak RSS on CPU, the guide's GPU memory for reference rows; `disk MB`: the "
             "training media (videos, or their JPEG frames).", "",
             _table(["row", "media", "precision", "batch", "workers", "persistent", "videos/s", "data wait",
                     "peak MB", "disk MB", "device", "others", "note"], [cells(r) for r in train])]
    ok = {r.get("media"): r for r in train if r.get("status", OK) == OK and not r.get("reference")
          and r["precision"] == "fp32" and " workers=" not in r["backend"]}
    if "videos" in ok and "rawframes" in ok:
        v, f = ok["videos"], ok["rawframes"]
        lines += ["", f"Raw frames vs videos: {f['videos_per_s']:.1f} vs {v['videos_per_s']:.1f} videos/s "
                      f"({f['videos_per_s'] / v['videos_per_s']:.2f}x), data wait {f['data_wait_share']:.0%} vs "
                      f"{v['data_wait_share']:.0%}, on disk {f['disk_bytes'] / 1e6:.1f} vs "
                      f"{v['disk_bytes'] / 1e6:.1f} MB "
                      f"({f['disk_bytes'] / v['disk_bytes']:.1f}x)."]
    return lines


def _targets_sections(record: dict[str, Any]) -> list[str]:
    """The targets met or not, then the best of the variants sfdeploy does not serve."""
    lines: list[str] = []
    for group, title in (("targets", "Against the targets"),
                         ("variants", "Best of the variants sfdeploy does not serve (for reference)")):
        chosen = [t for t in record.get("targets", []) if t.get("group", "targets") == group]
        if chosen:
            lines += ["", f"## {title}", "",
                      _table(["target", "measured", "status"], [[t["target"], t["measured"], t["status"]]
                                                                for t in chosen])]
    return lines


def _distill_section(rows: list[dict[str, Any]]) -> list[str]:
    """Teacher vs distillation student (``--stage distill``): speed, GFLOP and parameters, and the
    student's clips/s over the teacher's at the same backend and batch."""
    distill = sorted((r for r in rows if r["stage"] == "distill" and r.get("status", OK) == OK),
                     key=lambda r: (r["backend"].split(":", 1)[1], r["batch"], r.get("role") != "teacher"))
    if not distill:
        return []
    teacher = {(r["backend"].split(":", 1)[1], r["batch"]): r["clips_per_s"] for r in distill
               if r.get("role") == "teacher"}

    def ratio(r: dict[str, Any]) -> str:
        base = teacher.get((r["backend"].split(":", 1)[1], r["batch"]))
        return f"{r['clips_per_s'] / base:.2f}" if r.get("role") == "student" and base else "-"
    return ["", "## Distillation: teacher vs student (random weights, fp32, deployed module)", "",
            "GFLOP per clip of one view (fvcore's counting in mmengine.analysis: a multiply-add is one FLOP); "
            "`x teacher`: the student's clips/s over the teacher's at the same backend and batch.", "",
            _table(["role", "preset", "backend", "batch", "clips/s", "p50 ms", "GFLOP/clip", "params M", "x teacher",
                    "others"],
                   [[r["role"], r["preset"], r["backend"].split(":", 1)[1], r["batch"], f"{r['clips_per_s']:.1f}",
                     f"{r['p50_ms']:.1f}", r["gflop_per_clip"], r["params_m"], ratio(r), others_cell(r)]
                    for r in distill])]


def _ops_sections(rows: list[dict[str, Any]]) -> list[str]:
    """A profiler table (top operators) per profiled row."""
    lines: list[str] = []
    for row in (r for r in rows if r["kind"] == "ops" and r.get("status", OK) == OK):
        lines += ["", f"## Where the time goes ({row['backend']} {row['precision']}, batch {row['batch']}: "
                      "profiler, top operators)", "",
                  _table(["operator", "ms per call", "share"],
                         [[o["op"], o["self_ms_per_call"], f"{o['share']:.0%}"] for o in row["ops"]])]
    return lines


def _clips_cells(row: dict[str, Any], baseline: float | None) -> list[Any]:
    head = [row["stage"], row["backend"], row["precision"], row["batch"], row["concurrency"]]
    if row.get("status", OK) != OK:
        return [*head, row["status"], "-", "-", "-", "-", "-", "-", row.get("note", "")]
    return [*head, f"{row['clips_per_s']:.1f}", f"{row['p50_ms']:.1f}", f"{row['p95_ms']:.1f}",
            f"{row['p99_ms']:.1f}", f"{row['peak_mem_mb']:.0f}" if row["peak_mem_mb"] else "-",
            f"{row['clips_per_s'] / baseline:.2f}" if baseline else "-", others_cell(row), row.get("note", "")]


def others_cell(row: dict[str, Any]) -> str:
    """The other work during a row, in cores, and **busy** when it was too much to trust the figure."""
    if row.get("others_cores") is None:
        return "-"
    return f"{row['others_cores']:.2f}" + (" **busy**" if row.get("busy") else "")


def plotted_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows the plot draws: measured clips/s (training rows are videos/s, in the table only)."""
    return [r for r in record["rows"] if r["kind"] == "clips" and r.get("status", OK) == OK and r["clips_per_s"] > 0]


def plot(record: dict[str, Any], path: Path) -> None:
    """Left: clips/s against batch size, a line per backend and precision. Right (when the triton
    stage has rows): served model and in-process reference against requests in flight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = plotted_rows(record)
    served = [r for r in ok if r["stage"] == "triton"]
    fig, axes = plt.subplots(1, 2 if served else 1, figsize=(13 if served else 8, 5), squeeze=False)
    _lines(axes[0][0], [r for r in ok if r["stage"] != "triton"], "batch", "batch size (clips per call)")
    axes[0][0].set_title("model only, one caller")
    if served:
        _lines(axes[0][1], served, "concurrency", "requests in flight (threads)")
        axes[0][1].set_title(f"served vs in-process, batch {served[0]['batch']}")
    fig.suptitle(f"{record['model']}, {_device(record['device_info'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _lines(ax: Any, rows: list[dict[str, Any]], x: str, label: str) -> None:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in sorted(rows, key=sort_key):
        where = " in process" if row["stage"] == "triton" and not row["backend"].startswith("triton") else ""
        series.setdefault(f"{row['backend']} {row['precision']}{where}", []).append((row[x], row["clips_per_s"]))
    for name, points in series.items():
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, "o-" if len(xs) > 1 else "s", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("clips / s")
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=7)


def write_report(record_path: Path) -> list[Path]:
    """Regenerate ``.md`` and ``.png`` beside the record from its rows; returns their paths (the
    record's, the table's, and the plot's when there is something to plot: a record of training
    rows only, or of no rows yet, has no plot, and a stale one is removed)."""
    from sfdeploy.fsutil import atomic_write_text, replace_atomically

    record_path = Path(record_path)
    record = json.loads(record_path.read_text())
    md, png = record_path.with_suffix(".md"), record_path.with_suffix(".png")
    atomic_write_text(md, markdown(record))
    if not plotted_rows(record):
        png.unlink(missing_ok=True)
        return [record_path, md]
    replace_atomically(png, lambda tmp: plot(record, tmp))
    return [record_path, md, png]
