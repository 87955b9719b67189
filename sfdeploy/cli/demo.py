"""``sfdeploy demo``."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.option("--workdir", default="sfdeploy-demo", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where every stage writes; a re-run continues from what is complete.")
@click.option("--bench/--no-bench", default=True, show_default=True, help="End with a short benchmark.")
def demo(workdir: Path, bench: bool) -> None:
    """Run the whole toolchain on a synthetic dataset, on CPU, in minutes:

    \b
    synthetic videos -> data prepare -> finetune (slowfast_tiny) -> export + parity gate
    -> Triton repository -> tritonserver -> infer through it -> short benchmark -> summary
    """
    from sfdeploy.demo import run_demo

    summary = run_demo(workdir, bench=bench)
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
        lines.append("  throughput (clips/s, x MMAction2 batch 1):")
        for row in summary["throughput"]:
            lines.append(f"    {row['backend']:<12} {row['precision']} batch {row['batch']:>2} "
                         f"x{row['concurrency']:<2} {row['clips_per_s']:8.1f}  {row['speedup_vs_mmaction2']:5.2f}x")
    artifacts = summary["artifacts"]
    lines += [
        f"  checkpoint:   {artifacts['checkpoint']}",
        f"  export:       {artifacts['manifest']} ({', '.join(artifacts['export'])})",
        f"  repository:   {artifacts['model_repository']}",
        f"  predictions:  {artifacts['predictions']}",
    ]
    if artifacts["bench"]:
        lines.append(f"  benchmark:    {artifacts['bench'][1]} (plot {artifacts['bench'][2]})")
    click.echo("\n".join(lines), err=True)
    click.echo(json.dumps(summary))
