"""Hooks written for Miles run unchanged where they use only `args` and `Sample`: a generate
hook posting SGLang requests to args.sglang_router_ip:args.sglang_router_port, single and
batched rewards and a filter in Miles' signatures, and a rollout function in Miles' legacy
form (sync, its own event loop, data_source.get_samples, Miles' output objects)."""
from __future__ import annotations

import asyncio
import importlib
import textwrap
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import torch

from furlong import cli
from furlong.build import build_router
from furlong.checkpoint import load_state
from furlong.config import load_config
from furlong.engine.base import GenerateOutput
from furlong.hooks import load_function
from furlong.output.metrics import read_metrics
from furlong.rollout.context import HookArgs
from furlong.rollout.manager import eval_output_stats, read_eval_output, read_rollout_output
from furlong.rollout.rewards import RewardModel
from furlong.rollout.router_front import RouterFront
from furlong.sample import Sample, Status
from furlong.train.batch import TrainBatch

from conftest import train_argv

HOOKS = textwrap.dedent('''
    """Hooks in Miles' style: `args` and `Sample` only; generation over HTTP."""
    import asyncio
    import threading
    from dataclasses import dataclass

    import aiohttp
    from transformers import AutoTokenizer

    from furlong.sample import Sample

    ANSWERS = {}  # (group_index, index) -> (prompt ids sent, token ids the router answered)
    SEEN = {}     # what the hooks observed, by name
    TOKENIZERS = {}


    def tokenizer(args):
        """As Miles' GenerateState: the tokenizer of args.hf_checkpoint."""
        if args.hf_checkpoint not in TOKENIZERS:
            TOKENIZERS[args.hf_checkpoint] = AutoTokenizer.from_pretrained(args.hf_checkpoint)
        return TOKENIZERS[args.hf_checkpoint]


    async def post(args, payload):
        url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}/generate"
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json=payload) as response:
                response.raise_for_status()
                return await response.json()


    async def generate(args, sample, sampling_params):
        """Miles' default generate, step by step; every second sample is removed."""
        assert sample.status in (Sample.Status.PENDING, Sample.Status.ABORTED)
        prompt_ids = tokenizer(args).encode(sample.prompt, add_special_tokens=False)
        if not sample.tokens:
            sample.tokens = prompt_ids
        output = await post(args, {"input_ids": prompt_ids, "sampling_params": sampling_params,
                                   "return_logprob": True})
        meta = output["meta_info"]
        new_tokens = [item[1] for item in meta["output_token_logprobs"]]
        ANSWERS[sample.group_index, sample.index] = (prompt_ids, new_tokens)
        sample.tokens = sample.tokens + new_tokens
        sample.response_length += len(new_tokens)
        sample.response += output["text"]
        sample.rollout_log_probs = (sample.rollout_log_probs or []) + [
            item[0] for item in meta["output_token_logprobs"]]
        sample.weight_versions.append(meta["weight_version"])
        sample.status = {"length": Sample.Status.TRUNCATED, "abort": Sample.Status.ABORTED,
                         "stop": Sample.Status.COMPLETED}[meta["finish_reason"]["type"]]
        sample.remove_sample = sample.index == 1
        return sample


    async def reward(args, sample, **kwargs):
        """1 for an even number of response tokens."""
        return float(sample.response_length % 2 == 0)


    async def group_reward(args, samples, **kwargs):
        """Rank-based: the longest response of the group gets 1."""
        longest = max(s.response_length for s in samples)
        SEEN.setdefault("group_reward", []).append([s.group_index for s in samples])
        return [float(s.response_length == longest) for s in samples]


    @dataclass
    class DynamicFilterOutput:
        keep: bool
        reason: str = None


    def drop_group_one(args, samples, **kwargs):
        keep = samples[0].group_index != 1
        return DynamicFilterOutput(keep=keep, reason=None if keep else "group_one")


    @dataclass
    class RolloutFnTrainOutput:
        samples: list
        metrics: dict = None


    @dataclass
    class RolloutFnEvalOutput:
        data: dict
        metrics: dict = None


    def generate_rollout(args, rollout_id, data_source, evaluation=False):
        """Miles' legacy rollout function: sync, with an event loop of its own."""
        assert args.rollout_global_dataset  # as Miles' own rollout function does
        SEEN.setdefault("rollout_threads", []).append(
            threading.current_thread() is threading.main_thread())
        if evaluation:
            return RolloutFnEvalOutput(data={"addition": {"rewards": [1.0, 0.0, None],
                                                          "truncated": [False, True, False]}})
        groups = data_source.get_samples(args.rollout_batch_size)
        params = {"temperature": args.rollout_temperature,
                  "max_new_tokens": args.rollout_max_response_len}
        asyncio.run(generate_and_score(args, groups, params))
        return RolloutFnTrainOutput(samples=groups, metrics={"rollout/my_metric": 7.0})


    async def generate_and_score(args, groups, params):
        samples = [s for group in groups for s in group]
        await asyncio.gather(*(generate(args, s, dict(params)) for s in samples))
        for sample in samples:
            sample.reward = await reward(args, sample)
''')


@pytest.fixture(scope="module")
def hooks_module(tmp_path_factory):
    directory = tmp_path_factory.mktemp("miles_hooks")
    (directory / "miles_style_hooks.py").write_text(HOOKS)
    return directory


@pytest.fixture
def hooks(hooks_module, monkeypatch):
    monkeypatch.syspath_prepend(str(hooks_module))
    module = importlib.import_module("miles_style_hooks")
    module.ANSWERS.clear()
    module.SEEN.clear()
    return module


def small_run(tiny: Path, tmp_path: Path, **flags) -> list[str]:
    return train_argv(tiny, num_rollout=1, rollout_batch_size=2, n_samples_per_prompt=2,
                      run_dir=tmp_path / "run", dump_details=tmp_path / "dump", **flags)


def trained(tmp_path: Path) -> tuple[dict, list[dict], dict]:
    """(train data, rollout samples, metrics of rollout 0) the run dumped and logged."""
    train = load_state(tmp_path / "dump/train_data/0_0.pt")["rollout_data"]
    samples = load_state(tmp_path / "dump/rollout_data/0.pt")["samples"]
    metrics = {k: v for row in read_metrics(tmp_path / "run/metrics.jsonl")
               if row["step"] == 0 for k, v in row.items()}
    return train, samples, metrics


def test_a_run_trains_on_what_miles_style_hooks_got_from_the_router(tiny, tmp_path, hooks):
    argv = small_run(tiny, tmp_path, custom_generate_function_path="miles_style_hooks.generate",
                     custom_rm_path="miles_style_hooks.group_reward", group_rm=True,
                     dynamic_sampling_filter_path="miles_style_hooks.drop_group_one")
    assert cli.main(argv) == 0
    train, samples, metrics = trained(tmp_path)
    # Groups 0 and 1 are submitted first; the filter drops group 1, a refill brings 2 and 3,
    # and group 2 completes the batch.
    assert [(s["group_index"], s["index"]) for s in samples] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert metrics["rollout/dynamic_filter/drop_group_one"] == 1
    # The trained tokens are the prompt (the hook tokenized sample.prompt: the text the
    # engine sees) and exactly the tokens /generate answered.
    for sample, tokens in zip(samples, train["tokens"], strict=True):
        prompt_ids, answer = hooks.ANSWERS[sample["group_index"], sample["index"]]
        assert tokens.tolist() == prompt_ids + answer and answer
        assert sample["weight_versions"] == ["0"]
    # remove_sample: the sample stays (and its reward in the group), none of its tokens train.
    for sample, mask in zip(samples, train["loss_masks"], strict=True):
        assert sample["remove_sample"] == (sample["index"] == 1)
        assert mask.tolist() == [float(not sample["remove_sample"])] * len(mask)
    # The batched reward saw whole groups, and its rewards are the ones trained on.
    assert [0, 0] in hooks.SEEN["group_reward"] and [1, 1] in hooks.SEEN["group_reward"]
    for g in (0, 2):
        lengths = [s["response_length"] for s in samples if s["group_index"] == g]
        expected = [float(n == max(lengths)) for n in lengths]
        assert [float(s["reward"]) for s in samples if s["group_index"] == g] == expected
    assert train["rewards"].tolist() == [float(s["reward"]) for s in samples]


def test_a_miles_rollout_function_generates_trains_and_evaluates(tiny, tmp_path, hooks):
    argv = small_run(tiny, tmp_path, rollout_function_path="miles_style_hooks.generate_rollout",
                     eval_prompt_data=tiny / "data/eval.jsonl", eval_interval=1)
    assert cli.main(argv) == 0
    train, samples, metrics = trained(tmp_path)
    # Sync, it ran in a thread of its own (asyncio.run inside it works), for eval before
    # training, the rollout, and eval after it.
    assert hooks.SEEN["rollout_threads"] == [False, False, False]
    assert [(s["group_index"], s["index"]) for s in samples] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for sample, tokens in zip(samples, train["tokens"], strict=True):
        prompt_ids, answer = hooks.ANSWERS[sample["group_index"], sample["index"]]
        assert tokens.tolist() == prompt_ids + answer
        assert float(sample["reward"]) == float(len(answer) % 2 == 0)
    assert metrics["rollout/my_metric"] == 7.0
    evals = [row for row in read_metrics(tmp_path / "run/metrics.jsonl") if "eval/addition" in row]
    assert [row["step"] for row in evals] == [0, 1]
    assert all(row["eval/addition"] == pytest.approx(1 / 3) for row in evals)
    assert all(row["eval/addition/truncated_ratio"] == pytest.approx(1 / 3) for row in evals)


def test_eval_data_of_a_rollout_function():
    """With the samples, furlong's eval metrics (grouped by prompt); without, the rewards."""
    samples = [Sample(group_index=g, reward=r, tokens=[1, 2, 3], response_length=2,
                      status=Status.TRUNCATED if r else Status.COMPLETED)
               for g, r in ((0, 1.0), (0, 0.0), (1, 0.0), (1, 0.0))]
    data = read_eval_output(type("RolloutFnEvalOutput", (), {"data": {
        "with": {"rewards": [1.0, 0.0, 0.0, 0.0], "samples": samples},
        "without": {"rewards": [], "truncated": []}}})())
    metrics = eval_output_stats(data, None, log_passrate=True)
    assert metrics["eval/with"] == 0.25 and metrics["eval/with/truncated_ratio"] == 0.25
    assert metrics["eval/with/pass@1"] == 0.25 and metrics["eval/with/pass@2"] == 0.5
    assert metrics["eval/without"] == 0.0
    with pytest.raises(ValueError, match="evaluation=True returned list"):
        read_eval_output([[samples[0]]])
    with pytest.raises(ValueError, match="returned a dict; return a list of groups"):
        read_rollout_output({"samples": []})


def test_a_single_miles_reward_through_the_hub(hooks):
    model = RewardModel(None, hooks.reward, False, None, 10.0, "raise", None, 0)
    samples = [Sample(tokens=[1, 2, 3], response_length=n) for n in (1, 2)]
    assert asyncio.run(model.score_group(samples)) == [0.0, 1.0]


def test_miles_check_no_aborted_path_names_furlongs_filter():
    check = load_function("miles.rollout.filter_hub.dynamic_sampling_filters.check_no_aborted",
                          "--dynamic-sampling-filter-path")
    done = [Sample(status=Status.COMPLETED), Sample(status=Status.TRUNCATED)]
    assert check(None, done).keep
    verdict = check(None, [*done, Sample(status=Status.ABORTED)])
    assert (verdict.keep, verdict.reason) == (False, "group_has_aborted")


# ---- the router front ----------------------------------------------------------------------

class RemoteLikeEngine:
    """An engine without a model in this process (as the EngineRouter over servers)."""

    def __init__(self):
        self.num_aborts = 0

    async def generate(self, input_ids, params, return_routed_experts=False):
        return GenerateOutput([7, 8], [-0.5, -0.25], "length", "ab", len(input_ids), 3)

    async def abort_all(self):
        self.num_aborts += 1

    async def health(self):
        return True


def test_the_front_serves_an_engine_without_a_model_and_frees_its_port(tiny):
    from transformers import AutoTokenizer
    engine = RemoteLikeEngine()
    front = RouterFront(engine, AutoTokenizer.from_pretrained(tiny / "model"), vocab_size=10,
                        model_name="tiny", max_context_len=64)

    async def session_calls():
        await front.start()
        url = f"http://{front.host}:{front.port}"
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/generate", json={
                    "input_ids": [1, 2], "return_logprob": True,
                    "sampling_params": {"max_new_tokens": 2}}) as response:
                output = await response.json()
            async with session.post(f"{url}/generate", json={"input_ids": [10]}) as response:
                refused = response.status, await response.text()
            async with session.get(f"{url}/health") as response:
                health = response.status
            async with session.post(f"{url}/abort_request", json={"abort_all": True}):
                pass
            # what a custom agent talks to: OpenAI's routes and sessions, on the same front
            async with session.get(f"{url}/v1/models") as response:
                models = await response.json()
            async with session.post(f"{url}/sessions") as response:
                opened = (await response.json())["session_id"]
            async with session.delete(f"{url}/sessions/{opened}") as response:
                closed = response.status
        await front.stop()
        return output, refused, health, (models, closed)

    output, refused, health, (models, closed) = asyncio.run(session_calls())
    assert [model["id"] for model in models["data"]] == ["tiny"] and closed == 204
    assert output["meta_info"]["output_token_logprobs"] == [[-0.5, 7, None], [-0.25, 8, None]]
    assert output["meta_info"]["finish_reason"]["type"] == "length"
    assert output["meta_info"]["weight_version"] == "3" and output["text"] == "ab"
    assert refused[0] == 400 and "input_ids[0]" in refused[1]
    assert health == 200 and engine.num_aborts == 1
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(asyncio.open_connection(front.host, front.port))


def test_a_router_named_by_the_flags_is_what_hooks_get(tiny):
    config, _ = load_config(train_argv(tiny, "--sglang-router-ip", "10.1.2.3",
                                       "--sglang-router-port", "30000"))
    front, router = build_router(config, RemoteLikeEngine(), None)
    assert front is None and router == ("10.1.2.3", 30000)
    args = HookArgs(config, None, None, router)
    assert (args.sglang_router_ip, args.sglang_router_port) == ("10.1.2.3", 30000)
    assert HookArgs(config).sglang_router_ip is None
    config, _ = load_config(train_argv(tiny, "--sglang-router-ip", "10.1.2.3"))
    with pytest.raises(ValueError, match="--sglang-router-port None: give both"):
        build_router(config, RemoteLikeEngine(), None)


# ---- Sample ---------------------------------------------------------------------------------

def test_sample_has_miles_names_and_behaviour():
    assert Sample.Status.COMPLETED is Status.COMPLETED
    sample = Sample(group_index=0, index=1, tokens=[1, 2, 3, 4], response_length=2,
                    loss_mask=[1, 0], reward={"acc": 1.0}, weight_versions=["3", "4"],
                    rollout_routed_experts=np.zeros((3, 2, 1), dtype=np.int32))
    sample.my_field = "kept"  # a hook's own attribute
    assert sample.effective_response_length == 1 and sample.latest_weight_version == 4
    assert sample.get_reward_value(type("Args", (), {"reward_key": "acc"})()) == 1.0
    data = sample.to_dict()
    assert data["status"] == "pending" and data["my_field"] == "kept"
    assert isinstance(data["rollout_routed_experts"], torch.Tensor)  # loads weights-only
    again = Sample.from_dict({**data, "unknown_key": 5})
    assert again.unknown_key == 5 and again.my_field == "kept" and again.status is Status.PENDING
    assert again.weight_versions == ["3", "4"]
    # A buffer written before weight_versions replaced weight_version.
    assert Sample.from_dict({"status": "completed", "weight_version": 2}).weight_versions == ["2"]
    sample.validate()
    sample.rollout_log_probs = [-1.0]
    with pytest.raises(ValueError, match="rollout_log_probs has 1 entries, expected 2"):
        sample.validate()


def test_the_trainer_takes_routes_as_numpy_or_torch():
    routes = np.arange(6, dtype=np.int64).reshape(3, 1, 2)
    samples = [Sample(tokens=[1, 2, 3, 4], response_length=2, reward=1.0,
                      rollout_routed_experts=r) for r in (routes, torch.from_numpy(routes))]
    batch = TrainBatch.from_samples(samples, None, routed_experts=True)
    assert all(r.dtype == torch.int32 for r in batch.routed_experts)
    assert torch.equal(batch.routed_experts[0], batch.routed_experts[1])


def test_sampling_params_take_miles_detokenize_options_and_refuse_unknown_keys():
    """Miles' default generate sends spaces_between_special_tokens: accepted, no effect;
    a misspelt key is still an error naming it."""
    from furlong.engine.base import SamplingParams
    params = SamplingParams.from_dict({"temperature": 0.5, "max_new_tokens": 4,
                                       "spaces_between_special_tokens": False})
    assert params == SamplingParams(temperature=0.5, max_new_tokens=4)
    with pytest.raises(ValueError, match="temprature"):
        SamplingParams.from_dict({"temprature": 0.5})
