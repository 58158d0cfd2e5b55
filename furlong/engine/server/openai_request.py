"""The bodies of OpenAI's /v1/completions and /v1/chat/completions, parsed and checked.

OpenAI's names map onto SGLang's `SamplingParams` (max_tokens -> max_new_tokens, seed ->
sampling_seed); SGLang's extra sampling fields are accepted under their own names, and
vLLM's `return_token_ids`. Fields furlong does not implement are refused with a 400
that names them, unless they are left at the value that means "off"; fields with no
effect on the output (user, metadata...) are accepted and ignored. `model` selects a
loaded LoRA adapter by its name (openai_routes.py reads it); any other value is ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field as dataclass_field

from furlong.engine.base import SamplingParams
from furlong.engine.server.request_fields import bad_request, field, is_int

# No effect on the tokens (spaces_between_special_tokens: furlong's text never has them);
# model: only when it names a LoRA adapter (read by openai_routes.py).
_IGNORED = {"model", "user", "metadata", "store", "service_tier", "parallel_tool_calls",
            "spaces_between_special_tokens"}
_SAMPLING = {"temperature", "top_p", "top_k", "max_tokens", "stop", "stop_token_ids", "seed",
             "skip_special_tokens", "no_stop_trim", "ignore_eos"}
_OUTPUT = {"n", "stream", "stream_options", "logprobs", "return_token_ids"}
# Refused unless "off": the value that means off.
_OFF = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "min_p": 0,
        "min_tokens": 0, "logit_bias": {}, "echo": False, "best_of": 1, "suffix": None,
        "response_format": {"type": "text"}}
CHAT_FIELDS = _IGNORED | _SAMPLING | _OUTPUT | set(_OFF) | {
    "messages", "tools", "tool_choice", "max_completion_tokens", "top_logprobs",
    "chat_template_kwargs"}
COMPLETION_FIELDS = _IGNORED | _SAMPLING | _OUTPUT | set(_OFF) | {"prompt"}
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class OutputOptions:
    """What the response carries besides the text."""
    n: int = 1
    stream: bool = False
    include_usage: bool = False     # stream_options.include_usage: a last chunk with usage
    logprobs: bool = False          # the sampled tokens' log-probs
    top_logprobs: int = 0           # alternatives asked per token (furlong gives the sampled one)
    return_token_ids: bool = False  # vLLM: prompt_token_ids and each choice's token_ids


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]
    tools: list[dict] | None
    parse_tool_calls: bool          # tools given and tool_choice is not "none"
    template_kwargs: dict
    params: SamplingParams          # max_new_tokens is set once the prompt length is known
    max_tokens: int | None          # None: up to the context limit
    output: OutputOptions = dataclass_field(default_factory=OutputOptions)


@dataclass(frozen=True)
class CompletionRequest:
    prompt: object                  # a string, token ids, or a list of either
    params: SamplingParams
    max_tokens: int
    output: OutputOptions = dataclass_field(default_factory=OutputOptions)


def chat_request(body: dict) -> ChatRequest:
    _check_fields(body, CHAT_FIELDS)
    tools = field(body, "tools", list, None)
    if tools is not None and not all(isinstance(tool, dict) for tool in tools):
        bad_request("tools must be a list of objects ({\"type\": \"function\", \"function\": ...})")
    tool_choice = body.get("tool_choice")
    if not (tool_choice is None or tool_choice in ("none", "auto", "required")
            or isinstance(tool_choice, dict)):
        bad_request(f"tool_choice must be 'none', 'auto', 'required' or an object, "
                    f"got {tool_choice!r}")
    logprobs = field(body, "logprobs", bool, False)
    top_logprobs = field(body, "top_logprobs", int, 0)
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS or (top_logprobs and not logprobs):
        bad_request(f"top_logprobs must be 0 to {MAX_TOP_LOGPROBS}, with logprobs true")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return ChatRequest(
        messages=_messages(body.get("messages")), tools=tools,
        parse_tool_calls=bool(tools) and tool_choice != "none",
        template_kwargs=field(body, "chat_template_kwargs", dict, {}),
        params=_sampling_params(body), max_tokens=_max_tokens(max_tokens, None),
        output=_output_options(body, logprobs, top_logprobs))


def completion_request(body: dict) -> CompletionRequest:
    _check_fields(body, COMPLETION_FIELDS)
    if body.get("prompt") is None:
        bad_request("field 'prompt' is required")
    logprobs = field(body, "logprobs", int, None)
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        bad_request(f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}")
    return CompletionRequest(body["prompt"], _sampling_params(body),
                             _max_tokens(body.get("max_tokens"), 16),
                             _output_options(body, logprobs is not None, logprobs or 0))


def _check_fields(body: dict, known: set[str]) -> None:
    unknown = set(body) - known
    if unknown:
        bad_request(f"unknown fields {sorted(unknown)}; known: {sorted(known)}")
    for name, off in _OFF.items():
        if body.get(name) not in (None, off):
            bad_request(f"{name} = {body[name]!r} is not supported; leave it out")


def _messages(messages) -> list[dict]:
    """The messages, each content given as text parts joined into one string (as vLLM
    does for text-only models)."""
    if not (isinstance(messages, list) and messages
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)):
        bad_request("messages must be a non-empty list of objects with a 'role'")
    return [_text_content(message, i) for i, message in enumerate(messages)]


def _text_content(message: dict, index: int) -> dict:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return message
    if isinstance(content, list) and all(
            isinstance(part, dict) and part.get("type") == "text"
            and isinstance(part.get("text"), str) for part in content):
        return {**message, "content": "\n".join(part["text"] for part in content)}
    bad_request(f"messages[{index}].content must be a string or a list of text parts "
                "({\"type\": \"text\", \"text\": ...}); this server serves text models")


def _max_tokens(value, default: int | None) -> int | None:
    if value is None:
        return default
    if not (is_int(value) and value >= 1):
        bad_request(f"max_tokens (or max_completion_tokens) must be an integer >= 1, "
                    f"got {value!r}")
    return value


def _sampling_params(body: dict) -> SamplingParams:
    """SamplingParams of the request; max_new_tokens is a placeholder (see ChatRequest)."""
    given = {name: body[name] for name in ("temperature", "top_p", "top_k", "stop",
                                           "stop_token_ids", "skip_special_tokens",
                                           "no_stop_trim", "ignore_eos") if name in body}
    given["sampling_seed"] = body.get("seed")
    try:
        return SamplingParams.from_dict(given).validate()
    except (ValueError, TypeError) as error:
        bad_request(str(error).replace("sampling_seed", "seed"))


def _output_options(body: dict, logprobs: bool, top_logprobs: int) -> OutputOptions:
    n = field(body, "n", int, 1)
    if n < 1:
        bad_request(f"n must be >= 1, got {n}")
    stream = field(body, "stream", bool, False)
    stream_options = field(body, "stream_options", dict, {})
    if stream_options and not stream:
        bad_request("stream_options is only for stream: true")
    include_usage = field(stream_options, "include_usage", bool, False)
    return OutputOptions(n, stream, include_usage, logprobs, top_logprobs,
                         field(body, "return_token_ids", bool, False))
