"""Custom agents through sessions (furlong/rollout/agentic.py), with the real `openai` client.

The agents here are written as any OpenAI-API agent is (openai.AsyncOpenAI at the
session's base URL + "/v1"); the server is a real EngineServer over `ScriptedEngine`
(tests/test_openai_api.py), whose fixed token ids include spellings that re-tokenising
would change, so the tests tell sampled tokens from re-tokenised ones. Expected
sequences are written out from the test template. tests/test_tiny_tools.py runs an agent
on the tiny model.
"""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import openai
import pytest
import torch
from test_multi_turn import ANSWER, CALL, TOKENIZER, USER, log_probs, tool_reply, weather
from test_openai_api import TOOLS, ScriptedEngine, Served, chat_prompt

from furlong.rollout import agentic
from furlong.rollout.agentic import openai_client_kwargs, request_kwargs
from furlong.sample import Sample, Status

pytestmark = pytest.mark.timeout(300)
PARAMS = {"temperature": 1.0, "top_p": 1.0, "top_k": 5, "max_new_tokens": 64, "stop": [],
          "stop_token_ids": [], "skip_special_tokens": True, "sampling_seed": 7}


def client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0)


async def tool_agent(base_url, prompt, request_kwargs, metadata):
    """A tool-calling agent: ask, run the tools the model calls, ask again."""
    messages = list(prompt)
    async with client(base_url) as chat:
        while True:
            reply = await chat.chat.completions.create(
                model="served-model", messages=messages, tools=TOOLS,
                **openai_client_kwargs(request_kwargs))
            message = reply.choices[0].message
            if not message.tool_calls:
                return {"answer": message.content, "seen_metadata": metadata}
            messages.append(message.model_dump(exclude_none=True))
            for call in message.tool_calls:
                result = await weather(call.function.name, json.loads(call.function.arguments))
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})


async def failing_agent(base_url, prompt, request_kwargs, metadata):
    async with client(base_url) as chat:
        await chat.chat.completions.create(model="m", messages=prompt, max_tokens=4)
    raise ConnectionError("the environment went away")


async def idle_agent(base_url, prompt, request_kwargs, metadata):
    return None


async def two_attempts_agent(base_url, prompt, request_kwargs, metadata):
    """Asks twice from the same prompt: the second request rewrites the history, so the
    session holds two trajectories."""
    async with client(base_url) as chat:
        for _ in range(2):
            await chat.chat.completions.create(model="m", messages=prompt,
                                               **openai_client_kwargs(request_kwargs))


async def listing_agent(base_url, prompt, request_kwargs, metadata):
    return ["not", "a", "dict"]


@pytest.fixture
def serve():
    """serve(replies) -> (Served, its ScriptedEngine); stopped after the test."""
    started = []

    def start(replies):
        engine = ScriptedEngine(TOKENIZER, replies)
        started.append(Served(engine, TOKENIZER))
        return started[-1], engine
    yield start
    for served in started:
        served.stop()


def hook_args(served: Served, agent: str) -> SimpleNamespace:
    """The attributes of HookArgs that agentic.generate reads."""
    host, port = served.url.removeprefix("http://").split(":")
    return SimpleNamespace(custom_agent_function_path=f"test_agentic:{agent}",
                           sglang_router_ip=host, sglang_router_port=int(port),
                           max_seq_len=None)


def run(served: Served, agent: str, params: dict | None = None):
    sample = Sample(group_index=4, index=2, prompt=USER, label="sunny", metadata={"row": 9})
    sample.hook_note = ["set by a hook"]  # an attribute a Miles hook added
    return asyncio.run(agentic.generate(hook_args(served, agent), sample, params or PARAMS))


def test_an_openai_agent_with_a_tool_becomes_a_sample_of_the_sampled_tokens(serve):
    served, engine = serve([CALL, ANSWER])
    sample = run(served, "tool_agent")
    prompt, reply = chat_prompt(TOKENIZER, USER, TOOLS), tool_reply("sunny in Kabul")
    assert engine.prompts == [prompt, prompt + CALL + reply]  # "ab" kept as sampled: a, b
    assert sample.tokens == prompt + CALL + reply + ANSWER
    assert sample.response_length == len(CALL + reply + ANSWER)
    assert sample.loss_mask == [1] * len(CALL) + [0] * len(reply) + [1] * len(ANSWER)
    assert sample.rollout_log_probs == pytest.approx(
        log_probs(0, len(CALL)) + [0.0] * len(reply) + log_probs(1, len(ANSWER)))
    assert sample.status == Status.COMPLETED and sample.validate() is None
    assert (sample.group_index, sample.index, sample.label, sample.prompt) == \
        (4, 2, "sunny", USER)
    assert sample.hook_note == ["set by a hook"]
    # The sampling params reach the engine, OpenAI's by keyword and SGLang's in extra_body.
    assert {(p.temperature, p.top_k, p.max_new_tokens, p.sampling_seed)
            for p in engine.params} == {(1.0, 5, 64, 7)}
    meta = sample.metadata
    assert meta["row"] == 9  # the input's
    assert meta["num_turns"] == 2 and meta["tool_call_parse_errors"] == 0  # the session's
    assert meta["retokenize_mismatch_tokens"] == 2  # "ab" re-tokenised is one token
    assert meta["answer"] == "It is sunny." and meta["seen_metadata"] == {"row": 9}  # the agent's
    assert served.server.sessions.sessions == {}  # deleted


def test_request_kwargs_are_the_chat_routes_names():
    assert request_kwargs({**PARAMS, "min_new_tokens": None, "no_such_field": 1}) == {
        "temperature": 1.0, "top_p": 1.0, "top_k": 5, "max_tokens": 64, "stop": [],
        "stop_token_ids": [], "skip_special_tokens": True, "seed": 7}
    assert openai_client_kwargs(request_kwargs(PARAMS)) == {
        "temperature": 1.0, "top_p": 1.0, "max_tokens": 64, "stop": [], "seed": 7,
        "extra_body": {"top_k": 5, "stop_token_ids": [], "skip_special_tokens": True}}
    assert openai_client_kwargs({"temperature": 0.5}) == {"temperature": 0.5}


def test_an_agents_error_stops_the_run_and_its_session_is_deleted(serve):
    served, engine = serve([ANSWER])
    with pytest.raises(ConnectionError, match="the environment went away"):
        run(served, "failing_agent")
    assert len(engine.prompts) == 1 and served.server.sessions.sessions == {}


def test_an_agent_that_never_calls_the_model_gives_the_sample_back_aborted(serve):
    served, engine = serve([ANSWER])
    sample = run(served, "idle_agent")
    assert sample.status == Status.ABORTED and sample.tokens == [] and not engine.prompts
    assert served.server.sessions.sessions == {}


def test_a_rewritten_history_gives_one_sample_per_trajectory_in_the_group(serve):
    served, engine = serve([ANSWER])
    samples = run(served, "two_attempts_agent")
    prompt = chat_prompt(TOKENIZER, USER)
    assert [s.tokens for s in samples] == [prompt + ANSWER, prompt + ANSWER]
    assert samples[0].rollout_log_probs == pytest.approx(log_probs(0, len(ANSWER)))
    assert samples[1].rollout_log_probs == pytest.approx(log_probs(1, len(ANSWER)))
    assert {(s.group_index, s.index, s.label) for s in samples} == {(4, 2, "sunny")}
    assert [s.hook_note for s in samples] == [["set by a hook"]] * 2
    assert samples[0].hook_note is not samples[1].hook_note  # each sample its own copy


def test_agent_mistakes_are_named(serve):
    served, _ = serve([ANSWER])
    with pytest.raises(ValueError, match="--custom-agent-function-path: the agent returned a list"):
        run(served, "listing_agent")
    assert served.server.sessions.sessions == {}
    args = SimpleNamespace(sglang_router_ip="127.0.0.1", sglang_router_port=1,
                           custom_agent_function_path=None, max_seq_len=None)
    with pytest.raises(ValueError, match="--custom-agent-function-path"):
        asyncio.run(agentic.generate(args, Sample(prompt=USER), PARAMS))



def routes_of(positions: int) -> torch.Tensor:
    """Made-up MoE routes (2 layers, top-2) of a sequence's first `positions` tokens, each
    token's ids telling its position."""
    index = torch.arange(positions, dtype=torch.int32)[:, None, None]
    return (index + torch.arange(4, dtype=torch.int32).view(1, 2, 2)) % 64


class RoutingEngine(ScriptedEngine):
    """Also returns the routes of every token of prompt + response but the last."""

    async def generate(self, input_ids, params, return_routed_experts=False):
        output = await super().generate(input_ids, params)
        if return_routed_experts:
            output.routed_experts = routes_of(len(input_ids) + len(output.output_ids) - 1)
        return output


@pytest.mark.parametrize("max_seq_len", [None, 20])
def test_sessions_of_a_routing_replay_run_carry_the_routes_of_every_token(max_seq_len):
    """The server (as the run's router front under --use-rollout-routing-replay) asks for
    the routes each turn; the sample carries the last turn's, which cover every token but
    the last, cut with the tokens by max_seq_len."""
    engine = RoutingEngine(TOKENIZER, [CALL, ANSWER])
    served = Served(engine, TOKENIZER, return_routed_experts=True)
    try:
        args = hook_args(served, "tool_agent")
        args.max_seq_len = max_seq_len
        sample = asyncio.run(agentic.generate(args, Sample(prompt=USER), PARAMS))
    finally:
        served.stop()
    assert sample.rollout_routed_experts.dtype == torch.int32
    assert torch.equal(sample.rollout_routed_experts, routes_of(len(sample.tokens) - 1))
    if max_seq_len is not None:
        assert len(sample.tokens) == max_seq_len


def test_sessions_record_no_routes_unless_asked(serve):
    served, _ = serve([CALL, ANSWER])
    assert run(served, "tool_agent").rollout_routed_experts is None
