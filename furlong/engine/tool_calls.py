"""Tool calls in a model's response text, in the Qwen/Hermes format.

A call is a block `<tool_call>{"name": NAME, "arguments": {...}}</tool_call>` (Qwen2.5,
Qwen3, Hermes; "parameters" is read as "arguments", as Llama 3 writes it). Pure: text in,
`ParsedText` out. A block that does not parse (bad JSON, no function name, no closing
tag because max tokens cut the response) is not fatal: it stays in the content as the
model wrote it and `errors` says why, so the caller can report it.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # the arguments object as JSON text, as OpenAI's API carries it

    def to_openai(self) -> dict:
        """One entry of an assistant message's `tool_calls`, with a fresh id."""
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedText:
    content: str                    # the text outside the parsed calls
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one per block left in the content


def parse_tool_calls(text: str) -> ParsedText:
    """The calls in `text` and the text around them. With calls, the content is the text
    outside them, stripped of the whitespace the blocks were laid out with; without
    calls the text is returned as it is."""
    pieces, calls, errors = [], [], []
    position = 0
    while (start := text.find(TOOL_CALL_START, position)) != -1:
        end = text.find(TOOL_CALL_END, start)
        if end == -1:
            errors.append(f"{TOOL_CALL_START} at character {start} is never closed")
            break
        block_end = end + len(TOOL_CALL_END)
        call, error = _parse_block(text[start + len(TOOL_CALL_START):end])
        if call is None:
            errors.append(f"{TOOL_CALL_START} at character {start}: {error}")
            pieces.append(text[position:block_end])
        else:
            calls.append(call)
            pieces.append(text[position:start])
        position = block_end
    pieces.append(text[position:])
    content = "".join(pieces)
    return ParsedText(content.strip() if calls else text, calls, errors)


def _parse_block(body: str) -> tuple[ToolCall | None, str]:
    """The call a block's JSON describes, or (None, why not)."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError as error:
        return None, f"the JSON does not parse ({error})"
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) \
            or not value["name"]:
        return None, 'expected {"name": "<function>", "arguments": {...}}'
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(value["name"], arguments), ""
