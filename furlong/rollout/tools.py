"""The tools of the built-in multi-turn generate function (rollout/multi_turn.py): Miles'
--generate-* flags loaded into a `ToolSetup`, and the calls of one model turn run.

- --generate-tool-specs-path: OpenAI tool specs (`{"type": "function", "function":
  {"name": ..., "parameters": ...}}`) for the chat template: a dotted path to a list (or
  to a function returning one), as in Miles, or a .json file holding the list.
- --generate-tool-call-parser: how calls are written in the model's text. furlong reads
  Qwen/Hermes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks
  (engine/tool_calls.py), which SGLang's parsers qwen, qwen25, qwen3 and hermes read;
  leave it unset for the same. Other formats are refused by name.
- --generate-execute-tool-function-path: Miles' signature,
  `async def execute(name: str, arguments: dict) -> str` (a sync function works too);
  its result is the content of the tool message.

Malformed calls (a block whose JSON does not parse, without a name, or whose arguments
are not a JSON object) do not end the trajectory: each becomes a tool message
"error: <why>" after the results of the well-formed calls, so the model reads its
mistake on its next turn, and the caller counts them. An exception raised by the tool
function is not caught: a broken tool stops the run with its traceback.
"""
from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from furlong.engine.tool_calls import ParsedText, parse_tool_calls
from furlong.hooks import call_hook, load_function

# SGLang's names of parsers for the <tool_call> JSON format furlong parses.
TOOL_CALL_PARSERS = ("qwen", "qwen25", "qwen3", "hermes")
SPECS_FLAG = "--generate-tool-specs-path"
PARSER_FLAG = "--generate-tool-call-parser"
EXECUTE_FLAG = "--generate-execute-tool-function-path"


@dataclass(frozen=True)
class ToolSetup:
    specs: list[dict] | None            # given to the chat template; None: none given
    parse: Callable[[str], ParsedText]  # a turn's text -> its calls and errors
    execute: Callable                   # (name, arguments) -> str, sync or async

    @classmethod
    @functools.lru_cache(maxsize=8)
    def load(cls, specs_path: str | None, parser: str | None,
             execute_path: str | None) -> "ToolSetup":
        """The setup the three flags name, read once per run (each sample asks for it);
        a ValueError names the flag at fault."""
        if not execute_path:
            raise ValueError(f"multi-turn generation runs the model's tool calls: give "
                             f"{EXECUTE_FLAG} module:function, an async "
                             "function(name, arguments) -> str")
        if parser not in (None, *TOOL_CALL_PARSERS):
            raise ValueError(f"{PARSER_FLAG} {parser}: furlong parses <tool_call> JSON "
                             f"blocks (Qwen, Hermes); give one of {list(TOOL_CALL_PARSERS)} "
                             "or leave it out")
        specs = load_tool_specs(specs_path) if specs_path else None
        return cls(specs, parse_tool_calls, load_function(execute_path, EXECUTE_FLAG))


def load_tool_specs(path: str) -> list[dict]:
    """The tool specs at `path`: a .json file, or `module:name` / `module.name` of a list
    or of a function that returns one."""
    if path.endswith(".json"):
        try:
            specs = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{SPECS_FLAG} {path}: cannot read the JSON ({error})") from None
    else:
        module_name, separator, name = path.rpartition(":" if ":" in path else ".")
        try:
            specs = getattr(importlib.import_module(module_name), name) if separator else None
        except (ImportError, AttributeError, ValueError) as error:
            raise ValueError(f"{SPECS_FLAG} {path}: cannot import it ({error}); give "
                             "module:name of a list of tool specs, or a .json file") from None
        specs = specs() if callable(specs) else specs
    if not (isinstance(specs, list) and all(isinstance(spec, dict) for spec in specs)):
        raise ValueError(f"{SPECS_FLAG} {path}: expected a list of tool specs "
                         '({"type": "function", "function": {...}}), got '
                         f"{type(specs).__name__}")
    return specs


async def run_tool_calls(parsed: ParsedText, execute: Callable) -> tuple[dict, list[dict]]:
    """(the assistant message of the turn, the tool messages that answer it): one per
    well-formed call, in order, then one "error: ..." message per malformed call."""
    calls, replies, errors = [], [], list(parsed.errors)
    for call in parsed.tool_calls:
        arguments = _arguments(call.arguments)
        if arguments is None:
            errors.append(f"the arguments of {call.name} are not a JSON object")
            continue
        message = call.to_openai()
        result = await call_hook(execute, call.name, arguments)
        if not isinstance(result, str):
            raise ValueError(f"{EXECUTE_FLAG}: the tool function returned a "
                             f"{type(result).__name__} for {call.name}; return the tool "
                             "message's text (a str)")
        calls.append(message)
        replies.append({"role": "tool", "tool_call_id": message["id"], "name": call.name,
                        "content": result})
    assistant = {"role": "assistant", "content": parsed.content}
    if calls:
        assistant["tool_calls"] = calls
    return assistant, replies + [{"role": "tool", "content": f"error: {error}"}
                                 for error in errors]


def _arguments(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
