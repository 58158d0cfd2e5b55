"""The built-in multi-turn generate function with tools (furlong/rollout/multi_turn.py).

`ScriptedEngine` (tests/test_openai_api.py) answers with fixed token ids, some spelled
differently from what tokenising their text gives ("a", "b" where the tokenizer makes
"ab"), so a test can tell sampled tokens from re-tokenised ones. Expected sequences are
written out from the test template (test_openai_api.TOOL_TEMPLATE), never taken from
the code under test. The tiny model's run (tests/test_tiny_tools.py) covers a real engine.
"""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from test_openai_api import TOOLS, ScriptedEngine, chat_prompt, ids, tool_tokenizer

from furlong.rollout import multi_turn
from furlong.rollout.tools import ToolSetup, load_tool_specs
from furlong.sample import Sample, Status

TOKENIZER = tool_tokenizer()
END = TOKENIZER.convert_tokens_to_ids("<|im_end|>")
A, B = TOKENIZER.convert_tokens_to_ids("a"), TOKENIZER.convert_tokens_to_ids("b")
USER = [{"role": "user", "content": "Weather in Kabul?"}]
# "Kabul" sampled as K, a, b, u, l: tokenising the text would give K, ab, u, l.
CALL = ids(TOKENIZER, '<tool_call>{"name": "get_weather", "arguments": {"city": "K') + \
    [A, B] + ids(TOKENIZER, 'ul"}}</tool_call>') + [END]
ANSWER = ids(TOKENIZER, "It is sunny.") + [END]
PARAMS = {"temperature": 1.0, "max_new_tokens": 64, "sampling_seed": 7}


async def weather(name: str, arguments: dict) -> str:
    """The tool of these tests (--generate-execute-tool-function-path)."""
    return f"sunny in {arguments['city']}" if name == "get_weather" else "no such tool"


def tool_reply(content: str) -> list[int]:
    """The template's tokens after an assistant turn's <|im_end|>: a tool message and the
    next generation prompt."""
    return ids(TOKENIZER, f"\n<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n")


def hook_args(engine, **flags) -> SimpleNamespace:
    """The attributes of HookArgs that multi_turn.generate reads."""
    values = {"tokenizer": TOKENIZER, "engine": engine, "apply_chat_template_kwargs": None,
              "rollout_max_context_len": None, "use_rollout_routing_replay": False,
              "generate_max_turns": 4, "generate_tool_specs_path": "test_multi_turn:TOOLS",
              "generate_tool_call_parser": "qwen25",
              "generate_execute_tool_function_path": "test_multi_turn:weather"}
    return SimpleNamespace(**{**values, **flags})


def run(engine, sample: Sample | None = None, params: dict | None = None, **flags) -> Sample:
    sample = sample or Sample(group_index=3, index=1, prompt=USER, label="sunny",
                              metadata={"row": 5})
    return asyncio.run(multi_turn.generate(hook_args(engine, **flags), sample,
                                           params or PARAMS))


def log_probs(call: int, count: int) -> list[float]:
    """ScriptedEngine's log-probs of its call number `call` (from 0)."""
    return [-0.01 * (call + 1) * (i + 1) for i in range(count)]


def test_a_tool_turn_then_an_answer_keeps_the_sampled_tokens():
    engine = ScriptedEngine(TOKENIZER, [CALL, ANSWER])
    sample = run(engine)
    prompt = chat_prompt(TOKENIZER, USER, TOOLS)  # the specs are rendered into the prompt
    reply = tool_reply("sunny in Kabul")
    assert engine.prompts == [prompt, prompt + CALL + reply]
    assert sample.tokens == prompt + CALL + reply + ANSWER
    assert sample.response_length == len(CALL + reply + ANSWER)
    assert sample.loss_mask == [1] * len(CALL) + [0] * len(reply) + [1] * len(ANSWER)
    assert sample.rollout_log_probs == log_probs(0, len(CALL)) + [0.0] * len(reply) + \
        log_probs(1, len(ANSWER))
    assert sample.status == Status.COMPLETED and sample.validate() is None
    assert (sample.group_index, sample.index, sample.label) == (3, 1, "sunny")
    assert [params.sampling_seed for params in engine.params] == [7, 8]  # seed + turn
    assert sample.response == '<tool_call>{"name": "get_weather", "arguments": {"city": ' \
        '"Kabul"}}</tool_call>\ntool\nsunny in Kabul\nassistant\nIt is sunny.'
    meta = sample.metadata
    assert {k: meta[k] for k in ("row", "finish_reason", "num_turns",
                                 "tool_call_parse_errors")} == \
        {"row": 5, "finish_reason": "stop", "num_turns": 2, "tool_call_parse_errors": 0}
    user, call, tool, answer = meta["messages"]
    assert user == USER[0] and answer == {"role": "assistant", "content": "It is sunny."}
    [tool_call] = call["tool_calls"]
    assert tool_call["function"]["name"] == "get_weather"
    assert json.loads(tool_call["function"]["arguments"]) == {"city": "Kabul"}
    assert tool == {"role": "tool", "tool_call_id": tool_call["id"], "name": "get_weather",
                    "content": "sunny in Kabul"}


def test_a_string_prompt_keeps_the_data_loaders_tokens(tmp_path):
    """A rendered prompt (the manager's `prompt` under --apply-chat-template) is not
    rendered again: its tokens are the sample's, tools or not."""
    specs = tmp_path / "tools.json"
    specs.write_text(json.dumps(TOOLS))
    text = TOKENIZER.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    prompt = ids(TOKENIZER, text)
    engine = ScriptedEngine(TOKENIZER, [CALL, ANSWER])
    sample = run(engine, Sample(group_index=0, index=0, prompt=text, tokens=prompt),
                 generate_tool_specs_path=str(specs))
    assert engine.prompts[0] == prompt
    assert sample.tokens == prompt + CALL + tool_reply("sunny in Kabul") + ANSWER
    assert sample.metadata["messages"][0]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_a_malformed_call_is_answered_with_an_error_and_the_model_retries():
    bad = ids(TOKENIZER, '<tool_call>{"name": get_weather}</tool_call>') + [END]
    engine = ScriptedEngine(TOKENIZER, [bad, CALL, ANSWER])
    sample = run(engine)
    assert sample.status == Status.COMPLETED
    assert sample.metadata["tool_call_parse_errors"] == 1
    assert sample.metadata["num_turns"] == 3
    error = sample.metadata["messages"][2]
    assert error["role"] == "tool" and error["content"].startswith(
        "error: <tool_call> at character 0: the JSON does not parse")
    prompt = chat_prompt(TOKENIZER, USER, TOOLS)
    assert engine.prompts[1] == prompt + bad + tool_reply(error["content"])


def test_arguments_that_are_not_an_object_are_an_error_not_a_call():
    listed = ids(TOKENIZER, '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>')
    engine = ScriptedEngine(TOKENIZER, [listed + [END], ANSWER])
    sample = run(engine)
    assert sample.metadata["tool_call_parse_errors"] == 1
    assert sample.metadata["messages"][2]["content"] == \
        "error: the arguments of get_weather are not a JSON object"


def test_the_turn_limit_ends_the_sample_truncated_without_running_its_calls():
    engine = ScriptedEngine(TOKENIZER, [CALL])  # calls the tool every turn
    sample = run(engine, generate_max_turns=2)
    reply = tool_reply("sunny in Kabul")
    assert len(engine.prompts) == 2
    assert sample.tokens == chat_prompt(TOKENIZER, USER, TOOLS) + CALL + reply + CALL
    assert sample.status == Status.TRUNCATED
    assert sample.metadata["finish_reason"] == "max_turns"
    assert sample.metadata["num_turns"] == 2


def test_tool_replies_that_leave_no_room_end_the_sample_truncated():
    prompt = chat_prompt(TOKENIZER, USER, TOOLS)
    limit = len(prompt) + len(CALL) + len(tool_reply("sunny in Kabul"))  # no token left
    engine = ScriptedEngine(TOKENIZER, [CALL, ANSWER], max_context_len=limit)
    sample = run(engine)
    assert len(engine.prompts) == 1
    assert sample.tokens == prompt + CALL and sample.loss_mask == [1] * len(CALL)
    assert sample.status == Status.TRUNCATED
    assert sample.metadata["finish_reason"] == "length"


def test_the_context_caps_each_turn_and_a_cut_turn_ends_the_sample():
    prompt = chat_prompt(TOKENIZER, USER, TOOLS)
    engine = ScriptedEngine(TOKENIZER, [CALL, ANSWER])
    sample = run(engine, rollout_max_context_len=len(prompt) + 5)  # wins over the engine's
    assert [params.max_new_tokens for params in engine.params] == [5]
    assert sample.tokens == prompt + CALL[:5]
    assert sample.status == Status.TRUNCATED
    assert sample.metadata["finish_reason"] == "length"


def test_an_abort_returns_the_sample_as_it_came():
    class Aborting(ScriptedEngine):
        async def generate(self, input_ids, params, return_routed_experts=False):
            output = await super().generate(input_ids, params, return_routed_experts)
            output.finish_reason = "abort" if len(self.prompts) == 2 else output.finish_reason
            return output

    sample = Sample(group_index=0, index=0, prompt=USER, tokens=[1, 2], metadata={"row": 1})
    aborted = run(Aborting(TOKENIZER, [CALL, ANSWER]), sample)
    assert aborted.status == Status.ABORTED
    assert (aborted.tokens, aborted.response_length, aborted.metadata) == \
        ([1, 2], 0, {"row": 1})
    assert sample.status == Status.PENDING  # the caller's sample is not changed


def test_a_turn_without_its_end_token_ends_the_sample():
    """A stop string leaves no end-of-turn token after which the template could write the
    tool replies: the sample ends there instead of continuing from re-rendered text."""
    class StoppedByString(ScriptedEngine):
        async def generate(self, input_ids, params, return_routed_experts=False):
            output = await super().generate(input_ids, params, return_routed_experts)
            output.finish_reason = "stop"
            return output

    engine = StoppedByString(TOKENIZER, [CALL[:-1]])  # the call without <|im_end|>
    sample = run(engine)
    assert len(engine.prompts) == 1 and sample.status == Status.COMPLETED
    assert sample.metadata["finish_reason"] == "stop"
    assert sample.tokens == chat_prompt(TOKENIZER, USER, TOOLS) + CALL[:-1]


def test_flags_are_checked_by_name(tmp_path):
    with pytest.raises(ValueError, match="--generate-execute-tool-function-path"):
        ToolSetup.load(None, None, None)
    with pytest.raises(ValueError, match="--generate-tool-call-parser llama3"):
        ToolSetup.load(None, "llama3", "test_multi_turn:weather")
    with pytest.raises(ValueError, match="--generate-tool-specs-path test_multi_turn:MISSING"):
        load_tool_specs("test_multi_turn:MISSING")
    (tmp_path / "bad.json").write_text('{"type": "function"}')
    with pytest.raises(ValueError, match="expected a list of tool specs"):
        load_tool_specs(str(tmp_path / "bad.json"))
    assert load_tool_specs("test_multi_turn:tool_specs") == TOOLS  # a function works too
    with pytest.raises(ValueError, match="--generate-max-turns must be an integer >= 1"):
        run(ScriptedEngine(TOKENIZER, [ANSWER]), generate_max_turns=0)


def tool_specs() -> list[dict]:
    return TOOLS
