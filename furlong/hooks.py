"""User hooks: their signatures (one `Protocol` each, as docs/hooks.md lists them) and
loading them from their dotted paths (`load_hooks`, the one place that does).

A hook path is `package.module:function` or `package.module.function` (the last dotted
component is the function). A missing module or attribute is a `ValueError` that names
the flag, the path and how to fix it, raised at startup rather than mid-run.

This module stays light: the types of other furlong layers are imported for checking
only, so config validation can load hooks without importing the trainer or the engine.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import importlib
import inspect
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

from furlong.sample import Sample

if TYPE_CHECKING:
    import torch

    from furlong.rollout.context import HookArgs
    from furlong.rollout.filters import FilterResult
    from furlong.rollout.manager import RolloutManager
    from furlong.train.objective import LossInputs


class RewardHook(Protocol):
    """--custom-rm-path: `fn(args, sample, **kwargs) -> float | dict`, sync or async (Miles':
    async; furlong passes no keywords)."""

    def __call__(self, args: HookArgs, sample: Sample, **kwargs
                 ) -> float | dict | Awaitable[float | dict]: ...


class GroupRewardHook(Protocol):
    """--custom-rm-path with --group-rm: `fn(args, samples, **kwargs) -> list`, one reward
    per sample."""

    def __call__(self, args: HookArgs, samples: list[Sample], **kwargs
                 ) -> list | Awaitable[list]: ...


class RewardPostProcessHook(Protocol):
    """--custom-reward-post-process-path: `fn(args, samples, **kwargs) -> (raw_rewards,
    rewards)`, sync or async, over all the samples of a rollout (flat, in group order) once
    they are scored, as Miles calls it; one number of each per sample. `raw_rewards` are
    logged (rollout/raw_reward); `rewards` take the place of the advantage estimator's
    normalised rewards (GRPO's group-normalised ones). It may also set sample fields, such
    as `teacher_log_probs`."""

    def __call__(self, args: HookArgs, samples: list[Sample], **kwargs
                 ) -> tuple[list, list] | Awaitable[tuple[list, list]]: ...


class RolloutSampleFilterHook(Protocol):
    """--rollout-sample-filter-path: `fn(args, groups)`, sync or async, once a rollout has
    its groups (furlong's own rollout): it may set `sample.remove_sample` (the sample then
    trains no token), as in Miles."""

    def __call__(self, args: HookArgs, groups: list[list[Sample]]) -> Any: ...


class RolloutAllSamplesProcessHook(Protocol):
    """--rollout-all-samples-process-path: `fn(args, all_groups, data_source)`, sync or
    async, after the sample filter: every group of the rollout whose samples were all
    scored, those the dynamic filter dropped too (Miles' hook, e.g. for logging);
    `data_source(n)` hands out n groups of fresh samples, as Miles' does."""

    def __call__(self, args: HookArgs, all_groups: list[list[Sample]],
                 data_source: Callable[[int], list[list[Sample]]]) -> Any: ...


class BufferFilterHook(Protocol):
    """--buffer-filter-path: `fn(args, rollout_id, buffer, num_samples) -> groups`, sync,
    Miles' hook: up to `num_samples` groups of the partial-rollout buffer
    (`list[list[Sample]]`), which it removes from `buffer` itself; `rollout_id` is None,
    as Miles passes it. Unfinished samples note the rollout that started them in
    `metadata["start_rollout_id"]`."""

    def __call__(self, args: HookArgs, rollout_id: None, buffer: list[list[Sample]],
                 num_samples: int) -> list[list[Sample]]: ...


class DynamicSamplingFilterHook(Protocol):
    """--dynamic-sampling-filter-path: `fn(args, samples, **kwargs) -> bool | obj(.keep,
    .reason)`, sync or async; a falsy value or `.keep` drops the group (rollout/filters.py)."""

    def __call__(self, args: HookArgs, samples: list[Sample], **kwargs
                 ) -> bool | FilterResult | Awaitable[bool | FilterResult]: ...


class GenerateHook(Protocol):
    """--custom-generate-function-path (or a sample's `generate_function_path`):
    `async fn(args, sample, sampling_params: dict) -> Sample | list[Sample]` (SGLang's
    sampling-parameter names); a function with an `evaluation` parameter also gets
    `evaluation=` (True in eval), as from Miles."""

    async def __call__(self, args: HookArgs, sample: Sample,
                       sampling_params: dict) -> Sample | list[Sample]: ...


class RolloutFunctionHook(Protocol):
    """--rollout-function-path: `fn(args, rollout_id, data_source, evaluation=False)`, sync
    (run in the hook pool) or async; replaces the whole rollout, and eval. The
    data source is the RolloutManager: Miles' `get_samples(n)` and `add_samples(groups)`.
    Returns groups (list[list[Sample]]) or an object with `.samples` (and `.metrics`);
    with evaluation=True, Miles' `{name: {"rewards": [...], ...}}` or an object with
    `.data` holding it (read by rollout/manager.py)."""

    def __call__(self, args: HookArgs, rollout_id: int, data_source: RolloutManager,
                 evaluation: bool = False) -> Any: ...


class CustomLossHook(Protocol):
    """--custom-loss-function-path: `fn(args, inputs) -> (loss, metrics)`, sync; `loss` a
    scalar tensor with a gradient, `metrics` named values to log."""

    def __call__(self, args: HookArgs, inputs: LossInputs) -> tuple[torch.Tensor, dict]: ...


class AgentHook(Protocol):
    """--custom-agent-function-path (furlong.rollout.agentic:generate), Miles' contract:
    `async fn(base_url, prompt, request_kwargs, metadata) -> dict | None`; the agent talks
    to the OpenAI API at `base_url` (a session of exact tokens); the dict it returns is
    merged into the samples' metadata."""

    async def __call__(self, base_url: str, prompt, request_kwargs: dict,
                       metadata: dict) -> dict | None: ...


class ExecuteToolHook(Protocol):
    """--generate-execute-tool-function-path (furlong.rollout.multi_turn:generate):
    `fn(name, arguments) -> str`, sync or async; the tool message's content."""

    def __call__(self, name: str, arguments: dict) -> str | Awaitable[str]: ...


class TisHook(Protocol):
    """--custom-tis-function-path (with --use-tis), Miles' signature: `fn(args, *, pg_loss,
    train_log_probs, rollout_log_probs, loss_masks, total_lengths, response_lengths,
    parallel_state, max_seq_lens) -> (pg_loss, loss_masks, metrics)`. `pg_loss` is the
    (N,) per-token loss of a packed micro-batch; the log-prob and mask lists hold one (R_i,)
    tensor per sample; the returned masks may drop tokens (their loss leaves the numerator,
    the denominators stay); metrics are (N,) per-token values, reduced like the loss."""

    def __call__(self, args: object, **kwargs) -> tuple[torch.Tensor, list, dict]: ...


# Hook paths of Miles/slime launch scripts -> the furlong built-in that behaves the same,
# so those scripts run unchanged.
ALIASES = {
    f"{project}.rollout.filter_hub.dynamic_sampling_filters.{name}":
        f"furlong.rollout.filters:{name}"
    for project, name in (("slime", "check_reward_nonzero_std"),
                          ("miles", "check_reward_nonzero_std"), ("miles", "check_no_aborted"))
} | {
    "miles.rollout.generate_hub.multi_turn.generate": "furlong.rollout.multi_turn:generate",
    "miles.rollout.generate_hub.agentic_tool_call.generate": "furlong.rollout.agentic:generate",
} | {  # on-policy distillation from a teacher server (--opd-type sglang)
    f"{project}.rollout.on_policy_distillation.{name}": f"furlong.rollout.teacher:{name}"
    for project in ("miles", "slime") for name in ("reward_func", "post_process_rewards")
}


# Hooks.field -> (config group, flag field) of its dotted path.
HOOK_FLAGS = {
    "custom_rm": ("rollout", "custom_rm_path"),
    "reward_post_process": ("rollout", "custom_reward_post_process_path"),
    "rollout_sample_filter": ("rollout", "rollout_sample_filter_path"),
    "rollout_all_samples_process": ("rollout", "rollout_all_samples_process_path"),
    "buffer_filter": ("rollout", "buffer_filter_path"),
    "dynamic_sampling_filter": ("rollout", "dynamic_sampling_filter_path"),
    "generate": ("rollout", "custom_generate_function_path"),
    "rollout_function": ("rollout", "rollout_function_path"),
    "custom_loss": ("grpo", "custom_loss_function_path"),
    "custom_tis": ("grpo", "custom_tis_function_path"),
    "agent": ("rollout", "custom_agent_function_path"),
    "execute_tool": ("rollout", "generate_execute_tool_function_path"),
}


@dataclass(frozen=True)
class Hooks:
    """The run's user hooks, loaded; None where the flag is not given."""
    custom_rm: RewardHook | GroupRewardHook | None = None  # GroupRewardHook with --group-rm
    reward_post_process: RewardPostProcessHook | None = None
    rollout_sample_filter: RolloutSampleFilterHook | None = None
    rollout_all_samples_process: RolloutAllSamplesProcessHook | None = None
    buffer_filter: BufferFilterHook | None = None
    dynamic_sampling_filter: DynamicSamplingFilterHook | None = None
    generate: GenerateHook | None = None
    rollout_function: RolloutFunctionHook | None = None
    custom_loss: CustomLossHook | None = None
    custom_tis: TisHook | None = None
    agent: AgentHook | None = None
    execute_tool: ExecuteToolHook | None = None


def load_hooks(config) -> Hooks:
    """Import every hook the config names (ValueError naming the flag if one is missing)."""
    loaded = {}
    for field, (group, name) in HOOK_FLAGS.items():
        path = getattr(getattr(config, group), name)
        if path:
            loaded[field] = load_function(path, "--" + name.replace("_", "-"))
    return Hooks(**loaded)


# Threads of sync hooks: bounded (a reward hook runs once per sample), and apart from the
# loop's default executor, whose threads an engine may need to generate.
HOOK_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="furlong-hook")


async def call_hook(function: Callable, *args, **kwargs) -> Any:
    """`function(*args, **kwargs)`, its result awaited when it is awaitable.

    A sync function runs in HOOK_THREADS: not in the event loop, which serves the engine
    and the router front that hooks post to (a hook blocking on a request there would
    wait forever), and not in the loop's default executor, whose threads an engine may
    need to generate (blocked hooks holding them all would stall it too).
    """
    if inspect.iscoroutinefunction(function):
        return await function(*args, **kwargs)
    result = await asyncio.get_running_loop().run_in_executor(
        HOOK_THREADS, functools.partial(function, *args, **kwargs))
    return await result if inspect.isawaitable(result) else result


def takes_keyword(function: Callable, name: str) -> bool:
    """Whether `function` has a parameter `name` (Miles passes some keywords only then)."""
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def hook_target(path: str) -> str:
    """The `module.function` a hook path names: through ALIASES, in dotted form."""
    return ALIASES.get(path, path).replace(":", ".")


def load_function(path: str, flag: str) -> Callable:
    """Import `module:function` or `module.function` (or a known alias) and return it."""
    module_name, function_name = _split(hook_target(path), flag)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{flag} {path}: cannot import module '{module_name}' ({error}); put "
                         "its directory on PYTHONPATH or fix the module path") from error
    function = getattr(module, function_name, None)
    if function is None:
        raise ValueError(f"{flag} {path}: module '{module_name}' has no attribute "
                         f"'{function_name}'; define it there or fix the function name")
    if not callable(function):
        raise ValueError(f"{flag} {path}: '{function_name}' in '{module_name}' is a "
                         f"{type(function).__name__}, not a function")
    return function


def _split(path: str, flag: str) -> tuple[str, str]:
    module_name, separator, function_name = path.rpartition(":" if ":" in path else ".")
    if not separator or not module_name or not function_name:
        raise ValueError(f"{flag} {path}: expected module.path:function or "
                         "module.path.function (e.g. my_rewards:score)")
    return module_name, function_name


def read_custom_config(path: str | None) -> dict:
    """--custom-config-path: the YAML mapping in file `path`, or inline `base64:<payload>`
    (the YAML, base64-encoded); {} without one. ValueError naming the flag and the file."""
    if not path:
        return {}
    import yaml
    where = "the base64 payload" if path.startswith("base64:") else path
    try:
        if path.startswith("base64:"):
            text = base64.b64decode(path[len("base64:"):], validate=True).decode()
        else:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        data = yaml.safe_load(text) or {}
    except (OSError, UnicodeDecodeError, binascii.Error, yaml.YAMLError) as error:
        raise ValueError(f"--custom-config-path {where}: cannot read it as YAML "
                         f"({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"--custom-config-path {where}: expected a mapping of names to "
                         f"values, got a {type(data).__name__}")
    return data
