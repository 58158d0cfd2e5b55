"""Sessions of exact tokens (engine/server/sessions.py) through the real `openai` client.

A ScriptedEngine answers with fixed token ids, some of them spelled differently from
what tokenising their text gives ("a", "b" where the tokenizer makes "ab"), so a test can
tell recorded tokens from re-tokenised ones. Expected token sequences are written out by
hand from the test template (test_openai_api.TOOL_TEMPLATE), never taken from the server.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import openai
import pytest
import requests
from test_openai_api import (MESSAGES, TIMEOUT_S, TOOLS, ScriptedEngine, Served, chat_prompt,
                             ids, tool_tokenizer)
from transformers import AutoTokenizer

from furlong.engine.hf_engine import HFEngine
from furlong.engine.router import EngineRouter, RouterOptions
from furlong.engine.router.routing import Affinity, session_affinity
from furlong.engine.router.slots import EngineSlot, EngineState
from furlong.model.loading import load_hf_model

pytestmark = pytest.mark.timeout(300)
TOKENIZER = tool_tokenizer()
END = TOKENIZER.convert_tokens_to_ids("<|im_end|>")
A, B = TOKENIZER.convert_tokens_to_ids("a"), TOKENIZER.convert_tokens_to_ids("b")


def open_session(served: Served) -> tuple[str, openai.OpenAI]:
    session_id = requests.post(served.url + "/sessions", timeout=TIMEOUT_S).json()["session_id"]
    return session_id, served.client(f"/sessions/{session_id}/v1")


def samples(served: Served, session_id: str, **body) -> dict:
    answer = requests.post(f"{served.url}/sessions/{session_id}/samples", json=body,
                           timeout=TIMEOUT_S)
    assert answer.status_code == 200, answer.text
    return answer.json()


def log_probs(call: int, count: int) -> list[float]:
    """ScriptedEngine's log-probs of its call number `call` (from 0)."""
    return [-0.01 * (call + 1) * (i + 1) for i in range(count)]


@pytest.fixture
def serve():
    """serve(replies, **server_kwargs) -> (Served, its ScriptedEngine); stopped after."""
    started = []

    def start(replies, **kwargs):
        engine = ScriptedEngine(TOKENIZER, replies)
        started.append(Served(engine, TOKENIZER, **kwargs))
        return started[-1], engine
    yield start
    for served in started:
        served.stop()


def test_a_tool_turn_appends_only_the_tool_messages_tokens(serve):
    # "Kabul" sampled as K, a, b, u, l: tokenising the text would give K, ab, u, l.
    call = ids(TOKENIZER, '<tool_call>{"name": "get_weather", "arguments": {"city": "K') + \
        [A, B] + ids(TOKENIZER, 'ul"}}</tool_call>') + [END]
    answer = ids(TOKENIZER, "It is sunny.") + [END]
    served, engine = serve([call, answer])
    session_id, client = open_session(served)
    messages = [{"role": "user", "content": "Weather in Kabul?"}]
    first = client.chat.completions.create(model="m", messages=messages, tools=TOOLS)
    assert first.choices[0].finish_reason == "tool_calls"
    tool_call = first.choices[0].message.tool_calls[0]
    assert json.loads(tool_call.function.arguments) == {"city": "Kabul"}

    messages += [first.choices[0].message.model_dump(),  # as agents send it back
                 {"role": "tool", "tool_call_id": tool_call.id, "content": "sunny"}]
    chunks = list(client.chat.completions.create(model="m", messages=messages, tools=TOOLS,
                                                 stream=True))
    assert chunks[0].choices[0].delta.content == "It is sunny."

    appended = ids(TOKENIZER, "\n<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>assistant\n")
    assert engine.prompts[1] == engine.prompts[0] + call + appended
    [sample] = samples(served, session_id)["samples"]
    prompt = engine.prompts[0]
    assert sample["tokens"] == prompt + call + appended + answer
    assert sample["response_length"] == len(call + appended + answer)
    assert sample["loss_mask"] == [1] * len(call) + [0] * len(appended) + [1] * len(answer)
    assert sample["rollout_log_probs"] == pytest.approx(
        log_probs(0, len(call)) + [0.0] * len(appended) + log_probs(1, len(answer)))
    assert sample["status"] == "completed"
    meta = sample["metadata"]
    assert [m["role"] for m in meta["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert meta["messages"][-1]["content"] == "It is sunny."
    assert (meta["num_turns"], meta["finish_reason"]) == (2, "stop")
    # Re-rendering spells "Kabul" K, ab, u, l: two recorded tokens differ from one.
    assert meta["retokenize_mismatch_tokens"] == 2


def test_a_template_that_drops_think_blocks_keeps_the_recorded_ones(serve):
    thought = ids(TOKENIZER, "<think>hm</think>42") + [END]
    served, engine = serve([thought, ids(TOKENIZER, "7") + [END]])
    session_id, client = open_session(served)
    first = client.chat.completions.create(model="m", messages=MESSAGES)
    assert first.choices[0].message.content == "<think>hm</think>42"
    follow_up = [*MESSAGES, {"role": "assistant", "content": "<think>hm</think>42"},
                 {"role": "user", "content": "and?"}]
    client.chat.completions.create(model="m", messages=follow_up)
    appended = ids(TOKENIZER, "\n<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\n")
    assert engine.prompts[1] == engine.prompts[0] + thought + appended
    [sample] = samples(served, session_id)["samples"]
    # The template renders the first answer without <think>, h, m, </think>: 4 tokens.
    assert sample["metadata"]["retokenize_mismatch_tokens"] == 4


def test_a_rewritten_history_starts_a_new_trajectory(serve):
    reply = ids(TOKENIZER, "42") + [END]
    served, engine = serve([reply])
    session_id, client = open_session(served)
    other = [{"role": "user", "content": "What else?"}]
    for messages in (MESSAGES, other, MESSAGES):  # the last one retries the first turn
        client.chat.completions.create(model="m", messages=messages)
    reply_text = samples(served, session_id)
    assert [s["tokens"] for s in reply_text["samples"]] == [
        chat_prompt(TOKENIZER, m) + reply for m in (MESSAGES, other, MESSAGES)]
    assert engine.prompts == [chat_prompt(TOKENIZER, m) for m in (MESSAGES, other, MESSAGES)]
    assert reply_text["metrics"] == {"session/retokenize_mismatch_tokens": 0}


def test_unknown_sessions_are_404_and_n_is_one(serve):
    served, _ = serve([[END]])
    with pytest.raises(openai.NotFoundError, match="session not found: session_id=nope"):
        served.client("/sessions/nope/v1").chat.completions.create(model="m", messages=MESSAGES)
    answer = requests.post(served.url + "/sessions/nope/samples", timeout=TIMEOUT_S)
    assert answer.status_code == 404
    assert answer.json()["error"].startswith("session not found: session_id=nope")
    session_id, client = open_session(served)
    with pytest.raises(openai.BadRequestError, match="n: a session records one response"):
        client.chat.completions.create(model="m", messages=MESSAGES, n=2)
    url = f"{served.url}/sessions/{session_id}"
    assert requests.delete(url, timeout=TIMEOUT_S).status_code == 204
    assert requests.delete(url, timeout=TIMEOUT_S).status_code == 404
    assert requests.post(url + "/samples", timeout=TIMEOUT_S).status_code == 404


def test_a_turn_beyond_the_context_ends_the_sample_truncated(serve):
    reply = ids(TOKENIZER, "42") + [END]
    prompt = chat_prompt(TOKENIZER, MESSAGES)
    # Room for the first turn and 4 more tokens: not for the next user message.
    served, engine = serve([reply], max_context_len=len(prompt + reply) + 4)
    session_id, client = open_session(served)
    client.chat.completions.create(model="m", messages=MESSAGES)
    follow_up = [*MESSAGES, {"role": "assistant", "content": "42"},
                 {"role": "user", "content": "and?"}]
    second = client.chat.completions.create(model="m", messages=follow_up).choices[0]
    assert (second.finish_reason, second.message.content) == ("length", "")
    assert len(engine.prompts) == 1  # nothing was generated
    [sample] = samples(served, session_id)["samples"]
    assert sample["tokens"] == prompt + reply
    assert (sample["status"], sample["metadata"]["finish_reason"]) == ("truncated", "length")

    # max_seq_len cuts a sample at the training side's limit.
    [cut] = samples(served, session_id, max_seq_len=len(prompt) + 1)["samples"]
    assert (cut["tokens"], cut["loss_mask"], cut["status"]) == \
        (prompt + reply[:1], [1], "truncated")


def test_a_response_cut_by_max_tokens_ends_its_trajectory(serve):
    reply = ids(TOKENIZER, "42") + [END]
    served, engine = serve([reply])
    session_id, client = open_session(served)
    cut = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1).choices[0]
    assert cut.finish_reason == "length"
    follow_up = [*MESSAGES, {"role": "assistant", "content": "4"},
                 {"role": "user", "content": "go on"}]
    client.chat.completions.create(model="m", messages=follow_up)
    # The cut response has no end-of-turn token to continue after: a new trajectory.
    assert engine.prompts[1] == chat_prompt(TOKENIZER, follow_up)
    first, second = samples(served, session_id)["samples"]
    assert (first["tokens"], first["status"]) == (engine.prompts[0] + reply[:1], "truncated")
    assert second["tokens"] == engine.prompts[1] + reply


def test_a_session_over_the_hf_engine_records_what_it_sampled(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    served = Served(HFEngine(load_hf_model(str(tiny / "model")), tokenizer), tokenizer)
    try:
        session_id, client = open_session(served)
        completion = client.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=5, seed=2, logprobs=True,
            extra_body={"return_token_ids": True}).model_dump()
        [sample] = samples(served, session_id)["samples"]
    finally:
        served.stop()
    [choice] = completion["choices"]
    assert sample["tokens"] == completion["prompt_token_ids"] + choice["token_ids"]
    assert sample["loss_mask"] == [1] * len(choice["token_ids"])
    assert sample["rollout_log_probs"] == [e["logprob"] for e in choice["logprobs"]["content"]]


# ---- sessions behind the EngineRouter -------------------------------------------------------

def test_affinity_keeps_a_session_on_its_engine():
    engines = [EngineSlot(0, None), EngineSlot(1, None)]
    affinity = Affinity()
    with session_affinity("s"):
        first = affinity.choose((1, 2), engines)
        affinity.pin((1, 2), first)
        affinity.unpin((1, 2), first)
    first.outstanding = 3  # busier than the other engine from now on
    with session_affinity("s"):
        assert affinity.choose((1, 2, 3, 4), engines) is first
    assert affinity.choose((1, 2, 3, 4), engines) is engines[1]  # no session: least loaded
    first.state = EngineState.RECOVERING
    with session_affinity("s"):  # its engine left: another one, which it keeps
        moved = affinity.choose((1, 2, 3, 4, 5), engines)
        affinity.pin((1, 2, 3, 4, 5), moved)
    first.state = EngineState.SERVING
    first.outstanding = 0
    with session_affinity("s"):
        assert affinity.choose((1, 2, 3, 4, 5, 6), engines) is moved is engines[1]


def test_sessions_through_the_router_stay_on_one_engine(serve):
    reply = ids(TOKENIZER, "42") + [END]
    backends = [serve([reply]) for _ in range(2)]
    router = EngineRouter([served.url for served, _ in backends],
                          RouterOptions(health_check_interval_s=None))
    router.model = SimpleNamespace(config=SimpleNamespace(vocab_size=len(TOKENIZER)))
    front = Served(router, TOKENIZER, max_context_len=4096)
    try:
        session_id, client = open_session(front)
        conversation = list(MESSAGES)
        for turn in range(3):
            answer = client.chat.completions.create(model="m", messages=conversation)
            conversation += [answer.choices[0].message.model_dump(),
                             {"role": "user", "content": f"more {turn}"}]
            router.engines[0].outstanding = 5  # engine 1 looks idle, engine 0 busy
        fresh_id, fresh = open_session(front)
        fresh.chat.completions.create(model="m", messages=MESSAGES)
        router.engines[0].outstanding = 0
        [sample] = samples(front, session_id)["samples"]
    finally:
        front.stop()
    first_engine, second_engine = (engine for _, engine in backends)
    assert len(first_engine.prompts) == 3  # all turns of the session
    assert second_engine.prompts == [chat_prompt(TOKENIZER, MESSAGES)]  # the new session
    assert sample["tokens"] == first_engine.prompts[2] + reply
    assert first_engine.prompts[1][:len(first_engine.prompts[0])] == first_engine.prompts[0]


# ---- the chat template functions ------------------------------------------------------------

def test_differing_tokens_counts_each_change_once():
    from furlong.engine.server.chat_template import differing_tokens
    assert differing_tokens([1, 2, 3], [1, 2, 3]) == 0
    assert differing_tokens([1, 2, 3], [1, 9, 3]) == 1        # replaced
    assert differing_tokens([1, 2, 3], [1, 3]) == 1           # removed
    assert differing_tokens([1, 5, 6, 2, 3], [1, 2, 3]) == 2  # two inserted
    assert differing_tokens([7, 8], [9]) == 2                 # "a", "b" against "ab"
    assert differing_tokens([], [4, 4]) == 2


def test_an_end_token_that_opens_the_next_message():
    """Templates like GLM's write no closing after a response: the stop token the model
    samples is the next message's opener, so the appended ids start after it."""
    from furlong.engine.server.chat_template import continuation_ids

    tokenizer = tool_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    opener = tokenizer.convert_tokens_to_ids("<|im_start|>")
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "42"}]
    appended = [{"role": "tool", "content": "sunny"}]
    assert continuation_ids(tokenizer, history, appended, opener, None, {}) == \
        ids(tokenizer, "tool\nsunny<|im_start|>assistant\n")
    # A template that never writes the end token: no continuation.
    assert continuation_ids(tokenizer, history, appended, END, None, {}) is None
