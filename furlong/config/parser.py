"""Command line -> Config: argparse built from the group dataclasses.

`--sglang-X` flags are taken out of argv first, in order, so that any SGLang server
flag passes through without furlong knowing it. Unknown flags are an error that
names the closest valid flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing

from furlong.config.groups import GROUPS, Config, flag_fields

SGLANG_PREFIX = "--sglang-"


class ConfigError(ValueError):
    """A user mistake in the flags; the message names the flag, the value and the fix."""


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _base_type(annotation: typing.Any) -> tuple[type, bool]:
    """(element type, is_sequence) for annotations like `int | None` or `tuple[str, ...]`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is tuple:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _add_flag(group: argparse._ArgumentGroup, annotation: typing.Any,
              f: dataclasses.Field) -> None:
    meta = f.metadata
    kind, is_sequence = _base_type(annotation)
    kwargs: dict = {"dest": f.name, "default": f.default, "help": _help(meta)}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if meta["negatable"] else "store_true"
    else:
        kwargs["type"] = meta["parse"] or kind
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if is_sequence or meta["nargs"]:
            kwargs["nargs"] = meta["nargs"] or "+"
        if meta["nargs"] == "?":
            kwargs["const"] = ""  # given bare, as Miles' --use-session-server
    group.add_argument(option_name(f.name), **kwargs)


def _help(meta: typing.Mapping) -> str | None:
    """The flag's help; for one that has no effect here, what --help says instead."""
    why = f": {meta['why']}" if meta["why"] else ""
    if meta["megatron_only"]:
        return f"{meta['help']} [megatron only{why}]".lstrip()
    if meta["inert"]:
        return f"{meta['help']} [no effect in furlong{why}]".lstrip()
    return meta["help"] or None


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError for a bad value instead of printing the whole
    usage (some 150 lines) and exiting; the caller prints one `prog: error:` line."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message} (see --help)")


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog, allow_abbrev=False,
        description="furlong: RL post-training of language models. Flags follow Miles/slime; "
                    "every --sglang-X flag is forwarded to the SGLang server as --X.")
    for title, _, cls in GROUPS:
        group = parser.add_argument_group(title, cls.__doc__)
        annotations = typing.get_type_hints(cls)  # once per group: it is slow
        for f in flag_fields(cls):
            _add_flag(group, annotations[f.name], f)
    return parser


def split_sglang_flags(argv: list[str], known: set[str]) -> tuple[list[str], list]:
    """Take `--sglang-X [values...]` out of argv, keeping their order.

    Flags that furlong itself declares (such as --sglang-server-concurrency) stay.
    Returns (remaining argv, [(X, (values...)), ...]).
    """
    remaining: list[str] = []
    captured: list[tuple[str, tuple[str, ...]]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name, has_equals, inline = token.partition("=")
        if not token.startswith(SGLANG_PREFIX) or name in known:
            remaining.append(token)
            i += 1
            continue
        values = [inline] if has_equals else []
        i += 1
        while not has_equals and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        captured.append((name[len(SGLANG_PREFIX):], tuple(values)))
    return remaining, captured


def _reject_unknown(extras: list[str], parser: argparse.ArgumentParser) -> None:
    options = [o for action in parser._actions for o in action.option_strings]
    for token in extras:
        name = token.split("=", 1)[0]
        if not name.startswith("-"):
            raise ConfigError(f"unexpected value {token!r}: it follows no flag that takes a value")
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else "; see --help for the flags"
        raise ConfigError(f"unknown flag {name}{hint}")


def parse_config(argv: list[str], prog: str = "train.py") -> Config:
    """Parse argv into a Config whose `sources` marks each value 'flag' or 'default'.

    Cross-flag rules and derived values are applied by `validate.resolve`.
    """
    parser = build_parser(prog)
    known = {o for action in parser._actions for o in action.option_strings}
    remaining, passthrough = split_sglang_flags(list(argv), known)
    namespace, extras = parser.parse_known_args(remaining)  # --help exits 0 here
    _reject_unknown(extras, parser)
    given = _given_dests(parser, remaining)
    groups, sources = {}, {}
    for _, attr, cls in GROUPS:
        values = {f.name: getattr(namespace, f.name) for f in flag_fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        if cls.__name__ == "SglangArgs":
            values["passthrough"] = tuple(passthrough)
            sources[f"{attr}.passthrough"] = "flag" if passthrough else "default"
        groups[attr] = cls(**values)
        for name in values:
            sources.setdefault(f"{attr}.{name}", "flag" if name in given else "default")
    return Config(**groups, sources=sources)


def _given_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests that argv sets explicitly: parse again with every default suppressed."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    return set(vars(namespace))
