"""`ModelTarget`: which model a command talks to, one value for every command and the library;
and the one set of defaults the commands share (`--device`, `--backend`, `--url`, `--model`)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from sfdeploy.cli import cli
from sfdeploy.device import DEFAULT_DEVICE, DEVICES
from sfdeploy.endpoints import DEFAULT_HTTP_URL, DEFAULT_MODEL
from sfdeploy.errors import InputError
from sfdeploy.target import ModelTarget


def test_the_backend_follows_from_what_is_given() -> None:
    assert ModelTarget().backend == "triton" and ModelTarget().urls == (DEFAULT_HTTP_URL,)
    assert ModelTarget().model == DEFAULT_MODEL and ModelTarget().device == DEFAULT_DEVICE == "auto"
    local = ModelTarget(export_dir="EXPORT")
    assert (local.backend, local.export_dir, local.local) == ("onnxruntime", Path("EXPORT"), True)
    served = ModelTarget(backend="triton", export_dir="EXPORT")  # eval: the export the server was built from
    assert not served.local and served.url == DEFAULT_HTTP_URL
    assert ModelTarget(urls="h:8001").urls == ("h:8001",)
    assert ModelTarget(export_dir="E", device="GPU").device == "cuda"  # the old spelling, one vocabulary


@pytest.mark.parametrize(("given", "says"), [
    (dict(backend="torchscript"), "--export"),
    (dict(backend="tensorrt"), "unknown backend"),
    (dict(export_dir="E", server_decode=True), "--backend triton"),
    (dict(shm=True, server_decode=True), "--shm"),
    (dict(protocol="udp"), "protocol"),
    (dict(export_dir="E", device="tpu"), "unknown device"),
    (dict(export_dir="E", precision="fp8"), "precision"),
])
def test_combinations_that_cannot_work_are_refused_when_it_is_made(given: dict, says: str) -> None:
    with pytest.raises(InputError, match=says):
        ModelTarget(**given)


def test_several_servers_are_for_the_ray_engine() -> None:
    target = ModelTarget(urls=("a:8000", "b:8000"), protocol="grpc", model="m")
    assert [s.url for s in target.servers()] == ["a:8000", "b:8000"]
    assert all(s.protocol == "grpc" and s.model == "m" for s in target.servers())
    with pytest.raises(InputError, match="one --url"):
        _ = target.url


def _device_options() -> dict[str, click.Option]:
    found = {}
    for name, command in cli.commands.items():
        commands = command.commands.items() if isinstance(command, click.Group) else [(None, command)]
        for sub, leaf in commands:
            for param in leaf.params:
                if param.name == "device":
                    found[f"{name} {sub or ''}".strip()] = param
    return found


def test_every_device_option_has_one_vocabulary_and_one_default() -> None:
    options = _device_options()
    assert {"export", "eval", "repo", "infer", "bench"} <= set(options)
    for name, option in options.items():
        assert option.default == DEFAULT_DEVICE, name
        assert tuple(option.type.choices) == DEVICES, name


def test_infer_and_eval_share_the_model_options(tmp_path: Path) -> None:
    commands = {name: {p.name: p for p in cli.commands[name].params} for name in ("infer", "eval")}
    for name in ("backend", "protocol", "model", "precision", "device"):
        infer, evaluate = commands["infer"][name], commands["eval"][name]
        assert (infer.default, getattr(infer.type, "choices", None)) == \
            (evaluate.default, getattr(evaluate.type, "choices", None)), name
    # repo still takes its old spelling (and what everything else says)
    runner = CliRunner()
    for spelling in ("gpu", "cuda", "CPU"):
        result = runner.invoke(cli, ["repo", str(tmp_path / "no-export"), "--device", spelling])
        assert "Invalid value for '--device'" not in result.output, result.output
    result = runner.invoke(cli, ["repo", str(tmp_path), "--device", "tpu"])
    assert result.exit_code == 2 and "unknown device 'tpu'" in result.output
