"""The ``sfdeploy`` command line: thin commands over the library.

Each command parses options, calls one library function and prints the result. Heavy imports
(torch, mmaction, onnx, tritonclient) happen inside the commands, so ``sfdeploy --help`` is
instant. Library errors (:class:`sfdeploy.errors.SfdeployError`) become one clear message and
exit code 1; a bad option value is a ``click.BadParameter`` (exit code 2).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from sfdeploy.errors import SfdeployError


class SfdeployGroup(click.Group):
    """A group that turns library errors into clean CLI errors."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; an :class:`SfdeployError` becomes its message (exit code 1), Ctrl-C exit code 130."""
        try:
            return super().invoke(ctx)
        except SfdeployError as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("sfdeploy: %(levelname)s: %(message)s"))
    root = logging.getLogger("sfdeploy")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


@click.group(cls=SfdeployGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show debug messages.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.version_option(package_name="sfdeploy")
def cli(verbose: bool, quiet: bool) -> None:
    """SlowFast video action recognition: from labelled videos to a served, batched model.

    \b
    The path of the data:
      data synth / data prepare  ->  finetune  ->  export  ->  repo  ->  serve  ->  infer / bench
    Run `sfdeploy demo` to see all of it on a synthetic dataset, on CPU, in minutes.
    """
    _setup_logging(verbose, quiet)


def _register() -> None:
    """Add each command module's command (imported here: a module per command or family)."""
    from sfdeploy.cli import bench, data, demo, doctor, evaluate, export, finetune, infer, serving

    cli.add_command(data.data)
    cli.add_command(finetune.finetune)
    cli.add_command(export.export)
    cli.add_command(evaluate.evaluate)
    cli.add_command(serving.repo)
    cli.add_command(serving.serve)
    cli.add_command(infer.infer)
    cli.add_command(bench.bench)
    cli.add_command(demo.demo)
    cli.add_command(doctor.doctor)


_register()


def main() -> None:
    """The ``sfdeploy`` console script (and ``python -m sfdeploy``)."""
    cli(prog_name="sfdeploy")
