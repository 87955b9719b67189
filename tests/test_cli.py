"""The command line: every command explains itself, starts without heavy imports, and turns
library errors into one message with a non-zero exit code."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from sfdeploy.cli import cli


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in group.commands.items():
        found.append((*prefix, name))
        if isinstance(command, click.Group):
            found += _commands(command, (*prefix, name))
    return found


COMMANDS = _commands(cli)


def test_contract_commands_exist() -> None:
    assert {("data", "synth"), ("data", "prepare"), ("finetune",), ("doctor",)} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help(command: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and len(result.output.splitlines()) > 3


def test_cli_import_is_light() -> None:
    """`sfdeploy --help` must not import torch, mmaction, onnx or tritonclient."""
    code = ("import sys, sfdeploy.cli; heavy = [m for m in ('torch', 'mmaction', 'mmengine', 'onnx', "
            "'onnxruntime', 'tritonclient', 'cv2', 'decord') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_command_and_bad_option_values_exit_2() -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["nope"]).exit_code == 2
    result = runner.invoke(cli, ["data", "synth", "out", "--classes", "12"])
    assert result.exit_code == 2 and "--classes" in result.output
