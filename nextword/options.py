"""Command-line options declared once, on the configuration dataclasses that use them.

A field's default is the option's default and its ``help`` is the option's
description, so ``--help``, the dataclass and the code that reads it can never
disagree::

    @dataclass(frozen=True)
    class PredictOptions:
        text: str = positional("what was typed so far")
        k: int = option(3, "suggestions asked for")
        json: bool = switch("print one JSON object")

    add_options(parser, PredictOptions)       # --k K (default: 3), --json
    opts = from_args(PredictOptions, args)    # the dataclass, filled from the parsed arguments

The flag is the field's name with ``-`` for ``_`` unless ``flag=`` names
another; ``cli=False`` keeps a field off the command line (it keeps its default).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: Sequence[Any] | None = None,
    metavar: str | None = None,
    cli: bool = True,
) -> Any:
    """A ``--flag VALUE`` option with a default."""
    meta = {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "cli": cli}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def required(help: str, *, flag: str | None = None, metavar: str | None = None) -> Any:
    """A ``--flag VALUE`` option that must be given (the field has no default)."""
    return dataclasses.field(metadata={"help": help, "flag": flag, "metavar": metavar, "required": True})


def positional(help: str, *, metavar: str | None = None, nargs: str | None = None) -> Any:
    """A positional argument; ``nargs="*"`` takes any number (the field is then a list)."""
    meta = {"help": help, "positional": True, "metavar": metavar, "nargs": nargs}
    if nargs == "*":
        return dataclasses.field(default_factory=list, metadata=meta)
    return dataclasses.field(metadata=meta)


def switch(help: str, *, off: str | None = None) -> Any:
    """A boolean ``--flag``; with ``off="--no-thing"`` it is on by default and that flag turns it off."""
    return dataclasses.field(default=off is not None, metadata={"help": help, "flag": off, "switch": True})


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        shown = not (default is None or isinstance(default, bool) or default in ("", argparse.SUPPRESS))
        if action.option_strings and not action.required and shown and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def add_options(parser: argparse.ArgumentParser, *classes: type) -> None:
    """Declare the command-line options of every field of ``classes`` on ``parser``."""
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True) and "help" in f.metadata:
                _add(parser, f, hints[f.name])


def from_args(cls: Callable[..., T], args: argparse.Namespace, **overrides: Any) -> T:
    """``cls`` with every field the parsed ``args`` hold (the others keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return cls(**{**values, **overrides})


def _add(parser: argparse.ArgumentParser, f: dataclasses.Field[Any], hint: Any) -> None:
    meta = f.metadata
    kwargs: dict[str, Any] = {"help": meta["help"]}
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    if meta.get("positional"):
        if meta.get("nargs"):
            kwargs["nargs"] = meta["nargs"]
        parser.add_argument(f.name, type=_scalar(hint), **kwargs)
        return
    flag = meta.get("flag") or "--" + f.name.replace("_", "-")
    if meta.get("switch"):
        action = "store_false" if f.default else "store_true"
        parser.add_argument(flag, dest=f.name, action=action, **kwargs)
        return
    if meta.get("required"):
        kwargs["required"] = True
    else:
        factory = f.default_factory
        kwargs["default"] = f.default if f.default is not _MISSING or factory is _MISSING else factory()
    if meta.get("choices"):
        kwargs["choices"] = meta["choices"]
    parser.add_argument(flag, dest=f.name, type=_scalar(hint), **kwargs)


def _scalar(hint: Any) -> Callable[[str], Any]:
    """The converter for a field's type: ``int | None`` converts with int, ``list[str]`` with str."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _scalar(args[0])
    if origin in (list, tuple):
        return _scalar(typing.get_args(hint)[0])
    if hint in (int, float, str, Path):
        return typing.cast(Callable[[str], Any], hint)
    raise TypeError(f"no command-line type for {hint!r}")
