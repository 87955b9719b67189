"""Shared click options and option types: one definition of each option several commands take."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


class GreedyOption(click.Option):
    """An option that takes every following token up to the next option, like argparse's
    ``nargs='+'``: ``--cfg-options a=1 b=2`` (the CLI contract MMAction2 users know).
    Use with ``multiple=True``; repeating the option also works."""

    def add_to_parser(self, parser: Any, ctx: click.Context) -> Any:
        """Register as click does, then make the parser's handler swallow the following values too."""
        result = super().add_to_parser(parser, ctx)
        for name in self.opts:
            option = parser._long_opt.get(name) or parser._short_opt.get(name)
            if option is None:
                continue
            previous = option.process
            prefixes = parser._opt_prefixes

            def process(value: Any, state: Any, previous: Any = previous, prefixes: Any = prefixes) -> None:
                values = [value]
                while state.rargs and not any(state.rargs[0].startswith(p) for p in prefixes):
                    values.append(state.rargs.pop(0))
                for item in values:
                    previous(item, state)

            option.process = process
        return result


def parse_cfg_options(items: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> a dict for ``Config.merge_from_dict``, values parsed the way
    MMAction2's ``--cfg-options`` parses them (numbers, bools, lists, tuples)."""
    from mmengine.config import DictAction

    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(
                f"'{item}' is not KEY=VALUE (put positional arguments before --cfg-options)",
                param_hint="--cfg-options",
            )
        options[key] = DictAction._parse_iterable(value)
    return options


class OptionalValue(click.Option):
    """A choice option whose value may be left out (``--shm`` alone: its ``flag_value``), like
    click's ``is_flag=False, flag_value=...``, except that the next word is taken as its value only
    when it is one of the choices: ``infer --shm videos/`` reads as ``--shm`` then the positional
    (as when ``--shm`` was a flag), not as a bad value ``videos/``. ``--shm=WORD`` is always the value."""

    def add_to_parser(self, parser: Any, ctx: click.Context) -> Any:
        """Register as click does, then let the parser see no value after the option when the next
        word is not one of its choices."""
        result = super().add_to_parser(parser, ctx)
        if not hasattr(parser, "_match_long_opt"):  # click's parser internals moved: its own behaviour (a test says)
            return result
        choices = {str(choice).lower() for choice in self.type.choices}
        names, match = set(self.opts), parser._match_long_opt

        def match_long(opt: str, explicit_value: str | None, state: Any) -> None:
            following = state.rargs[0] if state.rargs else None
            if opt in names and explicit_value is None and isinstance(following, str) \
                    and following.lower() not in choices:
                rest = state.rargs[:]
                state.rargs[:] = []  # nothing follows: click gives the option its flag_value
                try:
                    match(opt, None, state)
                finally:
                    state.rargs[:] = rest
                return
            match(opt, explicit_value, state)

        parser._match_long_opt = match_long
        return result


class BatchSize(click.ParamType):
    """A positive integer, or ``auto``."""

    name = "B|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        """``auto`` as it is, else a positive integer, or a usage error."""
        if isinstance(value, int) or value == "auto":
            return value
        try:
            number = int(value)
        except ValueError:
            self.fail(f"'{value}' is neither a number nor 'auto'", param, ctx)
        if number < 1:
            self.fail(f"must be >= 1, got {number}", param, ctx)
        return number


class FrameSize(click.ParamType):
    """A frame size limit, in pixels: ``WxH`` (``7680x4320``) or a number (``33177600``)."""

    name = "WxH|PIXELS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        """The limit in pixels, or a usage error saying the two spellings."""
        if isinstance(value, int):
            return value
        width, sep, height = str(value).lower().partition("x")
        try:
            pixels = int(width) * int(height) if sep else int(width)
        except ValueError:
            self.fail(f"'{value}' is neither WxH (e.g. 7680x4320) nor a number of pixels", param, ctx)
        if pixels < 1:
            self.fail(f"must be >= 1 pixel, got {value}", param, ctx)
        return pixels


def max_video_pixels_option(where: str) -> Any:
    """``--max-video-pixels``: videos with larger frames are refused before they are decoded
    (:mod:`sfdeploy.decode` owns the default)."""
    from sfdeploy.decode import MAX_VIDEO_SIZE

    return click.option("--max-video-pixels", "max_pixels", default="x".join(map(str, MAX_VIDEO_SIZE)),
                        show_default=True, type=FrameSize(),
                        help=f"{where} refuses videos with larger frames (WxH or pixels) before decoding them: a "
                             "small file can hold huge frames, and decoding them would take gigabytes.")


class DeviceType(click.Choice):
    """``--device``: one vocabulary in every command (:data:`sfdeploy.device.DEVICES`), ``cuda:N``
    too, and ``gpu`` accepted as ``cuda`` (what ``repo --device`` took before); the value a command
    gets is a :class:`sfdeploy.device.Device`, parsed here once."""

    def __init__(self) -> None:
        from sfdeploy.device import DEVICES

        super().__init__(DEVICES, case_sensitive=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The :class:`~sfdeploy.device.Device` of ``value``, or a usage error naming the vocabulary."""
        from sfdeploy.device import Device
        from sfdeploy.errors import InputError

        try:
            return Device(str(value))
        except InputError as exc:
            self.fail(f"{exc.message}; use {', '.join(self.choices)} (or cuda:N)", param, ctx)


def device_option(help_text: str) -> Any:
    """``--device auto|cpu|cuda``, default ``auto`` (:data:`sfdeploy.device.DEFAULT_DEVICE`)."""
    from sfdeploy.device import DEFAULT_DEVICE

    return click.option("--device", default=DEFAULT_DEVICE, show_default=True, type=DeviceType(), help=help_text)


def transport_options() -> list[Any]:
    """``--shm [none|system|cuda]`` (alone: system, :mod:`sfdeploy.transport`) and ``--server-decode``:
    how a served model's inputs travel."""
    from sfdeploy.transport import CHOICES, FLAG_VALUE, SharedMemory

    return [
        click.option("--shm", cls=OptionalValue, type=click.Choice(CHOICES, case_sensitive=False),
                     is_flag=False, flag_value=FLAG_VALUE, default=SharedMemory.NONE.value, show_default=True,
                     help="How inputs reach a server on this machine. --shm alone (or --shm system): system "
                          "shared memory; --shm cuda: CUDA shared memory on the GPU (the batch's own, else "
                          "--device cuda:N, else cuda:0; needs the cuda-python package); none: in the request."),
        click.option("--server-decode", is_flag=True, help="Send the encoded files to <model>_video, which "
                                                           "decodes them on the server (no local decoding)."),
    ]


#: the parameters `target_options` turns into one ModelTarget
_TARGET_PARAMS = ("backend", "export_dir", "precision", "device", "urls", "protocol", "model", "shm", "server_decode")


def target_options(*, export_option: bool = True, several_urls: bool = False, transport: bool = True,
                   device_help: str = "Where a local backend runs (auto: the GPU when the backend can use it "
                                      "here; cuda: the GPU or a clear error).") -> Callable[[Callable], Callable]:
    """The options that say which model a command talks to (``--backend --export --precision
    --device --url --protocol --model`` and, with ``transport``, ``--shm --server-decode``), parsed
    into one :class:`sfdeploy.target.ModelTarget` handed to the command as ``target``.

    ``export_option=False``: the command takes EXPORT as its argument (``export_dir``) instead.
    ``several_urls``: ``--url`` may be repeated (``infer --engine ray`` spreads over them).
    An invalid combination is a usage error (exit code 2), before anything runs."""
    from sfdeploy.endpoints import DEFAULT_HTTP_URL, DEFAULT_MODEL, PROTOCOLS
    from sfdeploy.precision import DEFAULT_RUN_PRECISION, RUN_PRECISIONS
    from sfdeploy.target import BACKENDS, DEFAULT_LOCAL_BACKEND, SERVED

    options = [
        click.option("--backend", type=click.Choice(BACKENDS),
                     help=f"{SERVED}: a served model (--url); {' / '.join(BACKENDS[1:])}: the exported model in "
                          f"this process [default: {DEFAULT_LOCAL_BACKEND} with an export, else {SERVED}]."),
        click.option("--url", "urls", multiple=several_urls, default=(DEFAULT_HTTP_URL,) if several_urls
                     else DEFAULT_HTTP_URL, show_default=True,
                     help="Triton server (its http or grpc port)" + ("; --engine ray spreads batches over every "
                                                                    "--url given." if several_urls else ".")),
        click.option("--protocol", default=PROTOCOLS[0], show_default=True, type=click.Choice(PROTOCOLS)),
        click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Served model name."),
        *([click.option("--export", "export_dir", type=click.Path(path_type=Path),
                        help="An `sfdeploy export` folder (local backends).")] if export_option else []),
        click.option("--precision", default=DEFAULT_RUN_PRECISION, show_default=True, type=click.Choice(RUN_PRECISIONS),
                     help="Which artifact of the export (local backends; bf16: on a GPU, or a CPU with AVX512-BF16 "
                          "or AMX)."),
        device_option(device_help),
    ]
    if transport:
        options += transport_options()

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            from sfdeploy.errors import InputError
            from sfdeploy.target import ModelTarget

            given = {name: kwargs.pop(name) for name in _TARGET_PARAMS if name in kwargs and name != "export_dir"}
            export_dir = kwargs.pop("export_dir") if export_option else kwargs.get("export_dir")
            given["backend"] = given["backend"] or "auto"
            try:
                kwargs["target"] = ModelTarget(export_dir=export_dir, **given)
            except InputError as exc:
                raise click.UsageError(str(exc)) from exc
            return command(*args, **kwargs)

        for option in reversed(options):
            run = option(run)
        return run

    return decorate
