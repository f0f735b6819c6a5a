"""Click options built from the options' declarations (extractor.options), and the options built
back from what click parsed. A flag's default, choices, bounds and help are written once, on its
field; its environment variable is EXTRACT_EMBEDDINGS_<FLAG>, dashes as underscores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, Field, is_dataclass
from typing import Any

import click

from extractor.options import Flag, declared
from jobs.extract import ENV_PREFIX


def param_name(decl: Flag, f: Field) -> str:
    """The key click gives the flag's value (--no-padding-mask → no_padding_mask)."""
    return decl.flag_name(f)[2:].replace("-", "_")


def envvar(param: str) -> str:
    return f"{ENV_PREFIX}_{param.upper()}"


def flag_options(*classes: type) -> Callable:
    """A decorator adding one click option per flag declared by `classes` (and the options they
    hold: JobOptions' ManifestSpec and Shard), in declaration order."""
    options = [option for cls in classes for option in _options(cls)]

    def decorate(command: Callable) -> Callable:
        for name, attrs in reversed(options):  # click lists a command's options bottom-up
            command = click.option(name, **attrs)(command)
        return command

    return decorate


def _options(cls: type) -> Iterator[tuple[str, dict]]:
    for f, decl, kind in declared(cls):
        if decl is None:
            if is_dataclass(kind):
                yield from _options(kind)
            continue
        param = param_name(decl, f)
        attrs: dict[str, Any] = {"help": decl.help, "envvar": envvar(param), "hidden": decl.hidden, "required": decl.required}
        if kind is bool:
            # An on/off flag: present means the field's other value.
            assert f.default is decl.negated, f"{f.name}: an on/off flag turns its default over"
            attrs.update(is_flag=True, default=False)
        else:
            attrs.update(type=_click_type(decl, kind), callback=_parser(decl))
            if f.default is not MISSING and f.default is not None and decl.parse is None:
                attrs.update(default=f.default, show_default=True)
        yield decl.flag_name(f), attrs


def _click_type(decl: Flag, kind: type) -> click.ParamType:
    allowed = decl.allowed()
    if allowed is not None:
        return click.Choice(allowed, case_sensitive=False)
    if kind in (int, float) and (decl.min is not None or decl.max is not None):
        kind_range = click.IntRange if kind is int else click.FloatRange
        return kind_range(min=decl.min, max=decl.max, min_open=decl.min_open)
    return {int: click.INT, float: click.FLOAT}.get(kind, click.STRING)


def _parser(decl: Flag) -> Callable | None:
    if decl.parse is None:
        return None

    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return decl.parse(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from e

    return parse


def options_from(cls: type, values: Mapping[str, Any]):
    """`cls` (JobOptions, CommandOptions) from click's parsed values; the options check themselves
    (ConfigError). A flag that was not given leaves its field's default."""
    kwargs = {}
    for f, decl, kind in declared(cls):
        if decl is None:
            if is_dataclass(kind):
                kwargs[f.name] = options_from(kind, values)
            continue
        value = values[param_name(decl, f)]
        if decl.negated:
            kwargs[f.name] = not value
        elif value is not None:
            kwargs[f.name] = value
    return cls(**kwargs)
