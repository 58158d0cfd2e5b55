"""One command-line flag as a dataclass field: `flag()` and what its metadata says.

The group dataclasses (groups.py) and the Miles/Megatron flags furlong accepts without
acting on them (inert_flags.py) both declare their fields with `flag()`, so that the
parser, `--help`, the dry-run report and the warnings read one table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import field
from typing import Any


def flag(default: Any = None, help: str = "", *, choices: tuple | None = None,
         megatron_only: bool = False, inert: bool = False, why: str = "",
         metavar: str | None = None, parse: Any = None, nargs: str | int | None = None,
         negatable: bool = False) -> Any:
    """One flag: a dataclass field whose metadata tells argparse how to read it.

    `megatron_only` marks flags that only the Megatron backend acts on; `inert` marks
    Miles flags for features furlong does not have. Both are accepted and, when given,
    produce one warning naming the flag (and `why`). `negatable` adds `--no-NAME` to a
    switch, as Miles' `--offload-train / --no-offload-train`.
    """
    metadata = {"help": help, "choices": choices, "megatron_only": megatron_only,
                "inert": inert, "why": why, "metavar": metavar, "parse": parse,
                "nargs": nargs, "negatable": negatable}
    return field(default=default, metadata=metadata)


def has_no_effect(f: dataclasses.Field) -> bool:
    """Whether the flag is accepted only to be warned about (Megatron-only or inert)."""
    return bool(f.metadata.get("megatron_only") or f.metadata.get("inert"))


def json_object(text: str) -> dict:
    """argparse `type` for a flag that takes a JSON object."""
    # ArgumentTypeError, not ValueError: argparse shows only its own message for the latter.
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        value = error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a JSON object; expected e.g. '{{\"enable_thinking\": false}}'")
    return value
