"""``sfdeploy doctor``."""

from __future__ import annotations

import click


@click.command()
def doctor() -> None:
    """Check versions, the known install traps, CUDA, the decoders and the tritonserver binary.

    Prints one row per check with the fix for each failure; exits 1 if any check fails.
    """
    from sfdeploy.doctor import FAIL, run_checks

    checks = run_checks()
    width = max(len(c.name) for c in checks)
    for check in checks:
        mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}[check.status]
        click.echo(f"{mark}  {check.name:<{width}}  {check.detail}")
        if check.fix:
            click.echo(f"      {'':<{width}}  fix: {check.fix}")
    failed = [c.name for c in checks if c.status == FAIL]
    if failed:
        raise click.ClickException(f"{len(failed)} check(s) failed: {', '.join(failed)}")
    click.echo("all checks passed")
