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

A --rollout-function-path function replaces all of it, and eval: it gets the manager as
its data source (Miles' `get_samples(n)` / `add_samples(groups)`) and returns the groups
in one of Miles' forms (`read_rollout_output`, `read_eval_output`).
"""
from __future__ import annotations

import asyncio
import copy
import inspect
from collections import Counter
from dataclasses import dataclass, replace
from statistics import mean

from furlong.config.groups import Config
from furlong.data import PromptDataset, PromptEncoder, PromptRow
from furlong.hooks import Hooks, call_hook, load_function, takes_keyword
from furlong.rollout import stats
from furlong.rollout.filters import FilterResult, as_filter_result
from furlong.rollout.generate import generate as default_generate
from furlong.rollout.generate import sample_seed
from furlong.rollout.sft import sft_sample
from furlong.sample import Sample, Status


@dataclass
class RolloutResult:
    groups: list[list[Sample]]
    metrics: dict[str, float]
    # --custom-reward-post-process-path: its (raw rewards, rewards), one per sample in the
    # groups' order; the rewards replace the advantage estimator's normalised ones.
    post_processed: tuple[list[float], list[float]] | None = None


async def _maybe_await(value):
    return await value if inspect.isawaitable(value) else value


def flatten_group(items: list) -> list[Sample]:
    """A group whose entries are samples or lists of them (a generate function may return
    several samples for one) as one list of samples."""
    return [s for item in items for s in (item if isinstance(item, list) else [item])]


def read_rollout_output(output) -> tuple[list[list[Sample]], dict]:
    """(groups, metrics) of what a rollout function returned: a list of groups, or an
    object with `.samples` and optionally `.metrics` (Miles' RolloutFnTrainOutput)."""
    metrics = {}
    if hasattr(output, "samples"):
        output, metrics = output.samples, dict(getattr(output, "metrics", None) or {})
    if not isinstance(output, list):
        raise ValueError(f"--rollout-function-path returned a {type(output).__name__}; "
                         "return a list of groups (list[list[Sample]]) or an object with "
                         ".samples holding one")
    groups = [flatten_group(group) for group in output]
    for sample in (s for group in groups for s in group):
        sample.validate()
    return groups, metrics


def read_eval_output(output) -> dict[str, dict]:
    """{dataset name: {"rewards": [...], optionally "truncated", "samples"}} of what a
    rollout function returned for evaluation=True: that dict, or an object with `.data`
    holding it (Miles' RolloutFnEvalOutput)."""
    data = getattr(output, "data", output)
    if not (isinstance(data, dict) and all(isinstance(v, dict) and "rewards" in v
                                           for v in data.values())):
        raise ValueError("--rollout-function-path with evaluation=True returned "
                         f"{type(output).__name__}; return {{dataset name: {{'rewards': [...]"
                         ", 'truncated': [...], 'samples': [...]}}}} or an object with .data "
                         "holding it, as Miles' eval rollout does")
    return data


def read_post_processed(output, num_samples: int) -> tuple[list[float], list[float]]:
    """(raw rewards, rewards) of what a --custom-reward-post-process-path hook returned:
    two sequences of `num_samples` numbers."""
    if not (isinstance(output, (tuple, list)) and len(output) == 2):
        raise ValueError("--custom-reward-post-process-path returned "
                         f"{type(output).__name__}; return (raw_rewards, rewards), two lists "
                         "with one number per sample")
    lists = []
    for name, values in zip(("raw_rewards", "rewards"), output, strict=True):
        values = values.tolist() if hasattr(values, "tolist") else values
        if not (isinstance(values, (list, tuple)) and len(values) == num_samples):
            count = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise ValueError(f"--custom-reward-post-process-path returned {count} {name} for "
                             f"{num_samples} samples; return one number per sample")
        try:
            lists.append([float(value) for value in values])
        except (TypeError, ValueError) as error:
            raise ValueError(f"--custom-reward-post-process-path: {name} must be numbers "
                             f"({error})") from None
    return lists[0], lists[1]


def eval_output_stats(data: dict[str, dict], reward_key: str | None,
                      log_passrate: bool) -> dict[str, float]:
    """eval/NAME metrics of a rollout function's eval data: those of furlong's own eval
    where it gives the samples (grouped by group_index), else from its rewards (None
    counts 0, as in Miles) and truncation flags."""
    metrics = {}
    for name, entry in data.items():
        if entry.get("samples"):
            groups: dict = {}
            for sample in entry["samples"]:
                key = sample.group_index if sample.group_index is not None else id(sample)
                groups.setdefault(key, []).append(sample)
            metrics.update(stats.eval_stats(name, list(groups.values()), reward_key,
                                            log_passrate))
            continue
        rewards = [0.0 if r is None else float(r) for r in entry["rewards"]]
        metrics[f"eval/{name}"] = mean(rewards) if rewards else 0.0
        if entry.get("truncated"):
            metrics[f"eval/{name}/truncated_ratio"] = mean(map(bool, entry["truncated"]))
    return metrics


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
                 reward_model, hooks: Hooks = Hooks(),
                 eval_datasets: dict[str, PromptDataset] | None = None):
        """`hooks`: the run's user hooks (hooks.load_hooks); the default generate function
        where none is given."""
        self.config = config
        self.args = hook_args
        self.dataset = dataset
        self.reward_model = reward_model
        self.hooks = hooks
        self.generate_fn = hooks.generate or default_generate
        self.eval_datasets = eval_datasets or {}
        self.buffer: list[list[Sample]] = []
        self.next_group_index = 0
        r = config.rollout
        self._render = PromptEncoder(hook_args.tokenizer, r.apply_chat_template,
                                     r.apply_chat_template_kwargs).render

    # ---- data --------------------------------------------------------------------------
    def _samples(self, row: PromptRow, group_index: int, size: int) -> list[Sample]:
        """`size` fresh samples of a prompt, as Miles' data source gives them: `prompt` the
        chat template's text with --apply-chat-template, else the row's string or chat
        messages; `tokens` what the engine sees; the --tool-key column, when the row has
        one, in metadata["tools"]."""
        prompt = self._render(row.prompt, row.tools)
        tools = {} if row.tools is None else {"tools": row.tools}
        return [Sample(group_index=group_index, index=i, prompt=copy.deepcopy(prompt),
                       tokens=list(row.prompt_ids), label=row.label,
                       metadata=copy.deepcopy({**row.metadata, **tools})) for i in range(size)]

    def _new_group(self, row: PromptRow, size: int) -> list[Sample]:
        group_index, self.next_group_index = self.next_group_index, self.next_group_index + 1
        return self._samples(row, group_index, size)

    def next_groups(self, count: int) -> list[list[Sample]]:
        """`count` groups: buffered ones first (those --buffer-filter-path takes out of the
        buffer, else the first), then fresh prompts (the data source of hooks)."""
        groups = self._from_buffer(count)
        size = self.config.rollout.n_samples_per_prompt
        groups += [self._new_group(row, size)
                   for row in self.dataset.next_rows(count - len(groups))]
        return groups

    def _from_buffer(self, count: int) -> list[list[Sample]]:
        """Up to `count` buffered groups, removed from the buffer. A --buffer-filter-path
        hook, Miles' `fn(args, rollout_id, buffer, num_samples)` (rollout_id None, as Miles
        passes it), removes what it returns from the buffer itself."""
        if not self.buffer or not count:
            return []
        if self.hooks.buffer_filter is None:
            groups, self.buffer = self.buffer[:count], self.buffer[count:]
            return groups
        groups = list(self.hooks.buffer_filter(self.args, None, self.buffer, count))
        if len(groups) > count:
            raise ValueError(f"--buffer-filter-path returned {len(groups)} groups for "
                             f"num_samples {count}; return at most that many")
        return groups

    def get_samples(self, num_samples: int) -> list[list[Sample]]:
        """Miles' DataSource.get_samples: `num_samples` groups (`next_groups`)."""
        return self.next_groups(num_samples)

    def add_samples(self, groups: list[list[Sample]]) -> None:
        """Miles' DataSource.add_samples: groups handed out again by later calls, after
        those already waiting."""
        self.buffer.extend(groups)

    # ---- one rollout -------------------------------------------------------------------
    async def generate(self, rollout_id: int) -> RolloutResult:
        r = self.config.rollout
        if self.config.grpo.loss_type == "sft_loss":
            groups = self._sft_groups(r.rollout_batch_size)
            return RolloutResult(groups, stats.response_stats(
                [s for g in groups for s in g], "rollout"))
        if self.hooks.rollout_function is not None:
            groups, metrics = read_rollout_output(await call_hook(
                self.hooks.rollout_function, self.args, rollout_id, self, evaluation=False))
            return self._result(groups, {}, metrics)
        return await self._generate_filtered(rollout_id, r.rollout_batch_size)

    def _result(self, groups: list[list[Sample]], drops: dict[str, int],
                metrics: dict | None = None) -> RolloutResult:
        """The rollout's groups with their metrics; those of the rewards wait for
        `post_process` where a reward post-process hook gives the rewards."""
        scalar = self.hooks.reward_post_process is None
        return RolloutResult(groups, {**stats.rollout_stats(
            groups, self.config.rollout.reward_key, drops, scalar_rewards=scalar),
            **(metrics or {})})

    async def post_process(self, result: RolloutResult) -> RolloutResult:
        """--custom-reward-post-process-path: the hook's (raw rewards, rewards) over the
        rollout's samples, and the metrics of the raw ones, as Miles post-processes a
        rollout (also one loaded from --load-debug-rollout-data) before training. Without
        the hook, `result` as it is."""
        if self.hooks.reward_post_process is None:
            return result
        samples = [s for group in result.groups for s in group]
        raw, rewards = read_post_processed(
            await call_hook(self.hooks.reward_post_process, self.args, samples), len(samples))
        return replace(result, metrics={**result.metrics,
                                        **stats.reward_stats(result.groups, raw)},
                       post_processed=(raw, rewards))

    def _sft_groups(self, count: int) -> list[list[Sample]]:
        tokenizer, kwargs = self.args.tokenizer, self.config.rollout.apply_chat_template_kwargs
        groups = []
        for row in self.dataset.next_rows(count):
            groups.append([sft_sample(tokenizer, row, self.next_group_index, kwargs)])
            self.next_group_index += 1
        return groups

    async def _generate_filtered(self, rollout_id: int, target: int) -> RolloutResult:
        r = self.config.rollout
        params = sampling_dict(self.config)
        in_flight: list[asyncio.Task] = []
        accepted: list[list[Sample]] = []
        finished: list[list[Sample]] = []  # kept or dropped by the filter, not aborted
        drops: Counter = Counter()
        try:
            while len(accepted) < target:
                if len(accepted) + len(in_flight) < target:
                    in_flight += [asyncio.create_task(self._run_group(g, params))
                                  for g in self.next_groups(r.over_sampling_batch_size)]
                group = await in_flight.pop(0)
                complete = all(s.reward is not None for s in group)
                verdict = await self._filter(group, complete)
                if complete:
                    finished.append(group)
                if verdict.keep:
                    accepted.append(group)
                else:
                    drops[verdict.reason] += 1
        except BaseException:  # the rollout failed: its other groups stop (engines abort)
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            raise
        await self._abort(in_flight, rollout_id)
        await self._end_hooks(accepted, finished)
        return self._result(accepted, drops)

    async def _end_hooks(self, accepted: list[list[Sample]],
                         finished: list[list[Sample]]) -> None:
        """Miles' end-of-rollout hooks: the sample filter on the kept groups (it may set
        remove_sample), then the all-samples process on every finished group, with Miles'
        data source, `get_samples`."""
        hooks = self.hooks
        if hooks.rollout_sample_filter is not None:
            await call_hook(hooks.rollout_sample_filter, self.args, accepted)
        if hooks.rollout_all_samples_process is not None:
            await call_hook(hooks.rollout_all_samples_process, self.args, finished,
                            self.get_samples)

    async def _abort(self, in_flight: list[asyncio.Task], rollout_id: int) -> None:
        """Stop surplus generation; with --partial-rollout keep the groups for later."""
        if not in_flight:
            return
        await self.args.engine.abort_all()
        leftovers = await asyncio.gather(*in_flight)
        if self.config.rollout.partial_rollout:
            self.buffer = [self._reset_for_reuse(g, rollout_id) for g in leftovers] + self.buffer

    @staticmethod
    def _reset_for_reuse(group: list[Sample], rollout_id: int) -> list[Sample]:
        """A group going back to the buffer: unscored, its aborted samples pending again;
        a sample with part of a response notes the rollout that started it
        (metadata["start_rollout_id"], as Miles notes it, for buffer filters)."""
        for sample in group:
            sample.reward = None
            if sample.status == Status.ABORTED:
                sample.status = Status.PENDING
            if sample.response:
                sample.metadata.setdefault("start_rollout_id", rollout_id)
        return group

    async def _run_group(self, group: list[Sample], params: dict,
                         evaluation: bool = False) -> list[Sample]:
        """Generate the unfinished samples of a group, then score it if all finished."""
        seed = self.config.rollout.rollout_seed
        tasks = []
        for sample in group:
            if sample.status in (Status.PENDING, Status.ABORTED):
                request = {**params, "sampling_seed": sample_seed(
                    seed, sample.group_index, sample.index, sample.response_length)}
                tasks.append(self._generate(sample, request, evaluation))
            else:
                tasks.append(_maybe_await(sample))
        group = flatten_group(await asyncio.gather(*tasks))
        for sample in group:
            sample.validate()
        if all(s.status not in (Status.ABORTED, Status.PENDING) for s in group):
            await self._score(group)
        return group

    def _generate(self, sample: Sample, request: dict, evaluation: bool):
        """The generate function's call for `sample`: the sample's own function where it
        names one (Miles' `generate_function_path`), with `evaluation=` where it takes it."""
        path = sample.generate_function_path
        function = load_function(path, "Sample.generate_function_path") if path \
            else self.generate_fn
        keywords = {"evaluation": evaluation} if takes_keyword(function, "evaluation") else {}
        return function(self.args, sample, request, **keywords)

    async def _score(self, group: list[Sample]) -> None:
        """Reward the samples that have none yet (a generate function may set it, as in
        Miles); with --group-rm the group hook rewards the whole group."""
        unscored = group if self.config.rollout.group_rm else [s for s in group
                                                              if s.reward is None]
        rewards = await self.reward_model.score_group(unscored)
        for sample, reward in zip(unscored, rewards, strict=True):
            sample.reward = reward

    async def _filter(self, group: list[Sample], complete: bool) -> FilterResult:
        """Whether the group enters the batch: not with a sample left unscored (aborted),
        else the dynamic filter's verdict."""
        if not complete:
            return FilterResult(False, "aborted")
        keep = self.hooks.dynamic_sampling_filter
        if keep is None:
            return FilterResult(True)
        return as_filter_result(await call_hook(keep, self.args, group))

    # ---- eval --------------------------------------------------------------------------
    async def evaluate(self, rollout_id: int = 0) -> dict[str, float]:
        """Every eval dataset once, n_samples_per_eval_prompt each; eval/NAME metrics.
        With --rollout-function-path the function evaluates (evaluation=True), as in Miles."""
        e = self.config.eval
        if self.hooks.rollout_function is not None:
            data = read_eval_output(await call_hook(self.hooks.rollout_function, self.args,
                                                    rollout_id, self, evaluation=True))
            return eval_output_stats(data, self._eval_reward_key, e.log_passrate)
        params = sampling_dict(self.config, evaluation=True)
        metrics = {}
        for name, dataset in self.eval_datasets.items():
            groups = [self._samples(row, g, e.n_samples_per_eval_prompt)
                      for g, row in enumerate(dataset.rows)]
            groups = await asyncio.gather(*(self._run_group(g, params, evaluation=True)
                                            for g in groups))
            metrics.update(stats.eval_stats(name, groups, self._eval_reward_key,
                                            e.log_passrate))
        return metrics

    @property
    def _eval_reward_key(self) -> str | None:
        """--eval-reward-key, else --reward-key (Miles')."""
        return self.config.eval.eval_reward_key or self.config.rollout.reward_key

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

