"""Command lines, written one way for every nextword command (train, export, eval, serve, client).

A command's options are a frozen dataclass whose fields carry their own default and help
(``option``); ``build_parser`` makes the argparse parser from it and ``config_from`` the config from
the parsed flags. A bad flag is reported in one line with exit status 2 (``OneLineParser``).

    @dataclass(frozen=True)
    class ExportConfig:
        checkpoint: str = option(help="a checkpoint file or run directory", positional=True)
        out: str = option(help="the model file to write", required=True, metavar="PATH")
        ngram_order: int = option(5, "the n-gram memory's order; 0: none", low=0, high=9)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

Config = TypeVar("Config")
_REQUIRED = object()  # no default: the flag must be given (or the field is positional)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exits with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def ranged(kind, low=None, high=None, low_open=False):
    """An argparse type: ``kind`` (int or float), finite, within [low, high] (or (low, high] if low_open)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be {'>' if low_open else '>='} {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be <= {high}")
        return value

    return parse


def option(
    default: Any = _REQUIRED,
    help: str = "",
    *,
    choices: Sequence[str] | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    group: str | None = None,
    positional: bool = False,
    required: bool = False,
    default_text: str | None = None,
    short: str | None = None,
) -> Any:
    """A config field that is also a command-line flag.

    ``default``: the field's default (a list or tuple default makes a repeatable flag); ``low``, ``high``:
    the range of a number; ``parse``: a converter of its own; ``short``: a one-letter flag beside the long
    one; ``group``: the heading it is listed under; ``default_text``: how --help shows the default (None:
    the value itself, "": not at all)."""
    metadata = {
        "help": help,
        "choices": choices,
        "range": (low, high, low_open),
        "parse": parse,
        "metavar": metavar,
        "group": group,
        "positional": positional,
        "required": required,
        "default_text": default_text,
        "short": short,
    }
    if default is _REQUIRED:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default=tuple(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _kind(annotation: Any) -> Any:
    """``int`` for ``int``, ``int | None`` and ``tuple[int, ...]``; the annotation itself otherwise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _kind(kinds[0]) if len(kinds) == 1 else str
    if origin in (tuple, list):
        return _kind(typing.get_args(annotation)[0])
    return annotation


def _help(meta: Mapping[str, Any], default: Any, has_default: bool) -> str:
    """The flag's help, with its default as --help shows it."""
    shown = meta["default_text"]
    if shown is None and has_default and default not in (None, (), ""):
        shown = {True: "on", False: "off"}.get(default) if isinstance(default, bool) else None
        shown = shown or (", ".join(default) if isinstance(default, tuple) else str(default))
    return (meta["help"] + (f" (default {shown})" if shown else "")).replace("%", "%%")


def _arguments(meta: Mapping[str, Any], kind: Any, default: Any, has_default: bool) -> dict[str, Any]:
    """add_argument's keywords for a field, apart from its names and action."""
    kwargs: dict[str, Any] = {"help": _help(meta, default, has_default)}
    if meta["metavar"]:
        kwargs["metavar"] = meta["metavar"]
    if meta["choices"]:
        kwargs["choices"] = list(meta["choices"])
    if meta["parse"]:
        kwargs["type"] = meta["parse"]
    elif kind in (int, float):
        kwargs["type"] = ranged(kind, *meta["range"])
    return kwargs


def add_options(parser: argparse.ArgumentParser, config: type, skip: Sequence[str] = ()) -> None:
    """A flag (or positional argument) for every field of the dataclass ``config`` that ``option`` made."""
    hints = typing.get_type_hints(config)
    groups: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        meta = field.metadata
        if "help" not in meta or field.name in skip:
            continue
        if meta["group"] and meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        target = groups[meta["group"]] if meta["group"] else parser
        has_default = field.default is not dataclasses.MISSING
        default = field.default if has_default else None
        kind = _kind(hints[field.name])
        kwargs = _arguments(meta, kind, default, has_default)
        if meta["positional"]:
            if has_default:  # optional: the default when left out
                kwargs.update(nargs="?", default=default)
            target.add_argument(field.name, **kwargs)
            continue
        names = [*([meta["short"]] if meta["short"] else []), "--" + field.name.replace("_", "-")]
        if kind is bool:
            kwargs.pop("type", None)
            target.add_argument(*names, action=argparse.BooleanOptionalAction, default=default, **kwargs)
        elif isinstance(default, tuple):
            target.add_argument(*names, action="append", default=None, dest=field.name, **kwargs)
        else:
            target.add_argument(*names, default=default, required=meta["required"], dest=field.name, **kwargs)


def build_parser(prog: str, description: str, *configs: type, skip: Sequence[str] = ()) -> OneLineParser:
    """The parser of a command whose options are the fields of ``configs``."""
    parser = OneLineParser(prog=prog, description=description)
    for config in configs:
        add_options(parser, config, skip)
    return parser


def config_from(config: type[Config], values: argparse.Namespace | dict, **overrides: Any) -> Config:
    """An instance of the dataclass ``config`` from parsed flags: a repeated flag's values as a tuple (its
    default where it was not given), other names ignored."""
    given = vars(values) if isinstance(values, argparse.Namespace) else dict(values)
    given.update(overrides)
    out = {}
    for field in dataclasses.fields(config):  # type: ignore[arg-type] # a dataclass, by contract
        if field.name not in given:
            continue
        value = given[field.name]
        if isinstance(field.default, tuple) or isinstance(value, list):
            value = tuple(value) if value is not None else field.default
        out[field.name] = value
    return config(**out)
