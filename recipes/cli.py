"""Command lines built from the recipes' option dataclasses with `transformers.HfArgumentParser`.

Each option is declared once, as a dataclass field whose `metadata["help"]` is its help text; the parser derives the
flag (`--max-steps`, also accepted as `--max_steps`), its type and its default from the field.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from collections.abc import Sequence

from transformers import HfArgumentParser


class OptionError(ValueError):
    """Options that do not go together (or one that is missing); a command line reports it as a usage error."""


def _is_flag(action) -> bool:
    """A bool field's option: `--flag` alone means True (HfArgumentParser gives it nargs="?" and const=True)."""
    return action.nargs == "?" and action.const is True


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks (the examples); lists each option once, in its dashed spelling (a bool
    field that defaults to True as `--flag, --no-flag`); gives ints the metavar N and floats X; and appends the
    default to the help unless it is None, empty or a bool, or the help already gives it."""

    def add_argument(self, action):
        if isinstance(action, argparse._StoreFalseAction) and action.option_strings[0].startswith("--no"):
            return  # listed with its positive twin
        super().add_argument(action)

    def _format_action_invocation(self, action):
        if action.option_strings:
            action = copy.copy(action)
            action.option_strings = [s for s in action.option_strings if not (s.startswith("--") and "_" in s)]
            if _is_flag(action):
                action.nargs = 0
                if action.default is True:
                    action.option_strings = [*action.option_strings, "--no-" + action.option_strings[0][2:]]
            elif action.metavar is None and action.choices is None:
                action.metavar = {int: "N", float: "X"}.get(action.type)
        return super()._format_action_invocation(action)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or default is None
            or isinstance(default, bool)
            or default is argparse.SUPPRESS
            or (isinstance(default, (str, list, tuple)) and not default)
            or not action.option_strings
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def build_parser(dataclass_types: Sequence[type], description: str, **kwargs) -> HfArgumentParser:
    """An HfArgumentParser over `dataclass_types` (each with an `_argument_group_name` becomes a help section)."""
    kwargs.setdefault("usage", "%(prog)s [options]")
    return HfArgumentParser(list(dataclass_types), description=description, formatter_class=HelpFormatter, **kwargs)


def parse(parser: HfArgumentParser, argv: Sequence[str] | None = None) -> tuple:
    """The dataclass instances of `parser` from `argv` (default: sys.argv); unknown arguments are an error."""
    return parser.parse_args_into_dataclasses(args=None if argv is None else list(argv), look_for_args_file=False)


def merged(cls: type, parts: Sequence) -> object:
    """One `cls` instance from dataclass instances whose fields, together, are the fields of `cls`."""
    values = {}
    for part in parts:
        values.update({f.name: getattr(part, f.name) for f in dataclasses.fields(part)})
    return cls(**values)
