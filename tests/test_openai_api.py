"""OpenAI's API on the engine server, through the real `openai` client (CPU).

The tiny model behind an HFEngine gives the real path: its outputs are compared with an
in-process HFEngine on the same weights and seeds, never with the server. Tool calls need
text the tiny tokenizer cannot spell, so those tests serve `ScriptedEngine` (fixed token
ids) with `tool_tokenizer()`: characters, a few words, and a Qwen-like chat template with
tools, tool messages and `<think>` blocks dropped before the last user message (as
Qwen3 does). tests/test_sessions.py uses the same helpers.
"""
from __future__ import annotations

import asyncio
import json
import re
import string
import threading
from types import SimpleNamespace

import openai
import pytest
import requests
from aiohttp import web
from transformers import AutoTokenizer

from furlong.engine.base import GenerateOutput, SamplingParams
from furlong.engine.hf_engine import HFEngine
from furlong.engine.server.app import EngineServer
from furlong.engine.stops import response_text
from furlong.model.loading import load_hf_model

pytestmark = pytest.mark.timeout(300)
TIMEOUT_S = 120
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]

# ---- helpers shared with test_sessions.py ---------------------------------------------------

_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_WORDS = ("<tool_call>", "</tool_call>", "<think>", "</think>", "user", "assistant", "system",
          "tool", "ab", "\n")
_CHARS = tuple(c for c in string.printable if c not in "\r\x0b\x0c\n")
TOOL_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}"
    "{% endif %}{% endfor %}"
    "{%- if tools %}<|im_start|>system\nTools:{% for tool in tools %} {{ tool.function.name }}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{%- set content = m.content or '' %}"
    "{%- if loop.index0 < ns.last_user and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "<|im_start|>assistant\n{{ content }}"
    "{%- for call in m.tool_calls or [] %}<tool_call>{\"name\": \"{{ call.function.name }}\", "
    "\"arguments\": {{ call.function.arguments }}}</tool_call>{% endfor %}"
    "<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tool_tokenizer():
    """Every printable character a token, plus the words above ("ab" too, so a response
    sampled as "a", "b" is not what re-tokenising its text gives)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*_SPECIAL, "<unk>", *_WORDS, *_CHARS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words = sorted(_WORDS, key=len, reverse=True)
    pattern = "|".join(re.escape(word) for word in words) + "|."
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(_SPECIAL))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>")
    fast.chat_template = TOOL_TEMPLATE
    return fast


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class ScriptedEngine:
    """An Engine that answers each call with the next scripted token ids (cut at
    max_new_tokens: finish 'length'; ending with <|im_end|>: 'stop'), log-probs
    -0.01 * (call number + 1) * (position + 1), and records every prompt and params."""

    def __init__(self, tokenizer, replies: list[list[int]], max_context_len: int = 4096):
        self.tokenizer = tokenizer
        self.replies = list(replies)
        self.prompts: list[list[int]] = []
        self.params: list[SamplingParams] = []
        self.max_context_len = max_context_len
        self.model = SimpleNamespace(config=SimpleNamespace(vocab_size=len(tokenizer)))
        self.eos_ids = {tokenizer.eos_token_id}

    async def generate(self, input_ids, params, return_routed_experts=False):
        call = len(self.prompts)
        self.prompts.append(list(input_ids))
        self.params.append(params)
        reply = self.replies[call % len(self.replies)]
        output = reply[:params.max_new_tokens]
        finish = "stop" if output and output[-1] in self.eos_ids else "length"
        log_probs = [-0.01 * (call + 1) * (i + 1) for i in range(len(output))]
        text = response_text(self.tokenizer, output, params, finish, self.eos_ids)
        return GenerateOutput(output, log_probs, finish, text, len(input_ids))

    async def abort_all(self):
        pass

    async def health(self):
        return True

    async def close(self):
        pass


class Served:
    """An EngineServer over `engine` at 127.0.0.1 on a free port, its event loop in a
    daemon thread; `kwargs` go to EngineServer."""

    def __init__(self, engine, tokenizer, model_path: str = "served-model", **kwargs):
        self.server = EngineServer(engine, tokenizer, str(model_path), **kwargs)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = self.server.app_runner()
        self.call(self._start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def _start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(TIMEOUT_S)

    def client(self, path: str = "/v1") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + path, api_key="unused", max_retries=0,
                             timeout=TIMEOUT_S)

    def stop(self) -> None:
        self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT_S)
        self.loop.close()


# ---- the tiny model behind an HFEngine ------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny / "model")


@pytest.fixture(scope="module")
def hf_server(tiny, tokenizer):
    served = Served(HFEngine(load_hf_model(str(tiny / "model")), tokenizer), tokenizer,
                    tiny / "model")
    yield served
    served.stop()


@pytest.fixture(scope="module")
def reference(tiny, tokenizer):
    """Outputs of an in-process HFEngine on the same weights: reference(prompt, params)."""
    engine = HFEngine(load_hf_model(str(tiny / "model")), tokenizer)
    return lambda prompt, params: asyncio.run(engine.generate(prompt, params))


def chat_prompt(tokenizer, messages, tools=None) -> list[int]:
    return ids(tokenizer, tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True))


MESSAGES = [{"role": "user", "content": "37+48="}]


def test_models_lists_the_served_model(hf_server, tiny):
    models = hf_server.client().models.list().data
    assert [model.id for model in models] == [str(tiny / "model")]
    assert models[0].model_extra["max_model_len"] == 128  # max_position_embeddings


def test_chat_completion_is_the_engines_output(hf_server, tokenizer, reference):
    completion = hf_server.client().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, seed=3, logprobs=True, top_logprobs=1,
        extra_body={"return_token_ids": True}).model_dump()
    prompt = chat_prompt(tokenizer, MESSAGES)
    expected = reference(prompt, SamplingParams(max_new_tokens=6, sampling_seed=3))
    [choice] = completion["choices"]
    assert completion["prompt_token_ids"] == prompt
    assert choice["token_ids"] == expected.output_ids
    assert choice["message"] == {**choice["message"], "role": "assistant",
                                 "content": expected.text, "tool_calls": None}
    assert choice["finish_reason"] == expected.finish_reason
    entries = choice["logprobs"]["content"]
    assert [e["token"] for e in entries] == [tokenizer.decode([t]) for t in expected.output_ids]
    assert [e["logprob"] for e in entries] == pytest.approx(expected.output_log_probs, abs=1e-4)
    assert all(e["top_logprobs"] == [{k: e[k] for k in ("token", "logprob", "bytes")}]
               for e in entries)
    assert completion["usage"] == {**completion["usage"], "prompt_tokens": len(prompt),
                                   "completion_tokens": len(expected.output_ids),
                                   "total_tokens": len(prompt) + len(expected.output_ids)}


def test_chat_stream_carries_the_same_response(hf_server, tokenizer):
    client = hf_server.client()
    request = dict(model="tiny", messages=MESSAGES, max_tokens=6, seed=5)
    whole = client.chat.completions.create(**request).choices[0]
    chunks = list(client.chat.completions.create(
        **request, stream=True, stream_options={"include_usage": True},
        extra_body={"return_token_ids": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert content == whole.message.content
    assert finishes[-1] == whole.finish_reason and finishes[:-1] == [None] * (len(finishes) - 1)
    assert chunks[0].model_extra["prompt_token_ids"] == chat_prompt(tokenizer, MESSAGES)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        len(chunks[0].choices[0].model_extra["token_ids"])


def test_completions_batch_n_seeds_and_logprobs(hf_server, tokenizer, reference):
    client = hf_server.client()
    prompts = ["1+2=", "5"]
    completion = client.completions.create(
        model="tiny", prompt=prompts, n=2, seed=11, max_tokens=4, logprobs=1,
        extra_body={"return_token_ids": True}).model_dump()
    assert [c["index"] for c in completion["choices"]] == [0, 1, 2, 3]
    for choice in completion["choices"]:
        prompt = tokenizer.encode(prompts[choice["index"] // 2])
        seed = 11 + choice["index"] % 2  # choice j of a prompt samples with seed + j
        expected = reference(prompt, SamplingParams(max_new_tokens=4, sampling_seed=seed))
        assert choice["prompt_token_ids"] == prompt
        assert (choice["token_ids"], choice["text"], choice["finish_reason"]) == \
            (expected.output_ids, expected.text, expected.finish_reason)
        assert choice["logprobs"]["token_logprobs"] == \
            pytest.approx(expected.output_log_probs, abs=1e-4)
    by_ids = client.completions.create(model="tiny", prompt=tokenizer.encode("1+2="), seed=11,
                                       max_tokens=4)
    assert by_ids.choices[0].text == completion["choices"][0]["text"]
    streamed = list(client.completions.create(model="tiny", prompt="1+2=", seed=11,
                                              max_tokens=4, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == completion["choices"][0]["text"]


def test_max_tokens_stop_and_temperature(hf_server):
    client = hf_server.client()

    def chat(**fields):
        return client.chat.completions.create(model="tiny", messages=MESSAGES, **fields)
    short = chat(max_completion_tokens=2, seed=1)
    assert (short.choices[0].finish_reason, short.usage.completion_tokens) == ("length", 2)
    greedy = [chat(temperature=0, max_tokens=8).choices[0].message.content for _ in range(2)]
    assert greedy[0] == greedy[1] and greedy[0]
    stopped = chat(temperature=0, max_tokens=8, stop=[greedy[0][0]]).choices[0]
    assert (stopped.message.content, stopped.finish_reason) == ("", "stop")


def test_bad_requests_say_what_is_wrong(hf_server):
    client = hf_server.client()
    cases = [({"extra_body": {"frobnicate": 1}}, "frobnicate"),
             ({"presence_penalty": 0.5}, "presence_penalty"),
             ({"top_logprobs": 2}, "top_logprobs"),
             ({"messages": [{"role": "user", "content": "1+2=" * 40}]},
              "maximum context length is 128 tokens")]
    for fields, message in cases:
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(**{"model": "tiny", "messages": MESSAGES, **fields})
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="tiny", prompt="1+2=", echo=True)


# ---- tool calls, from a scripted engine -----------------------------------------------------

CALL_TEXT = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


@pytest.fixture
def scripted():
    """(a Served ScriptedEngine that answers with CALL_TEXT, then a broken call)."""
    tokenizer = tool_tokenizer()
    broken = '<tool_call>{"name": "get_weather", "arguments": {"city": }</tool_call>'
    engine = ScriptedEngine(tokenizer, [ids(tokenizer, CALL_TEXT + "<|im_end|>"),
                                        ids(tokenizer, "I see " + broken + "<|im_end|>")])
    served = Served(engine, tokenizer)
    yield served, engine, broken
    served.stop()


def test_tool_calls_are_parsed_and_tools_rendered(scripted):
    served, engine, broken = scripted
    client = served.client()
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    completion = client.chat.completions.create(model="m", messages=messages, tools=TOOLS)
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == ""
    [call] = choice.message.tool_calls
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == \
        ("function", "get_weather", {"city": "Paris"})
    assert engine.prompts[0] == chat_prompt(engine.tokenizer, messages, TOOLS)
    assert "Tools: get_weather" in engine.tokenizer.decode(engine.prompts[0])

    # A block that does not parse stays in the content, and the choice says why.
    second = client.chat.completions.create(model="m", messages=messages, tools=TOOLS)
    assert second.choices[0].message.content == "I see " + broken
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].finish_reason == "stop"
    assert "does not parse" in second.choices[0].model_extra["tool_call_errors"][0]

    # Streamed: the call arrives whole, with its index.
    chunks = list(client.chat.completions.create(model="m", messages=messages, tools=TOOLS,
                                                 stream=True))
    [delta_call] = chunks[0].choices[0].delta.tool_calls
    assert (delta_call.index, delta_call.function.name) == (0, "get_weather")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # tool_choice "none": the text is the content.
    plain = client.chat.completions.create(model="m", messages=messages, tools=TOOLS,
                                           tool_choice="none").choices[0]
    assert "<tool_call>" in plain.message.content and plain.message.tool_calls is None


def test_openai_routes_share_the_api_key(tiny, tokenizer):
    served = Served(HFEngine(load_hf_model(str(tiny / "model")), tokenizer), tokenizer,
                    api_key="secret")
    try:
        assert requests.get(served.url + "/v1/models", timeout=TIMEOUT_S).status_code == 401
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="secret", max_retries=0)
        assert client.models.list().data[0].id == "served-model"
    finally:
        served.stop()


def test_tool_call_parser():
    from furlong.engine.tool_calls import ToolCall, parse_tool_calls

    text = ('Let me look.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>{"name": "b", "parameters": {"y": "é"}}</tool_call>')
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls == [ToolCall("a", '{"x": 1}'), ToolCall("b", '{"y": "é"}')]
    assert (parsed.content, parsed.errors) == ("Let me look.", [])
    assert parse_tool_calls("no calls ").content == "no calls "  # untouched without calls
    assert parse_tool_calls('<tool_call>{"name": "c", "arguments": "{}"}</tool_call>'
                            ).tool_calls == [ToolCall("c", "{}")]  # a string stays a string
    for broken, why in [('<tool_call>{"name": "a", </tool_call>', "does not parse"),
                        ('<tool_call>{"arguments": {}}</tool_call>', '"name"'),
                        ('<tool_call>{"name": "a"', "never closed")]:
        parsed = parse_tool_calls("ok " + broken)
        assert (parsed.content, parsed.tool_calls) == ("ok " + broken, [])
        assert len(parsed.errors) == 1 and why in parsed.errors[0]
    mixed = parse_tool_calls('<tool_call>{"name": "a"}</tool_call> <tool_call>x</tool_call>')
    assert mixed.tool_calls == [ToolCall("a", "{}")]
    assert mixed.content == "<tool_call>x</tool_call>" and len(mixed.errors) == 1
