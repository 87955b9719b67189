"""``sfdeploy demo``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click


@click.command()
@click.option("--workdir", default="sfdeploy-demo", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where every stage writes; a re-run continues from what is complete (the benchmark is measured "
                   "again).")
@click.option("--bench/--no-bench", default=True, show_default=True, help="End with a short benchmark.")
@click.option("-v", "--verbose", is_flag=True,
              help="Every log line on the console: mmengine's training log, each stage's details.")
def demo(workdir: Path, bench: bool, verbose: bool) -> None:
    """Run the whole toolchain on a synthetic dataset, on CPU, in minutes:

    \b
    synthetic videos -> data prepare -> finetune (slowfast_tiny) -> export + parity gate
    -> Triton repository -> tritonserver -> infer through it -> short benchmark -> summary

    The console shows the 8 stages, progress bars and warnings (-v: everything); the summary is
    printed at the end and written to WORKDIR/summary.json, and the last line of stdout is a
    short JSON summary for scripts.
    """
    from sfdeploy.demo import run_demo

    verbose = _quiet_library_logs(verbose)
    summary = run_demo(workdir, bench=bench, verbose=verbose)
    click.echo("\n".join(summary_lines(summary)), err=True)
    click.echo(json.dumps({k: summary[k] for k in ("workdir", "val_top1", "served_top1", "wall_time_s")}
                          | {"parity_passed": all(r["passed"] for r in summary["parity"].values()),
                             "busy": bool(summary["load"] and summary["load"]["busy"]),
                             "summary": summary["artifacts"]["summary"]}))


def _quiet_library_logs(verbose: bool) -> bool:
    """Unless verbose (this -v, or `sfdeploy -v`), the library's INFO lines stay off the console and
    the demo's own stage lines stay on (`-q` quiets those too). Returns whether verbose."""
    library = logging.getLogger("sfdeploy")
    if verbose or library.level == logging.DEBUG:
        library.setLevel(logging.DEBUG)
        return True
    if library.getEffectiveLevel() <= logging.INFO:
        logging.getLogger("sfdeploy.demo").setLevel(logging.INFO)
        library.setLevel(logging.WARNING)
    return False


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The summary for people: what was trained, checked, served and measured, and where it is."""
    artifacts = summary["artifacts"]
    lines = [
        "",
        f"sfdeploy demo finished in {summary['wall_time_s']:.0f} s ({summary['workdir']})",
        f"  val top-1 after finetuning:    {summary['val_top1']:.1%} (training {summary['training_s']:.0f} s)",
        "  parity with MMAction2:         " + ", ".join(
            f"{k} {'ok' if r['passed'] else 'FAILED'} (max |diff| {r['max_abs_diff']:.1e}, top-1 "
            f"{r['top1_agreement']:.0%})" for k, r in summary["parity"].items()),
        f"  served accuracy (Triton gRPC): {summary['served_top1']:.1%} on {summary['served_videos']} val videos",
    ]
    if summary["throughput"]:
        lines += throughput_lines(summary["throughput"], summary["load"])
    lines += [
        f"  checkpoint:   {artifacts['checkpoint']}",
        f"  training log: {artifacts['training_log']}",
        f"  export:       {artifacts['manifest']} ({', '.join(artifacts['export'])})",
        f"  repository:   {artifacts['model_repository']}",
        f"  predictions:  {artifacts['predictions']}",
    ]
    if artifacts["bench"]:
        lines.append(f"  benchmark:    {artifacts['bench'][1]} (plot {artifacts['bench'][2]})")
    lines.append(f"  summary:      {artifacts['summary']}")
    return lines


def throughput_lines(rows: list[dict[str, Any]], load: dict[str, Any]) -> list[str]:
    """The benchmark in two groups (the model alone; served beside the same runtime in process),
    with the machine's load said first, plainly when it makes the figures low."""
    from sfdeploy.demo import IN_PROCESS, MODEL_ONLY

    if load["busy"]:
        lines = [f"  WARNING: the machine was busy while the benchmark ran: {load['text']}. Run `sfdeploy demo` "
                 "again on a quiet machine: it measures again on every run."]
    else:
        lines = [f"  benchmark load: {load['text']}"]
    lines.append("  throughput, clips/s (x MMAction2 at batch 1):")
    model = [r for r in rows if r["what"] == MODEL_ONLY]
    served = [r for r in rows if r["what"] != MODEL_ONLY]
    if model:
        lines.append("    the model alone, one caller:")
        lines += [_row(r, f"{r['backend']} {r['precision']} batch {r['batch']}") for r in model]
    if served:
        lines.append(f"    served by Triton, beside the same runtime in this process (batch {served[0]['batch']}, "
                     "xN: N requests in flight / N threads):")
        for row in sorted(served, key=lambda r: (r["concurrency"], r["what"] != IN_PROCESS, r["backend"])):
            name = f"{row['backend']} in process" if row["what"] == IN_PROCESS else row["backend"]
            share = f"  {row['of_in_process']:.0%} of in process" if row["of_in_process"] is not None else ""
            lines.append(_row(row, f"{name} {row['precision']} x{row['concurrency']}") + share)
    return lines


def _row(row: dict[str, Any], name: str) -> str:
    speedup = f"{row['speedup_vs_mmaction2']:5.2f}x" if row["speedup_vs_mmaction2"] is not None else "     -"
    return f"      {name:<34} {row['clips_per_s']:8.1f}  {speedup}" + ("  (busy)" if row["busy"] else "")
