"""Engine outputs as OpenAI's response bodies: completions and chat completions, whole or as
the chunks of a stream (server-sent events ending with `data: [DONE]`).

A choice is built once (`chat_choice`, `completion_choice`) and then laid out as a
response or as chunks, so the two agree. The engine does not stream, so a stream carries
each choice whole in one chunk, then a chunk with its finish reason. Log-probs cover
every sampled token, the stop token included (the tokens training sees); `top_logprobs`
lists the sampled token only, the one alternative the engine reports.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from furlong.engine.base import GenerateOutput
from furlong.engine.server.openai_request import OutputOptions
from furlong.engine.tool_calls import parse_tool_calls


@dataclass
class Choice:
    index: int
    output: GenerateOutput
    finish_reason: str
    text: str = ""                  # completions
    message: dict = field(default_factory=dict)  # chat: the assistant message
    tool_call_errors: list[str] = field(default_factory=list)
    logprobs: dict | None = None


@dataclass
class Header:
    """What every response and chunk of one request shares."""
    id: str
    model: str
    created: int

    @classmethod
    def new(cls, prefix: str, model: str) -> "Header":
        return cls(f"{prefix}-{uuid.uuid4().hex}", model, int(time.time()))


def chat_choice(tokenizer, index: int, output: GenerateOutput, parse: bool,
                options: OutputOptions) -> Choice:
    """With `parse` (the request gave tools), `<tool_call>` blocks become `tool_calls`
    and the finish reason 'tool_calls'; a block that does not parse stays in the content
    and is listed in `tool_call_errors`."""
    parsed = parse_tool_calls(output.text) if parse else None
    message = {"role": "assistant", "content": parsed.content if parsed else output.text}
    finish = output.finish_reason
    if parsed and parsed.tool_calls:
        message["tool_calls"] = [call.to_openai() for call in parsed.tool_calls]
        finish = "tool_calls" if finish == "stop" else finish
    logprobs = {"content": _token_logprobs(tokenizer, output, options.top_logprobs)} \
        if options.logprobs else None
    return Choice(index, output, finish, message=message, logprobs=logprobs,
                  tool_call_errors=parsed.errors if parsed else [])


def completion_choice(tokenizer, index: int, output: GenerateOutput,
                      options: OutputOptions) -> Choice:
    logprobs = None
    if options.logprobs:
        entries = _token_logprobs(tokenizer, output, options.top_logprobs)
        offsets, position = [], 0
        for entry in entries:
            offsets.append(position)
            position += len(entry["token"])
        logprobs = {"tokens": [e["token"] for e in entries],
                    "token_logprobs": [e["logprob"] for e in entries],
                    "top_logprobs": [{e["token"]: e["logprob"]} for e in entries]
                    if options.top_logprobs else None,
                    "text_offset": offsets}
    return Choice(index, output, output.finish_reason, text=output.text, logprobs=logprobs)


def _token_logprobs(tokenizer, output: GenerateOutput, top: int) -> list[dict]:
    tokens = tokenizer.batch_decode([[token] for token in output.output_ids],
                                    skip_special_tokens=False)
    entries = []
    for text, log_prob in zip(tokens, output.output_log_probs, strict=True):
        entry = {"token": text, "logprob": log_prob, "bytes": list(text.encode())}
        entries.append({**entry, "top_logprobs": [entry] if top else []})
    return entries


def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(len(choice.output.output_ids) for choice in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def chat_completion(header: Header, choices: list[Choice], prompt_ids: list[int],
                    options: OutputOptions) -> dict:
    body = {"id": header.id, "object": "chat.completion", "created": header.created,
            "model": header.model,
            "choices": [{"index": c.index, "message": c.message, "logprobs": c.logprobs,
                         "finish_reason": c.finish_reason, **_choice_extras(c, options)}
                        for c in choices],
            "usage": usage(len(prompt_ids), choices)}
    if options.return_token_ids:
        body["prompt_token_ids"] = prompt_ids
    return body


def chat_chunks(header: Header, choices: list[Choice], prompt_ids: list[int],
                options: OutputOptions) -> list[dict]:
    """The stream of a chat completion: per choice a chunk with the whole message (tool
    calls with their `index`), then one with its finish reason; the usage last if asked.
    With return_token_ids the first chunk carries prompt_token_ids."""
    def chunk(choice_list: list[dict]) -> dict:
        return {"id": header.id, "object": "chat.completion.chunk",
                "created": header.created, "model": header.model, "choices": choice_list}

    chunks = []
    for c in choices:
        delta = dict(c.message)
        if "tool_calls" in delta:
            delta["tool_calls"] = [{**call, "index": i}
                                   for i, call in enumerate(delta["tool_calls"])]
        chunks.append(chunk([{"index": c.index, "delta": delta, "logprobs": c.logprobs,
                              "finish_reason": None, **_choice_extras(c, options)}]))
        chunks.append(chunk([{"index": c.index, "delta": {}, "logprobs": None,
                              "finish_reason": c.finish_reason}]))
    if options.return_token_ids:
        chunks[0]["prompt_token_ids"] = prompt_ids
    return chunks + _usage_chunk(chunk, choices, len(prompt_ids), options)


def completion(header: Header, choices: list[Choice], prompts: list[list[int]],
               options: OutputOptions) -> dict:
    """Choice i answers prompt i // n (OpenAI's order)."""
    return {"id": header.id, "object": "text_completion", "created": header.created,
            "model": header.model,
            "choices": [{"index": c.index, "text": c.text, "logprobs": c.logprobs,
                         "finish_reason": c.finish_reason,
                         **_choice_extras(c, options, prompts[c.index // options.n])}
                        for c in choices],
            "usage": usage(sum(len(p) for p in prompts), choices)}


def completion_chunks(header: Header, choices: list[Choice], prompts: list[list[int]],
                      options: OutputOptions) -> list[dict]:
    """As chat_chunks: per choice its text, then its finish reason; the usage last."""
    def chunk(choice_list: list[dict]) -> dict:
        return {"id": header.id, "object": "text_completion", "created": header.created,
                "model": header.model, "choices": choice_list}

    chunks = []
    for c in choices:
        chunks.append(chunk([{"index": c.index, "text": c.text, "logprobs": c.logprobs,
                              "finish_reason": None,
                              **_choice_extras(c, options, prompts[c.index // options.n])}]))
        chunks.append(chunk([{"index": c.index, "text": "", "logprobs": None,
                              "finish_reason": c.finish_reason}]))
    return chunks + _usage_chunk(chunk, choices, sum(len(p) for p in prompts), options)


def _choice_extras(choice: Choice, options: OutputOptions,
                   prompt_ids: list[int] | None = None) -> dict:
    """vLLM's return_token_ids fields of a choice (completions also carry the prompt's),
    and the tool-call blocks that did not parse."""
    extras = {}
    if options.return_token_ids:
        if prompt_ids is not None:
            extras["prompt_token_ids"] = prompt_ids
        extras["token_ids"] = choice.output.output_ids
    if choice.tool_call_errors:
        extras["tool_call_errors"] = choice.tool_call_errors
    return extras


def _usage_chunk(chunk, choices: list[Choice], prompt_tokens: int,
                 options: OutputOptions) -> list[dict]:
    """stream_options.include_usage: a last chunk with no choices and the usage."""
    if not options.include_usage:
        return []
    return [{**chunk([]), "usage": usage(prompt_tokens, choices)}]
