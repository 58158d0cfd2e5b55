"""RolloutManager: groups of samples from prompts, filtering, partial rollouts, SFT and eval.

Two engines drive it: the real HFEngine on the tiny model (fields, determinism, a
multi-turn hook), and `ScriptedEngine`, whose response to each sample is written by the
test, so rewards, finish reasons and aborts are known in advance. Rewards are the real
`math` reward (one process pool for the module).
"""
from __future__ import annotations

import asyncio
import importlib
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from transformers import AutoTokenizer

from furlong.config import ConfigError, load_config
from furlong.build import build_datasets
from furlong.data import DataError, DataKeys, PromptDataset, PromptEncoder
from furlong.engine.base import GenerateOutput, SamplingParams
from furlong.engine.hf_engine import HFEngine
from furlong.hooks import Hooks, load_function
from furlong.model.loading import load_hf_model
from furlong.rollout.context import HookArgs
from furlong.rollout.filters import FilterResult, as_filter_result, check_reward_nonzero_std
from furlong.rollout.generate import generate as default_generate
from furlong.rollout.generate import sample_seed
from furlong.rollout.manager import RolloutManager
from furlong.rollout.rewards import RewardModel
from furlong.rollout.stats import pass_at_k
from furlong.sample import Sample, Status
from furlong.train.batch import TrainBatch

from conftest import SFT_FLAGS, train_argv

EOS = 2  # <|im_end|> of the tiny tokenizer
MILES_FILTER = "miles.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std"
HOOKS_MODULE = "furlong_test_manager_hooks"
HOOKS = '''
"""Hooks for tests/test_manager.py, loaded by dotted path like a user's."""
from types import SimpleNamespace

from furlong.engine.base import SamplingParams
from furlong.sample import Sample, Status

TOOL_TEXT = "<|im_end|>\\n<|im_start|>user\\n7<|im_end|>\\n<|im_start|>assistant\\n"


def all_wrong_or_first_wrong(args, samples):
    """Drop all-wrong groups with a reason, groups whose first sample is wrong with False."""
    rewards = [s.reward for s in samples]
    if not any(rewards):
        return SimpleNamespace(keep=False, reason="all_wrong")
    return rewards[0] > 0


SEEN = {}


def remove_each_groups_first(args, groups):
    SEEN["kept"] = [group[0].group_index for group in groups]
    for group in groups:
        group[0].remove_sample = True


async def record_every_group(args, all_groups, data_source):
    SEEN["all"] = sorted(group[0].group_index for group in all_groups)
    SEEN["data_source"] = data_source


async def two_turns(args, sample, sampling_params):
    """Turn 1, a tool reply spliced in (not sampled: loss mask 0), turn 2. Returns both the
    first turn alone and the whole conversation."""
    params = SamplingParams.from_dict(sampling_params)
    prompt = list(sample.tokens)
    first = await args.engine.generate(prompt, params)
    tool = args.tokenizer(TOOL_TEXT, add_special_tokens=False)["input_ids"]
    context = prompt + first.output_ids + tool
    second = await args.engine.generate(context, params)
    turn = Sample(group_index=sample.group_index, index=sample.index, prompt=sample.prompt,
                  tokens=prompt + first.output_ids, response=first.text,
                  response_length=len(first.output_ids), label=sample.label,
                  loss_mask=[1] * len(first.output_ids),
                  rollout_log_probs=list(first.output_log_probs),
                  status=Status.from_finish_reason(first.finish_reason),
                  metadata={"turns": 1})
    whole = Sample(group_index=sample.group_index, index=sample.index, prompt=sample.prompt,
                   tokens=context + second.output_ids,
                   response=first.text + TOOL_TEXT + second.text,
                   response_length=len(context) - len(prompt) + len(second.output_ids),
                   label=sample.label,
                   loss_mask=[1] * len(first.output_ids) + [0] * len(tool)
                   + [1] * len(second.output_ids),
                   rollout_log_probs=list(first.output_log_probs) + [0.0] * len(tool)
                   + list(second.output_log_probs),
                   status=Status.from_finish_reason(second.finish_reason),
                   metadata={"turns": 2})
    return [turn, whole]
'''


# ---- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny / "model")


@pytest.fixture(scope="module")
def reward():
    model = RewardModel("math", None, False, None, 60.0, "raise", None, 0)
    yield model
    model.close()


@pytest.fixture(scope="module", autouse=True)
def hooks_module(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hooks")
    (directory / f"{HOOKS_MODULE}.py").write_text(HOOKS)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(directory))
        yield
    sys.modules.pop(HOOKS_MODULE, None)


def write_prompts(path: Path, pairs: list[tuple[int, int]]) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "label": str(a + b)}) + "\n"
                            for a, b in pairs))
    return path


PAIRS = [(10 + i, 20 + 3 * i) for i in range(12)]


def config_for(grpo_argv, *extra: str):
    """grpo_argv + extra flags; the first 64 rows of train.jsonl unless extra names data."""
    argv = list(grpo_argv)
    position = argv.index("--prompt-data") + 1
    argv[position] += "@[0:64]"  # encoding all 7.6k prompts would dominate the test time
    config, _ = load_config([*argv, *extra])
    return config


def prompt_dataset(spec: str, tokenizer, config) -> PromptDataset:
    r = config.rollout
    return PromptDataset(spec, DataKeys(r.input_key, r.label_key), PromptEncoder(tokenizer, True),
                         shuffle=r.rollout_shuffle, seed=r.rollout_seed)


def make_manager(config, engine, tokenizer, reward, generate_fn=default_generate,
                 filter_fn=None, eval_datasets=None, **hooks) -> RolloutManager:
    """`hooks`: more Hooks fields (e.g. buffer_filter=fn)."""
    return RolloutManager(config, HookArgs(config, engine, tokenizer),
                          prompt_dataset(config.rollout.prompt_data, tokenizer, config),
                          reward, Hooks(generate=generate_fn, dynamic_sampling_filter=filter_fn,
                                        **hooks), eval_datasets)


def generate(manager: RolloutManager, rollout_id: int):
    return asyncio.run(asyncio.wait_for(manager.generate(rollout_id), 300))  # a hang guard


# ---- a scripted engine ------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What the engine answers for one sample: the right sum or a wrong one, then EOS
    ('stop') or no EOS ('length'); `hang_at` tokens in, it waits for abort_all; with
    `wait_for_group` it answers only once a request of that group has arrived."""
    correct: bool
    finish: str = "stop"
    hang_at: int | None = None
    wait_for_group: int | None = None


class ScriptedEngine:
    """Answers `script(group_index, index) -> Plan` with `\\boxed{sum}` (or sum + 1).

    The sample is recognised by its sampling_seed (sample_seed of the rollout seed, its
    group, its index and how many tokens it already has), so a continued partial sample
    gets the rest of the same answer. Log-prob of response token j is -0.01 * (j + 1).
    """

    def __init__(self, tokenizer, script: Callable[[int, int], Plan], rollout_seed: int = 42):
        self.tokenizer = tokenizer
        self.script = script
        self.identity = {sample_seed(rollout_seed, g, i, offset): (g, i, offset)
                         for g in range(24) for i in range(8) for offset in range(12)}
        self.calls: list[tuple[list[int], SamplingParams]] = []
        self.num_aborts = 0
        self._aborted: asyncio.Event | None = None
        self._requested: dict[int, asyncio.Event] = {}

    def _group_requested(self, group: int) -> asyncio.Event:
        return self._requested.setdefault(group, asyncio.Event())

    async def generate(self, input_ids: list[int], params: SamplingParams) -> GenerateOutput:
        self.calls.append((list(input_ids), params))
        group, index, offset = self.identity[params.sampling_seed]
        self._group_requested(group).set()
        plan = self.script(group, index)
        if plan.wait_for_group is not None:
            try:
                await asyncio.wait_for(self._group_requested(plan.wait_for_group).wait(), 300)
            except TimeoutError:
                raise AssertionError(f"group {group} waited for a request of group "
                                     f"{plan.wait_for_group}, which never came") from None
        prompt = self.tokenizer.decode(input_ids[:len(input_ids) - offset])
        a, b = map(int, re.search(r"(\d+)\+(\d+)=", prompt).groups())
        answer = f"\\boxed{{{a + b if plan.correct else a + b + 1}}}"
        target = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        target += [EOS] if plan.finish == "stop" else []
        finish = plan.finish
        end = len(target)
        if plan.hang_at is not None and offset < plan.hang_at:
            end, finish = plan.hang_at, "abort"
        if end - offset > params.max_new_tokens:
            end, finish = offset + params.max_new_tokens, "length"
        await asyncio.sleep(0)
        if finish == "abort":
            if self._aborted is None:
                self._aborted = asyncio.Event()
            await self._aborted.wait()
        ids = target[offset:end]
        text_ids = ids[:-1] if finish == "stop" else ids  # as SGLang: no matched stop token
        return GenerateOutput(ids, [-0.01 * (j + 1) for j in range(offset, end)], finish,
                              self.tokenizer.decode(text_ids), len(input_ids), 0)

    async def abort_all(self) -> None:
        self.num_aborts += 1
        if self._aborted is not None:
            self._aborted.set()
            self._aborted = None


def mixed(group: int, index: int) -> Plan:
    """Even samples right, odd samples wrong: nonzero reward std."""
    return Plan(correct=index % 2 == 0)


# ---- the default path on the real engine --------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tiny):
    return load_hf_model(str(tiny / "model"))


class RecordingEngine(HFEngine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[list[int], SamplingParams]] = []

    async def generate(self, input_ids, params):
        self.calls.append((list(input_ids), params))
        return await super().generate(input_ids, params)


def test_a_rollout_is_batch_size_groups_of_n_samples_with_every_field(
        grpo_argv, tiny_model, tokenizer, reward):
    config = config_for(grpo_argv)  # 4 prompts x 4 samples, 8 new tokens, math reward
    engine = RecordingEngine(tiny_model, tokenizer)
    manager = make_manager(config, engine, tokenizer, reward)
    rows = manager.dataset.rows[:4]
    encoder = PromptEncoder(tokenizer, config.rollout.apply_chat_template)
    result = generate(manager, 0)

    assert [len(group) for group in result.groups] == [4, 4, 4, 4]
    statuses = set()
    for g, (group, row) in enumerate(zip(result.groups, rows, strict=True)):
        for i, sample in enumerate(group):
            assert (sample.group_index, sample.index) == (g, i)
            # the prompt as the engine sees it (rendered by the chat template), as in Miles
            assert sample.prompt == encoder.render(row.prompt) and sample.label == row.label
            assert sample.tokens[:len(row.prompt_ids)] == list(row.prompt_ids)
            assert sample.prompt_length == len(row.prompt_ids)
            response = sample.response_tokens
            assert 0 < sample.response_length == len(response) <= 8
            assert sample.loss_mask == [1] * len(response)
            assert len(sample.rollout_log_probs) == len(response)
            assert all(-30 < lp <= 0 for lp in sample.rollout_log_probs)
            if response[-1] == EOS:
                assert sample.status == Status.COMPLETED
                assert sample.response == tokenizer.decode(response[:-1])
            else:
                assert sample.status == Status.TRUNCATED and len(response) == 8
                assert sample.response == tokenizer.decode(response)
            assert sample.reward in (0.0, 1.0)
            assert sample.weight_versions == ["0"]
            statuses.add(sample.status)
    assert statuses == {Status.COMPLETED, Status.TRUNCATED}

    # One request per sample, with the rollout sampling params and the sample's own seed.
    assert len(engine.calls) == 16
    seeds = {params.sampling_seed for _, params in engine.calls}
    assert seeds == {sample_seed(42, g, i) for g in range(4) for i in range(4)}
    assert {(p.temperature, p.top_p, p.top_k, p.max_new_tokens) for _, p in engine.calls} == {
        (1.0, 1.0, -1, 8)}

    samples = [s for group in result.groups for s in group]
    lengths = [s.response_length for s in samples]
    metrics = result.metrics
    assert metrics["rollout/raw_reward"] == pytest.approx(sum(s.reward for s in samples) / 16)
    assert metrics["rollout/response_len/mean"] == pytest.approx(sum(lengths) / 16)
    assert (metrics["rollout/response_len/max"], metrics["rollout/response_len/min"]) == (
        max(lengths), min(lengths))
    assert metrics["rollout/truncated_ratio"] == pytest.approx(
        sum(s.status == Status.TRUNCATED for s in samples) / 16)
    assert manager.next_group_index == 4 and manager.dataset.offset == 4


def test_same_seeds_give_the_same_rollouts_in_fresh_managers(grpo_argv, tiny_model, tokenizer,
                                                             reward):
    def two_rollouts(*extra: str) -> list:
        config = config_for(grpo_argv, "--rollout-shuffle", *extra)
        manager = make_manager(config, HFEngine(tiny_model, tokenizer), tokenizer, reward)
        results = [generate(manager, rollout_id) for rollout_id in range(2)]
        return [[s.to_dict() for group in r.groups for s in group] for r in results]

    first = two_rollouts()
    assert two_rollouts() == first
    assert first[0] != first[1]
    other_seed = two_rollouts("--rollout-seed", "7")
    assert other_seed[0] != first[0]


# ---- dynamic sampling -----------------------------------------------------------------------

def test_over_sampling_refills_until_enough_groups_pass_and_aborts_the_surplus(
        tmp_path, grpo_argv, tokenizer, reward):
    """3 groups wanted, 4 prompts per refill. Groups 1 and 2 have equal rewards (dropped by
    check_reward_nonzero_std), so after group 2 only 1 accepted + 1 in flight remain and the
    second refill (groups 4..7) starts at once, while group 3 is still generating (group 3
    answers only after group 4 was requested); group 4 completes the batch, 5..7 are
    aborted."""
    data = write_prompts(tmp_path / "prompts.jsonl", PAIRS)
    config = config_for(grpo_argv, "--prompt-data", str(data), "--rollout-batch-size", "3",
                        "--over-sampling-batch-size", "4",
                        "--dynamic-sampling-filter-path", MILES_FILTER)
    plans = {1: lambda i: Plan(correct=True), 2: lambda i: Plan(correct=False),
             3: lambda i: Plan(correct=i % 2 == 0, wait_for_group=4),
             5: lambda i: Plan(correct=True, hang_at=2), 7: lambda i: Plan(True, hang_at=1)}
    engine = ScriptedEngine(tokenizer, lambda g, i: plans.get(g, lambda i: mixed(g, i))(i))
    filter_fn = load_function(MILES_FILTER, "--dynamic-sampling-filter-path")
    manager = make_manager(config, engine, tokenizer, reward, filter_fn=filter_fn)
    result = generate(manager, 0)

    assert [group[0].group_index for group in result.groups] == [0, 3, 4]
    for group in result.groups:
        assert [s.reward for s in group] == [1.0, 0.0, 1.0, 0.0]
        assert all(s.status == Status.COMPLETED for s in group)
    drops = {k: v for k, v in result.metrics.items() if "/drop_zero_std" in k}
    assert drops == {"rollout/dynamic_filter/drop_zero_std_0.0": 1,
                     "rollout/dynamic_filter/drop_zero_std_1.0": 1}
    assert result.metrics["rollout/zero_std/count"] == 0
    assert not any(key.startswith("rollout/dynamic_filter/drop_aborted") for key in result.metrics)
    # Two refills of 4 prompts, 4 requests each, one abort for the surplus, nothing kept.
    assert len(engine.calls) == 32 and engine.num_aborts == 1
    assert manager.dataset.offset == 8 and manager.next_group_index == 8
    assert manager.buffer == []


def test_miles_end_of_rollout_hooks_see_the_kept_and_all_finished_groups(
        tmp_path, grpo_argv, tokenizer, reward):
    """--rollout-sample-filter-path gets the kept groups and may remove samples;
    --rollout-all-samples-process-path gets every finished group, those the dynamic filter
    dropped too (not the aborted surplus), and Miles' data source (get_samples)."""
    data = write_prompts(tmp_path / "prompts.jsonl", PAIRS)
    config = config_for(grpo_argv, "--prompt-data", str(data), "--rollout-batch-size", "2",
                        "--over-sampling-batch-size", "4",
                        "--dynamic-sampling-filter-path", MILES_FILTER)
    plans = {1: lambda i: Plan(correct=True), 3: lambda i: Plan(correct=True, hang_at=1)}
    engine = ScriptedEngine(tokenizer, lambda g, i: plans.get(g, lambda i: mixed(g, i))(i))
    hooks = importlib.import_module(HOOKS_MODULE)
    manager = RolloutManager(
        config, HookArgs(config, engine, tokenizer),
        prompt_dataset(config.rollout.prompt_data, tokenizer, config), reward, Hooks(
            dynamic_sampling_filter=load_function(MILES_FILTER, "--dynamic-sampling-filter-path"),
            rollout_sample_filter=hooks.remove_each_groups_first,
            rollout_all_samples_process=hooks.record_every_group))
    result = generate(manager, 0)
    assert [group[0].group_index for group in result.groups] == hooks.SEEN["kept"] == [0, 2]
    assert hooks.SEEN["all"] == [0, 1, 2]
    assert hooks.SEEN["data_source"] == manager.get_samples  # Miles' data source
    assert [[s.remove_sample for s in group] for group in result.groups] == \
        [[True, False, False, False]] * 2


def test_end_of_rollout_hooks_need_furlongs_own_rollout(grpo_argv):
    hook = f"{HOOKS_MODULE}:remove_each_groups_first"
    with pytest.raises(ConfigError, match="--rollout-sample-filter-path runs at the end of "
                                          "furlong's own rollout, which "
                                          "--rollout-function-path replaces"):
        load_config([*grpo_argv, "--rollout-sample-filter-path", hook,
                     "--rollout-function-path", f"{HOOKS_MODULE}:two_turns"])
    config, _ = load_config([*grpo_argv, "--rollout-sample-filter-path", hook])
    assert config.rollout.rollout_sample_filter_path == hook


def test_a_custom_filter_may_return_a_bool_or_an_object_with_keep_and_reason(
        tmp_path, grpo_argv, tokenizer, reward):
    data = write_prompts(tmp_path / "prompts.jsonl", PAIRS)
    path = f"{HOOKS_MODULE}:all_wrong_or_first_wrong"
    config = config_for(grpo_argv, "--prompt-data", str(data), "--rollout-batch-size", "2",
                        "--dynamic-sampling-filter-path", path)
    # group 0: all wrong (reason all_wrong); 1: first wrong (bare False); 2, 3: kept.
    scripts = {0: lambda i: Plan(False), 1: lambda i: Plan(i == 3), 3: lambda i: Plan(i < 2)}
    engine = ScriptedEngine(tokenizer, lambda g, i: scripts.get(g, lambda i: Plan(True))(i))
    manager = make_manager(config, engine, tokenizer, reward,
                           filter_fn=load_function(path, "--dynamic-sampling-filter-path"))
    result = generate(manager, 0)
    assert [group[0].group_index for group in result.groups] == [2, 3]
    assert result.metrics["rollout/dynamic_filter/drop_all_wrong"] == 1
    assert result.metrics["rollout/dynamic_filter/drop_filtered"] == 1
    assert result.metrics["rollout/zero_std/count"] == 1  # group 2: all right, still kept


def test_filter_results_from_bools_tensors_and_objects():
    """Regression: a 0-dim tensor (slime's documented `torch.tensor(r).std() > 0.0`) raised
    AttributeError: 'Tensor' object has no attribute 'keep'."""
    assert as_filter_result(True) == FilterResult(True)
    assert as_filter_result(False) == FilterResult(False, "filtered")
    assert as_filter_result(torch.tensor([1.0, 1.0]).std() > 0) == FilterResult(False, "filtered")
    assert as_filter_result(torch.tensor([0.0, 1.0]).std() > 0) == FilterResult(True)
    assert as_filter_result(SimpleNamespace(keep=torch.tensor(False), reason="odd")) == (
        FilterResult(False, "odd"))
    assert as_filter_result(SimpleNamespace(keep=False, reason=None)) == (
        FilterResult(False, "filtered"))
    assert as_filter_result(SimpleNamespace(keep=True, reason="ignored")) == FilterResult(True)


def test_check_reward_nonzero_std_reads_the_reward_key():
    args = SimpleNamespace(reward_key="score")
    group = [Sample(reward={"score": 1.0, "acc": True}), Sample(reward={"score": -1.0, "acc": 0})]
    assert check_reward_nonzero_std(args, group) == FilterResult(True)
    same = [Sample(reward={"score": 1.0}), Sample(reward={"score": 1.0})]
    assert check_reward_nonzero_std(args, same) == FilterResult(False, "zero_std_1.0")


# ---- partial rollouts ---------------------------------------------------------------------

def partial_script(group: int, index: int) -> Plan:
    """Rollout 0 takes groups 0..3 and needs 2: groups 2 and 3 are cut off mid-answer
    (group 2 samples 0 and 1 finish first). Rollout 1 finishes them; its own new groups 4
    and 5 are cut off in turn. Any run of this script aborts at the same tokens."""
    if group in (2, 3, 4, 5) and not (group == 2 and index < 2):
        return Plan(correct=index % 2 == 0, hang_at=1 + (index + group) % 3)
    return mixed(group, index)


def partial_manager(tmp_path, grpo_argv, tokenizer, reward, **hooks) -> RolloutManager:
    data = tmp_path / "prompts.jsonl"
    if not data.exists():
        write_prompts(data, PAIRS)
    config = config_for(grpo_argv, "--prompt-data", str(data), "--rollout-batch-size", "2",
                        "--over-sampling-batch-size", "4", "--partial-rollout",
                        "--dynamic-sampling-filter-path", MILES_FILTER)
    return make_manager(config, ScriptedEngine(tokenizer, partial_script), tokenizer, reward,
                        filter_fn=load_function(MILES_FILTER, "--dynamic-sampling-filter-path"),
                        **hooks)


def test_partial_rollout_returns_unfinished_groups_and_continues_them(
        tmp_path, grpo_argv, tokenizer, reward):
    manager = partial_manager(tmp_path, grpo_argv, tokenizer, reward)
    first = generate(manager, 0)
    assert [g[0].group_index for g in first.groups] == [0, 1]
    assert [[s.group_index for s in g][0] for g in manager.buffer] == [2, 3]
    cut = {(s.group_index, s.index): list(s.tokens) for g in manager.buffer for s in g}
    buffered = {(s.group_index, s.index): s.status for g in manager.buffer for s in g}
    assert buffered[(2, 0)] == buffered[(2, 1)] == Status.COMPLETED
    assert {buffered[key] for key in buffered if key not in ((2, 0), (2, 1))} == {Status.PENDING}
    assert all(s.reward is None for g in manager.buffer for s in g)
    # Miles' note of the rollout that started a sample, for buffer filters
    assert {s.metadata["start_rollout_id"] for g in manager.buffer for s in g} == {0}

    engine = manager.args.engine
    calls_before = len(engine.calls)
    second = generate(manager, 1)
    assert [g[0].group_index for g in second.groups] == [2, 3]
    continued = engine.calls[calls_before:]
    for group in second.groups:
        assert [s.reward for s in group] == [1.0, 0.0, 1.0, 0.0]
        for sample in group:
            key = (sample.group_index, sample.index)
            assert sample.status == Status.COMPLETED
            assert sample.tokens[:len(cut[key])] == cut[key]  # earlier tokens kept
            assert sample.response == tokenizer.decode(sample.response_tokens[:-1])
            assert sample.loss_mask == [1] * sample.response_length
            assert sample.rollout_log_probs == pytest.approx(
                [-0.01 * (j + 1) for j in range(sample.response_length)])
            done = len(cut[key]) - sample.prompt_length
            requests = [(ids, p) for ids, p in continued
                        if engine.identity[p.sampling_seed][:2] == key]
            if key in ((2, 0), (2, 1)):
                assert requests == []  # finished before the abort: not generated again
            else:
                ((ids, params),) = requests
                assert ids == cut[key]
                assert params.sampling_seed == sample_seed(42, *key, done)
                assert params.max_new_tokens == 8 - done
    assert [[s.group_index for s in g][0] for g in manager.buffer] == [4, 5]
    assert {s.metadata["start_rollout_id"] for g in manager.buffer for s in g} == {1}
    assert {s.metadata["start_rollout_id"] for g in second.groups for s in g} == {0}


def test_a_buffer_filter_chooses_the_buffered_groups_a_rollout_takes_first(
        tmp_path, grpo_argv, tokenizer, reward):
    """--buffer-filter-path, Miles' fn(args, rollout_id, buffer, num_samples): here the
    newest buffered group first; it removes what it takes from the buffer."""
    calls = []

    def newest_first(args, rollout_id, buffer, num_samples):
        calls.append((rollout_id, [g[0].group_index for g in buffer], num_samples))
        taken = buffer[::-1][:num_samples]
        for group in taken:
            buffer.remove(group)
        return taken
    manager = partial_manager(tmp_path, grpo_argv, tokenizer, reward, buffer_filter=newest_first)
    generate(manager, 0)
    second = generate(manager, 1)
    assert calls == [(None, [2, 3], 4)]
    assert [g[0].group_index for g in second.groups] == [3, 2]


def test_the_buffer_survives_state_dict_and_a_resumed_manager_repeats_the_next_rollout(
        tmp_path, grpo_argv, tokenizer, reward):
    uninterrupted = partial_manager(tmp_path, grpo_argv, tokenizer, reward)
    generate(uninterrupted, 0)
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # as written to rollout.json
    assert len(state["buffer"]) == 2

    resumed = partial_manager(tmp_path, grpo_argv, tokenizer, reward)
    resumed.load_state_dict(state)
    expected, actual = generate(uninterrupted, 1), generate(resumed, 1)
    assert [[s.to_dict() for s in g] for g in actual.groups] == [
        [s.to_dict() for s in g] for g in expected.groups]
    assert actual.metrics == expected.metrics
    assert resumed.state_dict() == json.loads(json.dumps(uninterrupted.state_dict()))


# ---- custom generate hook (multi-turn) ------------------------------------------------------

def test_a_custom_generate_hook_may_return_several_samples_with_masked_tool_tokens(
        grpo_argv, tiny_model, tokenizer, reward):
    path = f"{HOOKS_MODULE}:two_turns"
    config = config_for(grpo_argv, "--rollout-batch-size", "2", "--n-samples-per-prompt", "2",
                        "--custom-generate-function-path", path)
    engine = RecordingEngine(tiny_model, tokenizer)
    manager = make_manager(config, engine, tokenizer, reward,
                           generate_fn=load_function(path, "--custom-generate-function-path"))
    result = generate(manager, 0)
    tool = tokenizer(sys.modules[HOOKS_MODULE].TOOL_TEXT, add_special_tokens=False)["input_ids"]

    assert [len(group) for group in result.groups] == [4, 4]
    assert len(engine.calls) == 8
    for group in result.groups:
        assert [s.metadata["turns"] for s in group] == [1, 2, 1, 2]
        for turn, whole in zip(group[::2], group[1::2], strict=True):
            first = turn.response_tokens
            prompt = turn.tokens[:turn.prompt_length]
            assert whole.tokens[:len(prompt) + len(first) + len(tool)] == prompt + first + tool
            second = whole.tokens[len(prompt) + len(first) + len(tool):]
            assert whole.response_length == len(first) + len(tool) + len(second)
            assert whole.loss_mask == [1] * len(first) + [0] * len(tool) + [1] * len(second)
            assert whole.rollout_log_probs[:len(first)] == turn.rollout_log_probs
            assert whole.rollout_log_probs[len(first):len(first) + len(tool)] == [0.0] * len(tool)
            assert len(whole.rollout_log_probs) == whole.response_length
            # The second request saw the spliced context.
            assert [ids for ids, _ in engine.calls].count(prompt + first + tool) == 1
            assert turn.reward in (0.0, 1.0) and whole.reward in (0.0, 1.0)
            assert turn.status in (Status.COMPLETED, Status.TRUNCATED)


def test_samples_carry_the_rows_messages_and_tools_as_miles_data_source_gives_them(
        tiny, tmp_path, tokenizer):
    """Without --apply-chat-template each sample's prompt is the row's messages (its own
    copy: a hook that edits one edits no other), its tokens the chat template's, and the
    --tool-key column is in metadata["tools"] too."""
    messages = [{"role": "system", "content": "add"}, {"role": "user", "content": "1+2="}]
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {}}}]
    data = tmp_path / "messages.jsonl"
    data.write_text(json.dumps({"prompt": messages, "label": "3", "tools": tools,
                                "metadata": {"source": "x"}}) + "\n")
    config, _ = load_config(train_argv(tiny, prompt_data=data, apply_chat_template=False,
                                       rollout_batch_size=1, n_samples_per_prompt=2))
    r = config.rollout
    dataset = PromptDataset(str(data), DataKeys(r.input_key, r.label_key, r.metadata_key,
                                                r.tool_key), PromptEncoder(tokenizer, False))
    manager = RolloutManager(config, HookArgs(config, None, tokenizer), dataset, None)
    (group,) = manager.next_groups(1)
    templated = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                              add_generation_prompt=True)
    for sample in group:
        assert sample.prompt == messages and sample.label == "3"
        assert sample.tokens == tokenizer(templated, add_special_tokens=False)["input_ids"]
        assert sample.metadata == {"source": "x", "tools": tools}
    group[0].prompt[1]["content"] = "edited"
    group[0].metadata["tools"].clear()
    assert group[1].prompt == messages and group[1].metadata["tools"] == tools


# ---- SFT --------------------------------------------------------------------------------------

def masked_spans(sample: Sample, tokenizer) -> list[str]:
    """Decoded runs of consecutive response tokens whose loss mask is 1."""
    spans, run = [], []
    for token, mask in zip(sample.response_tokens, sample.loss_mask, strict=True):
        if mask:
            run.append(token)
        elif run:
            spans, run = spans + [tokenizer.decode(run)], []
    return spans + ([tokenizer.decode(run)] if run else [])


def sft_config(tiny, data: Path, batch_size: int = 4):
    config, _ = load_config(train_argv(tiny, **SFT_FLAGS, prompt_data=data,
                                       rollout_batch_size=batch_size))
    return config


def test_sft_samples_mask_exactly_the_assistant_tokens(tiny, tokenizer):
    config = sft_config(tiny, tiny / "data/sft.jsonl")
    manager = RolloutManager(config, HookArgs(config, None, tokenizer),
                             prompt_dataset(str(tiny / "data/sft.jsonl"), tokenizer, config),
                             None)
    rows = [json.loads(line) for line in (tiny / "data/sft.jsonl").read_text().splitlines()[:4]]
    result = generate(manager, 0)
    assert [len(group) for group in result.groups] == [1, 1, 1, 1]
    for g, (group, row) in enumerate(zip(result.groups, rows, strict=True)):
        (sample,) = group
        user, assistant = row["messages"]
        assert (sample.group_index, sample.index, sample.status) == (g, 0, Status.COMPLETED)
        assert tokenizer.decode(sample.tokens[:sample.prompt_length]) == (
            f"<|im_start|>user\n{user['content']}<|im_end|>\n<|im_start|>assistant\n")
        assert len(sample.loss_mask) == sample.response_length
        assert masked_spans(sample, tokenizer) == [assistant["content"] + "<|im_end|>\n"]
        assert sample.loss_mask == [1] * sample.response_length
    assert result.metrics["rollout/response_len/mean"] == pytest.approx(
        sum(g[0].response_length for g in result.groups) / 4)
    assert manager.next_group_index == 4


def test_sft_masks_only_the_assistant_turns_of_a_multi_turn_conversation(tiny, tmp_path,
                                                                         tokenizer):
    messages = [{"role": "system", "content": "0+0=0"}, {"role": "user", "content": "1+2="},
                {"role": "assistant", "content": "\\boxed{3}"},
                {"role": "user", "content": "4+5="},
                {"role": "assistant", "content": "\\boxed{9}"}]
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": messages}) + "\n")
    config = sft_config(tiny, data, batch_size=1)
    manager = RolloutManager(config, HookArgs(config, None, tokenizer),
                             prompt_dataset(str(data), tokenizer, config), None)
    (sample,), = generate(manager, 0).groups
    assert masked_spans(sample, tokenizer) == ["\\boxed{3}<|im_end|>\n", "\\boxed{9}<|im_end|>\n"]
    unmasked = [t for t, m in zip(sample.response_tokens, sample.loss_mask, strict=True) if not m]
    assert tokenizer.decode(unmasked) == "<|im_start|>user\n4+5=<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(sample.tokens) == tokenizer.apply_chat_template(messages,
                                                                            tokenize=False)


def test_sft_gives_the_tool_column_to_the_chat_template(tiny, tmp_path, tokenizer, monkeypatch):
    """Regression: SFT read tools from metadata while prompts used --tool-key's column."""
    from furlong.rollout import sft
    messages = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": messages, "tools": [{"name": "calc"}]}) + "\n")
    config = sft_config(tiny, data, batch_size=1)
    row = prompt_dataset(str(data), tokenizer, config).rows[0]
    seen = []
    encode = sft.conversation_tokens
    monkeypatch.setattr(sft, "conversation_tokens",
                        lambda tok, msgs, tools, kwargs: seen.append(tools) or encode(
                            tok, msgs, tools, kwargs))
    sft.sft_sample(tokenizer, row, 0)
    assert seen == [[{"name": "calc"}]]


# ---- eval ---------------------------------------------------------------------------------------

def brute_force_pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Share of the k-subsets of the samples that hold at least one correct one."""
    outcomes = [True] * num_correct + [False] * (num_samples - num_correct)
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(subset) for subset in subsets) / len(subsets)


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k))
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 4, 1) == 1.0 and pass_at_k(4, 4, 4) == 1.0
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 1, 1) == 0.25


def test_eval_reads_the_eval_reward_key_of_dict_rewards(tmp_path, grpo_argv, tokenizer):
    """--eval-reward-key (Miles'): eval/NAME is the mean of that key of each dict reward,
    not of --reward-key's."""
    data = write_prompts(tmp_path / "eval.jsonl", [(11, 22), (33, 44)])
    config = config_for(grpo_argv, "--eval-prompt-data", "adds", str(data),
                        "--n-samples-per-eval-prompt", "2", "--reward-key", "score",
                        "--eval-reward-key", "correct")

    def both(args, sample):
        return {"score": 0.25, "correct": float(f"{{{sample.label}}}" in sample.response)}
    engine = ScriptedEngine(tokenizer, lambda group, index: Plan(correct=index == 0))
    rewards = RewardModel(None, both, False, None, 60.0, "raise", None, 0)
    manager = make_manager(config, engine, tokenizer, rewards,
                           eval_datasets={"adds": prompt_dataset(str(data), tokenizer, config)})
    try:
        metrics = asyncio.run(asyncio.wait_for(manager.evaluate(), 300))
    finally:
        rewards.close()
    assert metrics["eval/adds"] == pytest.approx(0.5)


def test_eval_reports_mean_reward_pass_at_k_lengths_and_truncation(tmp_path, grpo_argv,
                                                                  tokenizer, reward):
    data = write_prompts(tmp_path / "eval.jsonl", [(11, 22), (33, 44), (55, 66)])
    config = config_for(grpo_argv, "--eval-prompt-data", "adds", str(data),
                        "--n-samples-per-eval-prompt", "4", "--log-passrate",
                        "--eval-max-response-len", "6", "--eval-temperature", "0.5")
    correct = {0: 0, 1: 2, 2: 4}  # correct samples per prompt: the edge cases c=0 and c=n
    truncated = {(1, 3)}  # this one has no room for EOS: wrong and truncated

    def script(group: int, index: int) -> Plan:
        return Plan(correct=index < correct[group],
                    finish="length" if (group, index) in truncated else "stop")

    engine = ScriptedEngine(tokenizer, script)
    manager = make_manager(config, engine, tokenizer, reward,
                           eval_datasets={"adds": prompt_dataset(str(data), tokenizer, config)})
    metrics = asyncio.run(asyncio.wait_for(manager.evaluate(), 300))

    assert {(p.temperature, p.max_new_tokens) for _, p in engine.calls} == {(0.5, 6)}
    assert metrics["eval/adds"] == pytest.approx(6 / 12)
    for k in (1, 2, 4):
        expected = sum(brute_force_pass_at_k(4, c, k) for c in correct.values()) / 3
        assert metrics[f"eval/adds/pass@{k}"] == pytest.approx(expected)
    assert "eval/adds/pass@8" not in metrics
    # A response is "\boxed{", one token per digit, "}", and EOS unless truncated.
    lengths = []
    for (a, b), group in zip([(11, 22), (33, 44), (55, 66)], range(3), strict=True):
        for index in range(4):
            plan = script(group, index)
            answer = a + b if plan.correct else a + b + 1
            lengths.append(2 + len(str(answer)) + (plan.finish == "stop"))
    assert metrics["eval/adds/response_len/mean"] == pytest.approx(sum(lengths) / 12)
    assert metrics["eval/adds/response_len/max"] == max(lengths)
    assert metrics["eval/adds/response_len/min"] == min(lengths)
    assert metrics["eval/adds/truncated_ratio"] == pytest.approx(1 / 12)


def test_rollout_max_context_len_caps_each_request(tmp_path, grpo_argv, tokenizer, reward):
    """Regression: a prompt with no room left came back with loss_mask and rollout_log_probs
    None, and one None makes TrainBatch drop the rollout log-probs of the whole batch."""
    data = write_prompts(tmp_path / "prompts.jsonl", [(11, 22), (111, 222)])  # 14, 16 tokens
    config = config_for(grpo_argv, "--prompt-data", str(data), "--rollout-batch-size", "2",
                        "--n-samples-per-prompt", "2", "--rollout-max-context-len", "16")
    engine = ScriptedEngine(tokenizer, mixed)
    manager = make_manager(config, engine, tokenizer, reward)
    assert [len(row.prompt_ids) for row in manager.dataset.rows] == [14, 16]
    short, full = generate(manager, 0).groups
    assert [(ids[:14], p.max_new_tokens) for ids, p in engine.calls] == [
        (list(manager.dataset.rows[0].prompt_ids), 2)] * 2
    for sample in short:
        assert (sample.response_length, sample.status) == (2, Status.TRUNCATED)
        assert len(sample.tokens) == 16
    for sample in full:
        assert (sample.response_length, sample.status, sample.reward) == (0, Status.TRUNCATED, 0.0)
        assert (sample.loss_mask, sample.rollout_log_probs) == ([], [])
    batch = TrainBatch.from_samples(short + full, None)
    assert batch.rollout_log_probs is not None
    assert [len(t) for t in batch.rollout_log_probs] == [2, 2, 0, 0]


def test_eval_takes_its_own_context_and_prompt_limits(tmp_path, grpo_argv, tokenizer, reward):
    """--eval-max-context-len caps eval requests in place of --rollout-max-context-len, and
    --eval-max-prompt-len drops longer eval prompts (Miles' eval flags)."""
    data = write_prompts(tmp_path / "eval.jsonl", [(11, 22), (111, 222)])  # 14, 16 tokens
    config = config_for(grpo_argv, "--eval-prompt-data", "adds", str(data),
                        "--rollout-max-context-len", "100", "--eval-max-context-len", "17",
                        "--eval-max-prompt-len", "15", "--eval-max-response-len", "8")
    train, evals = build_datasets(config, tokenizer)
    assert [len(row.prompt_ids) for row in evals["adds"].rows] == [14]
    assert evals["adds"].num_too_long == 1
    engine = ScriptedEngine(tokenizer, mixed)
    manager = make_manager(config, engine, tokenizer, reward, eval_datasets=evals)
    asyncio.run(asyncio.wait_for(manager.evaluate(), 300))
    assert [p.max_new_tokens for _, p in engine.calls] == [3]  # 17 - 14, not 8
    with pytest.raises(DataError, match="all 1 prompts are longer than "
                                        "--eval-max-prompt-len 15"):
        build_datasets(config_for(grpo_argv, "--eval-prompt-data", "big", str(write_prompts(
            tmp_path / "big.jsonl", [(111, 222)])), "--eval-max-prompt-len", "15"), tokenizer)


def test_eval_prompts_take_their_tools_from_the_eval_tool_key(tmp_path, grpo_argv, tokenizer):
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {}}}
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"prompt": "1+2=", "label": "3", "eval_tools": [tool]}) + "\n")
    config = config_for(grpo_argv, "--eval-prompt-data", "adds", str(data),
                        "--tool-key", "tools", "--eval-tool-key", "eval_tools")
    _, evals = build_datasets(config, tokenizer)
    assert evals["adds"].rows[0].tools == [tool]
