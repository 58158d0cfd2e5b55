"""Reward functions and the reward hub: every type right and wrong, hooks, errors, timeouts."""
from __future__ import annotations

import asyncio
import os
import socket
import textwrap
import threading
import time

import aiohttp
import pytest
from aiohttp import web

from furlong.config.reward_types import LABELLED_REWARDS
from furlong.hooks import load_function
from furlong.rollout.rewards import TEXT_REWARDS, RewardError, RewardModel, builtin_score
from furlong.rollout.rewards.dapo import score_dapo
from furlong.rollout.rewards.f1 import score_f1
from furlong.rollout.rewards.gpqa import score_gpqa
from furlong.rollout.rewards.math import last_boxed, score_deepscaler, score_math
from furlong.rollout.rewards.remote import RemoteRewardError, remote_rm
from furlong.sample import Sample


PROMPT = "37+48=? Think step by step, then put the final answer in a box."


def make_sample(response: str, label=None, group_index: int = 3, index: int = 1,
                prompt: str = PROMPT) -> Sample:
    return Sample(group_index=group_index, index=index, prompt=prompt, response=response,
                  label=label)


def make_model(custom_rm_path: str | None = None, **overrides) -> RewardModel:
    options = dict(rm_type=None, group_rm=False, rm_url=None, timeout=10.0, on_error="raise",
                   hook_args=None, seed=0)
    custom_rm = load_function(custom_rm_path, "--custom-rm-path") if custom_rm_path else None
    return RewardModel(**{**options, **overrides}, custom_rm=custom_rm)


# --- math and deepscaler ---------------------------------------------------------------

def test_last_boxed_balances_braces_and_takes_the_last():
    assert last_boxed(r"x \boxed{1} then \boxed{\frac{a}{b}} done") == r"\frac{a}{b}"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed(r"\boxed{2} and a broken \boxed{3") == "2"
    assert last_boxed("no box here") is None


@pytest.mark.parametrize("response, label, expected", [
    (r"so \boxed{\frac{1}{2}}", "0.5", 1.0),          # symbolic, via math-verify
    (r"so \boxed{\frac{1}{2}}", "0.6", 0.0),
    (r"The sum is \boxed{85}.", "85", 1.0),
    (r"The sum is \boxed{84}.", "85", 0.0),
    (r"\boxed{\frac{a}{b}}", r"\dfrac{a}{b}", 1.0),    # nested braces, dfrac normalised
    (r"\boxed{\frac{a}{b}}", r"\frac{b}{a}", 0.0),
    (r"first \boxed{3}, finally \boxed{4}", "4", 1.0),  # the last box wins
    (r"first \boxed{4}, finally \boxed{3}", "4", 0.0),
    ("the answer is 85", "85", 0.0),                    # no box
    (r"\boxed{\text{5 } .}", "5", 1.0),
    (r"\boxed{1,000}", 1000, 1.0),
    (r"\fbox{90^\circ}", "90", 1.0),
])
def test_math(response, label, expected):
    assert score_math(response, label) == expected


def test_integer_answers_are_compared_by_value_without_math_verify(monkeypatch):
    """Guards the fast path that keeps a rollout of wrong integer answers cheap: the
    symbolic check costs milliseconds per answer, the integer comparison microseconds."""
    import furlong.rollout.rewards.math as math_reward

    def refuse(*args, **kwargs):
        raise AssertionError("math-verify was called for two integers")
    monkeypatch.setattr(math_reward.math_verify, "parse", refuse)
    assert score_math(r"\boxed{084}", "84") == 1.0
    assert score_math(r"\boxed{-7}", "-7") == 1.0
    assert score_math(r"\boxed{84}", "85") == 0.0
    with pytest.raises(AssertionError, match="two integers"):
        score_math(r"\boxed{0.5}", "1")


def test_deepscaler_counts_only_text_after_the_last_think_close():
    assert score_deepscaler(r"<think>it is \boxed{85}</think> I am not sure.", "85") == 0.0
    assert score_deepscaler(r"<think>maybe 84</think> so \boxed{85}", "85") == 1.0
    assert score_deepscaler(r"a</think>b</think> \boxed{84}", "85") == 0.0
    assert score_deepscaler(r"no thinking tags, \boxed{85}", "85") == 0.0


# --- dapo, f1, gpqa ---------------------------------------------------------------------

def test_dapo_scores_plus_minus_one_with_acc_and_pred():
    assert score_dapo("work...\nAnswer: 42", "42") == {"score": 1.0, "acc": True, "pred": "42"}
    assert score_dapo("Answer: 41\nAnswer: $x = 42$.", 42) == {"score": 1.0, "acc": True,
                                                                 "pred": "42"}
    assert score_dapo("work...\nAnswer: 41", "42") == {"score": -1.0, "acc": False,
                                                       "pred": "41"}
    assert score_dapo("I think it is 42", "42") == {"score": -1.0, "acc": False, "pred": ""}


def test_dapo_sees_only_the_last_300_characters():
    padding = "x" * 300
    assert score_dapo("Answer: 42\n" + padding, "42")["score"] == -1.0
    assert score_dapo("Answer: 42\n" + padding[:280], "42")["score"] == 1.0


def test_f1_partial_overlap_is_the_hand_computed_value():
    # response tokens [cat, sat, on, mat], label tokens [cat, on, hat]: 2 shared,
    # precision 2/4, recall 2/3, F1 = 2 * (1/2 * 2/3) / (1/2 + 2/3) = 4/7.
    assert score_f1("The cat sat on the mat!", "a cat on a hat") == pytest.approx(4 / 7)
    assert score_f1("The Cat.", "cat") == 1.0
    assert score_f1("dog", "cat") == 0.0
    assert score_f1("new york", ["paris", "New York"]) == 1.0


@pytest.mark.parametrize("response", [
    r"so the final choice is \boxed{B}", r"\boxed{(B)}", r"\boxed{\text{B}}",
    "The answer is (B).", "Answer: B", "A looks tempting, but (B) is right",
    "Between A and C I pick B",
])
def test_gpqa_reads_the_chosen_letter(response):
    assert score_gpqa(response, "B") == 1.0
    assert score_gpqa(response, 1) == 1.0          # 0-based option index
    assert score_gpqa(response, "C") == 0.0


def test_gpqa_without_a_letter_scores_zero_and_bad_labels_raise():
    assert score_gpqa("the answer is a bit unclear", "A") == 0.0
    with pytest.raises(ValueError, match="gpqa label"):
        score_gpqa("B", "E")


def test_boxed_prefix_scores_the_box_content():
    assert builtin_score("boxed_f1", r"words words \boxed{New York}", "new york") == 1.0
    assert builtin_score("f1", r"words words \boxed{New York}", "new york") < 1.0
    assert builtin_score("boxed_gpqa", r"A is wrong: \boxed{C}", "C") == 1.0
    assert builtin_score("boxed_gpqa", "A, no box", "A") == 0.0


def test_builtin_score_rejects_unknown_and_double_extracting_types():
    with pytest.raises(ValueError, match="math, deepscaler, dapo, f1, gpqa, remote_rm, random"):
        builtin_score("mathh", "x", "1")
    with pytest.raises(ValueError, match="use --rm-type math"):
        builtin_score("boxed_math", r"\boxed{1}", "1")


# --- the hub: random, custom hooks, errors ------------------------------------------------

def test_random_is_reproducible_per_sample():
    samples = [make_sample("", group_index=g, index=i) for g in range(8) for i in range(4)]
    first = asyncio.run(make_model(rm_type="random", seed=7).score_group(samples))
    again = asyncio.run(make_model(rm_type="random", seed=7).score_group(samples))
    other = asyncio.run(make_model(rm_type="random", seed=8).score_group(samples))
    assert first == again
    assert first != other
    assert set(first) == {0.0, 1.0}


HOOKS = '''
import asyncio

def exact(args, sample):
    return float(sample.response == sample.label) + args["bonus"]

async def exact_async(args, sample):
    await asyncio.sleep(0)
    return {"score": float(sample.response == sample.label), "index": sample.index}

def rank(args, samples):
    return [float(i) for i, _ in enumerate(samples)]

def too_few(args, samples):
    return [1.0]

def broken(args, sample):
    raise KeyError("no such column")

async def slow(args, sample):
    await asyncio.sleep(30)
    return 1.0
'''


@pytest.fixture
def hooks_module(tmp_path, monkeypatch):
    (tmp_path / "my_hooks.py").write_text(textwrap.dedent(HOOKS))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_hooks"


def test_load_function_names_the_flag_and_the_fix(hooks_module):
    assert load_function(f"{hooks_module}:exact", "--custom-rm-path").__name__ == "exact"
    assert load_function(f"{hooks_module}.exact", "--custom-rm-path").__name__ == "exact"
    with pytest.raises(ValueError, match="--custom-rm-path nowhere:f: cannot import.*PYTHONPATH"):
        load_function("nowhere:f", "--custom-rm-path")
    with pytest.raises(ValueError, match="no attribute 'missing'"):
        load_function(f"{hooks_module}:missing", "--custom-rm-path")
    with pytest.raises(ValueError, match="expected module.path:function"):
        load_function("justaname", "--custom-rm-path")


def test_custom_sync_and_async_hooks(hooks_module):
    samples = [make_sample("85", "85", index=0), make_sample("84", "85", index=1)]
    sync = make_model(custom_rm_path=f"{hooks_module}:exact", hook_args={"bonus": 0.5})
    assert asyncio.run(sync.score_group(samples)) == [1.5, 0.5]
    async_model = make_model(custom_rm_path=f"{hooks_module}:exact_async")
    assert asyncio.run(async_model.score_group(samples)) == [{"score": 1.0, "index": 0},
                                                             {"score": 0.0, "index": 1}]


def test_custom_group_hook_and_its_length_check(hooks_module):
    samples = [make_sample(str(i), index=i) for i in range(3)]
    model = make_model(custom_rm_path=f"{hooks_module}:rank", group_rm=True)
    assert asyncio.run(model.score_group(samples)) == [0.0, 1.0, 2.0]
    wrong = make_model(custom_rm_path=f"{hooks_module}:too_few", group_rm=True, on_error="zero")
    with pytest.raises(RewardError, match="sample group 3 .*returned 1 rewards for 3 samples"):
        asyncio.run(wrong.score_group(samples))


def test_a_raising_hook_is_an_error_naming_the_sample(hooks_module):
    model = make_model(custom_rm_path=f"{hooks_module}:broken")
    with pytest.raises(RewardError) as caught:
        asyncio.run(model.score_group([make_sample("85", "85")]))
    message = str(caught.value)
    assert message.startswith("reward for sample group 3 index 1 (prompt '37+48=? Think")
    assert "...'" in message and "KeyError" in message and "no such column" in message


def test_on_error_zero_scores_failures_zero_and_warns(hooks_module, caplog):
    model = make_model(custom_rm_path=f"{hooks_module}:broken", on_error="zero")
    assert asyncio.run(model.score_group([make_sample("85", "85")])) == [0.0]
    assert "sample group 3 index 1" in caplog.text


def test_a_hook_slower_than_the_timeout_is_an_error(hooks_module):
    """The hook would return 1.0 after 30 s: only the timeout can raise here."""
    model = make_model(custom_rm_path=f"{hooks_module}:slow", timeout=0.2)
    with pytest.raises(RewardError, match="group 3 index 1 .*timed out after 0.2s"):
        asyncio.run(model.score_group([make_sample("x")]))


# --- the process pool ------------------------------------------------------------------------

def test_builtin_rewards_off_the_main_thread():
    """Guards against math-verify's signal.alarm timeouts, which raise ValueError off the
    main thread: the rollout's event loop, or a caller of builtin_score, may run in any."""
    model = make_model(rm_type="math")
    samples = [make_sample(r"\boxed{\frac{1}{2}}", "0.5", index=0),
               make_sample(r"\boxed{3}", "0.5", index=1)]
    results = []

    def score_in_thread():
        results.append(builtin_score("math", r"\boxed{\frac{1}{2}}", "0.5"))
        results.append(asyncio.run(model.score_group(samples)))
    thread = threading.Thread(target=score_in_thread)
    try:
        thread.start()
        thread.join(timeout=60)
    finally:
        model.close()
    assert results == [1.0, [1.0, 0.0]]


def test_a_hung_worker_times_out_without_stalling_the_loop():
    """`9^{9^{8}}` keeps sympy busy for minutes. With one such sample per worker, each must
    time out, the loop must keep running meanwhile, and later samples must be scored by a
    fresh pool (the hung workers stay busy). The fresh pool's start is not charged to the
    sample's timeout, so a loaded machine does not turn the fine sample into a 0."""
    model = make_model(rm_type="math", timeout=4.0, on_error="zero")
    num_workers = min(4, os.cpu_count() or 1)
    hung = [make_sample(r"\boxed{9^{9^{8}}}", "3", index=i) for i in range(num_workers)]
    fine = make_sample(r"\boxed{3}", "3", index=num_workers)

    async def score_while_ticking():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1
        ticker = asyncio.create_task(tick())
        rewards = await model.score_group([*hung, fine])
        ticker.cancel()
        return rewards, ticks, await model.score_group([fine])

    try:
        rewards, ticks, later = asyncio.run(score_while_ticking())
    finally:
        started = time.monotonic()
        model.close()
        closing_seconds = time.monotonic() - started
    assert rewards == [0.0] * num_workers + [1.0]
    # >= 4 s of 50 ms ticks; a loop blocked by scoring would tick about once.
    assert ticks >= 10
    assert later == [1.0]
    # The hung workers are killed, not waited for (sympy would run for minutes).
    assert closing_seconds < 60


# --- remote_rm -----------------------------------------------------------------------------

async def start_reward_server(fail_first: int):
    """Reward server on 127.0.0.1 (free port): 500 for the first `fail_first` requests,
    then 1.0 if response == label else 0.0. Returns (url, runner, received payloads)."""
    received = []

    async def handle(request: web.Request) -> web.Response:
        received.append(await request.json())
        if len(received) <= fail_first:
            return web.Response(status=500, text="busy")
        payload = received[-1]
        return web.json_response(float(payload["response"] == payload["label"]))

    app = web.Application()
    app.router.add_post("/reward", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    return f"http://127.0.0.1:{sock.getsockname()[1]}/reward", runner, received


def test_remote_rm_retries_after_a_500():
    async def scenario():
        url, runner, received = await start_reward_server(fail_first=1)
        try:
            model = make_model(rm_type="remote_rm", rm_url=url)
            rewards = await model.score_group([make_sample("85", "85")])
            boxed = make_model(rm_type="boxed_remote_rm", rm_url=url)
            boxed_rewards = await boxed.score_group([make_sample(r"so \boxed{85}", "85")])
        finally:
            await runner.cleanup()
        return rewards, boxed_rewards, received

    rewards, boxed_rewards, received = asyncio.run(scenario())
    assert rewards == [1.0] and boxed_rewards == [1.0]
    assert len(received) == 3  # the 500, its retry, the boxed request
    assert received[0] == {"prompt": PROMPT, "response": "85", "label": "85"}


def test_remote_rm_names_the_url_after_the_last_retry():
    async def scenario():
        url, runner, received = await start_reward_server(fail_first=100)
        try:
            async with aiohttp.ClientSession() as session:
                with pytest.raises(RemoteRewardError, match=f"{url} failed 4 attempts.*500"):
                    await remote_rm(session, url, {"prompt": "p", "response": "r", "label": "l"},
                                    timeout=5.0, retries=3, backoff=0.01)
        finally:
            await runner.cleanup()
        return received

    assert len(asyncio.run(scenario())) == 4


def test_the_config_names_every_text_reward_and_no_other():
    """config/reward_types.py (which validation reads) and the scorers agree."""
    assert tuple(TEXT_REWARDS) == LABELLED_REWARDS
