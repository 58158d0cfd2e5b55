"""RolloutManager: turns prompts into scored groups of samples for one rollout.

generate(rollout_id):
  1. take groups from the buffer (partial rollouts) or new prompts, `over_sampling`
     prompts per refill, n samples each;
  2. generate every sample (the generate hook), score the group (the reward model),
     and ask the dynamic filter whether the group enters the batch;
  3. refill while accepted + in-flight groups < rollout_batch_size;
  4. once enough groups passed, abort the engine's remaining requests; with
     --partial-rollout the unfinished groups go back to the buffer.
Finished groups are examined in submission order (generation itself runs
concurrently), so the outcome does not depend on timing and a resumed run repeats it.
"""
from __future__ import annotations

import asyncio
import inspect
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from furlong.config.groups import Config
from furlong.data import PromptDataset, PromptRow
from furlong.rollout import stats
from furlong.rollout.filters import FilterResult, as_filter_result
from furlong.rollout.generate import sample_seed
from furlong.rollout.sft import sft_sample
from furlong.sample import Sample, Status


@dataclass
class RolloutResult:
    groups: list[list[Sample]]
    metrics: dict[str, float]


async def _maybe_await(value):
    return await value if inspect.isawaitable(value) else value


def sampling_dict(config: Config, evaluation: bool = False) -> dict:
    """The SGLang sampling_params of rollout (or eval) requests."""
    r, e = config.rollout, config.eval
    return {
        "temperature": e.eval_temperature if evaluation else r.rollout_temperature,
        "top_p": e.eval_top_p if evaluation else r.rollout_top_p,
        "top_k": e.eval_top_k if evaluation else r.rollout_top_k,
        "max_new_tokens": e.eval_max_response_len if evaluation else r.rollout_max_response_len,
        "stop": list(r.rollout_stop or ()),
        "stop_token_ids": list(r.rollout_stop_token_ids or ()),
        "skip_special_tokens": r.rollout_skip_special_tokens,
    }


class RolloutManager:
    def __init__(self, config: Config, hook_args, dataset: PromptDataset | None,
                 reward_model, generate_fn: Callable, filter_fn: Callable | None,
                 eval_datasets: dict[str, PromptDataset] | None = None,
                 rollout_fn: Callable | None = None):
        self.config = config
        self.args = hook_args
        self.dataset = dataset
        self.reward_model = reward_model
        self.generate_fn = generate_fn
        self.filter_fn = filter_fn
        self.eval_datasets = eval_datasets or {}
        # --rollout-function-path: fn(args, rollout_id, manager, evaluation)
        self.rollout_fn = rollout_fn
        self.buffer: list[list[Sample]] = []
        self.next_group_index = 0

    # ---- data --------------------------------------------------------------------------
    def _new_group(self, row: PromptRow, size: int) -> list[Sample]:
        group_index, self.next_group_index = self.next_group_index, self.next_group_index + 1
        return [Sample(group_index=group_index, index=i, prompt=row.prompt,
                       tokens=list(row.prompt_ids), label=row.label,
                       metadata=dict(row.metadata)) for i in range(size)]

    def next_groups(self, count: int) -> list[list[Sample]]:
        """`count` groups: buffered ones first, then fresh prompts (the data source of hooks)."""
        groups, self.buffer = self.buffer[:count], self.buffer[count:]
        size = self.config.rollout.n_samples_per_prompt
        groups += [self._new_group(row, size)
                   for row in self.dataset.next_rows(count - len(groups))]
        return groups

    # ---- one rollout -------------------------------------------------------------------
    async def generate(self, rollout_id: int) -> RolloutResult:
        r = self.config.rollout
        if self.config.grpo.loss_type == "sft_loss":
            groups = self._sft_groups(r.rollout_batch_size)
            return RolloutResult(groups, stats.response_stats(
                [s for g in groups for s in g], "rollout"))
        if self.rollout_fn is not None:
            groups = await _maybe_await(self.rollout_fn(self.args, rollout_id, self, False))
            return RolloutResult(groups, stats.rollout_stats(groups, r.reward_key, {}))
        return await self._generate_filtered(r.rollout_batch_size)

    def _sft_groups(self, count: int) -> list[list[Sample]]:
        tokenizer, kwargs = self.args.tokenizer, self.config.rollout.apply_chat_template_kwargs
        groups = []
        for row in self.dataset.next_rows(count):
            groups.append([sft_sample(tokenizer, row, self.next_group_index, kwargs)])
            self.next_group_index += 1
        return groups

    async def _generate_filtered(self, target: int) -> RolloutResult:
        r = self.config.rollout
        params = sampling_dict(self.config)
        in_flight: list[asyncio.Task] = []
        accepted: list[list[Sample]] = []
        drops: Counter = Counter()
        try:
            while len(accepted) < target:
                if len(accepted) + len(in_flight) < target:
                    in_flight += [asyncio.create_task(self._run_group(g, params))
                                  for g in self.next_groups(r.over_sampling_batch_size)]
                group = await in_flight.pop(0)
                verdict = await self._filter(group)
                if verdict.keep:
                    accepted.append(group)
                else:
                    drops[verdict.reason] += 1
        except BaseException:  # the rollout failed: its other groups stop (engines abort)
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            raise
        await self._abort(in_flight)
        return RolloutResult(accepted, stats.rollout_stats(accepted, r.reward_key, drops))

    async def _abort(self, in_flight: list[asyncio.Task]) -> None:
        """Stop surplus generation; with --partial-rollout keep the groups for later."""
        if not in_flight:
            return
        await self.args.engine.abort_all()
        leftovers = await asyncio.gather(*in_flight)
        if self.config.rollout.partial_rollout:
            self.buffer = [self._reset_for_reuse(g) for g in leftovers] + self.buffer

    @staticmethod
    def _reset_for_reuse(group: list[Sample]) -> list[Sample]:
        for sample in group:
            sample.reward = None
            if sample.status == Status.ABORTED:
                sample.status = Status.PENDING
        return group

    async def _run_group(self, group: list[Sample], params: dict) -> list[Sample]:
        """Generate the unfinished samples of a group, then score it if all finished."""
        seed = self.config.rollout.rollout_seed
        tasks = []
        for sample in group:
            if sample.status in (Status.PENDING, Status.ABORTED):
                request = {**params, "sampling_seed": sample_seed(
                    seed, sample.group_index, sample.index, sample.response_length)}
                tasks.append(self.generate_fn(self.args, sample, request))
            else:
                tasks.append(_maybe_await(sample))
        results = await asyncio.gather(*tasks)
        group = [s for result in results
                 for s in (result if isinstance(result, list) else [result])]
        if all(s.status not in (Status.ABORTED, Status.PENDING) for s in group):
            rewards = await self.reward_model.score_group(group)
            for sample, reward in zip(group, rewards, strict=True):
                sample.reward = reward
        return group

    async def _filter(self, group: list[Sample]) -> FilterResult:
        if any(s.reward is None for s in group):
            return FilterResult(False, "aborted")
        if self.filter_fn is None:
            return FilterResult(True)
        return as_filter_result(await _maybe_await(self.filter_fn(self.args, group)))

    # ---- eval --------------------------------------------------------------------------
    async def evaluate(self) -> dict[str, float]:
        """Every eval dataset once, n_samples_per_eval_prompt each; eval/NAME metrics."""
        e = self.config.eval
        params = sampling_dict(self.config, evaluation=True)
        metrics = {}
        for name, dataset in self.eval_datasets.items():
            groups = [[Sample(group_index=g, index=i, prompt=row.prompt,
                              tokens=list(row.prompt_ids), label=row.label,
                              metadata=dict(row.metadata))
                       for i in range(e.n_samples_per_eval_prompt)]
                      for g, row in enumerate(dataset.rows)]
            groups = await asyncio.gather(*(self._run_group(g, params) for g in groups))
            metrics.update(stats.eval_stats(name, groups, self.config.rollout.reward_key,
                                            e.log_passrate))
        return metrics

    # ---- checkpoint --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"dataset": self.dataset.state_dict() if self.dataset else None,
                "next_group_index": self.next_group_index,
                "buffer": [[s.to_dict() for s in group] for group in self.buffer]}

    def load_state_dict(self, state: dict) -> None:
        if self.dataset is not None and state["dataset"] is not None:
            self.dataset.load_state_dict(state["dataset"])
        self.next_group_index = state["next_group_index"]
        self.buffer = [[Sample.from_dict(s) for s in group] for group in state["buffer"]]

