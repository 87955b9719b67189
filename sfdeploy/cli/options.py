"""Shared click option types."""

from __future__ import annotations

from typing import Any

import click


class GreedyOption(click.Option):
    """An option that takes every following token up to the next option, like argparse's
    ``nargs='+'``: ``--cfg-options a=1 b=2`` (the CLI contract MMAction2 users know).
    Use with ``multiple=True``; repeating the option also works."""

    def add_to_parser(self, parser: Any, ctx: click.Context) -> Any:
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


class BatchSize(click.ParamType):
    """A positive integer, or ``auto``."""

    name = "B|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
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
