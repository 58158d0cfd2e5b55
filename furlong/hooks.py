"""User hooks: their signatures (one `Protocol` each, as docs/hooks.md lists them) and
loading them from their dotted paths (`load_hooks`, the one place that does).

A hook path is `package.module:function` or `package.module.function` (the last dotted
component is the function). A missing module or attribute is a `ValueError` that names
the flag, the path and how to fix it, raised at startup rather than mid-run.

This module stays light: the types of other furlong layers are imported for checking
only, so config validation can load hooks without importing the trainer or the engine.
"""
from __future__ import annotations

import base64
import binascii
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol

from furlong.sample import Sample

if TYPE_CHECKING:
    import torch

    from furlong.rollout.context import HookArgs
    from furlong.rollout.filters import FilterResult
    from furlong.rollout.manager import RolloutManager
    from furlong.train.objective import LossInputs


class RewardHook(Protocol):
    """--custom-rm-path: `fn(args, sample) -> float | dict`, sync or async."""

    def __call__(self, args: HookArgs, sample: Sample
                 ) -> float | dict | Awaitable[float | dict]: ...


class GroupRewardHook(Protocol):
    """--custom-rm-path with --group-rm: `fn(args, samples) -> list`, one reward per sample."""

    def __call__(self, args: HookArgs, samples: list[Sample]) -> list | Awaitable[list]: ...


class DynamicSamplingFilterHook(Protocol):
    """--dynamic-sampling-filter-path: `fn(args, samples) -> bool | obj(.keep, .reason)`,
    sync or async; a falsy value or `.keep` drops the group (rollout/filters.py)."""

    def __call__(self, args: HookArgs, samples: list[Sample]
                 ) -> bool | FilterResult | Awaitable[bool | FilterResult]: ...


class GenerateHook(Protocol):
    """--custom-generate-function-path: `async fn(args, sample, sampling_params: dict)
    -> Sample | list[Sample]` (SGLang's sampling-parameter names)."""

    async def __call__(self, args: HookArgs, sample: Sample,
                       sampling_params: dict) -> Sample | list[Sample]: ...


class RolloutFunctionHook(Protocol):
    """--rollout-function-path: `fn(args, rollout_id, manager, evaluation)
    -> list[list[Sample]]`, sync or async; replaces the whole rollout."""

    def __call__(self, args: HookArgs, rollout_id: int, manager: RolloutManager,
                 evaluation: bool) -> list[list[Sample]] | Awaitable[list[list[Sample]]]: ...


class CustomLossHook(Protocol):
    """--custom-loss-function-path: `fn(args, inputs) -> (loss, metrics)`, sync; `loss` a
    scalar tensor with a gradient, `metrics` named values to log."""

    def __call__(self, args: HookArgs, inputs: LossInputs) -> tuple[torch.Tensor, dict]: ...


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
    f"{project}.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std":
        "furlong.rollout.filters:check_reward_nonzero_std"
    for project in ("slime", "miles")
}


# Hooks.field -> (config group, flag field) of its dotted path.
HOOK_FLAGS = {
    "custom_rm": ("rollout", "custom_rm_path"),
    "dynamic_sampling_filter": ("rollout", "dynamic_sampling_filter_path"),
    "generate": ("rollout", "custom_generate_function_path"),
    "rollout_function": ("rollout", "rollout_function_path"),
    "custom_loss": ("grpo", "custom_loss_function_path"),
    "custom_tis": ("grpo", "custom_tis_function_path"),
}


@dataclass(frozen=True)
class Hooks:
    """The run's user hooks, loaded; None where the flag is not given."""
    custom_rm: RewardHook | GroupRewardHook | None = None  # GroupRewardHook with --group-rm
    dynamic_sampling_filter: DynamicSamplingFilterHook | None = None
    generate: GenerateHook | None = None
    rollout_function: RolloutFunctionHook | None = None
    custom_loss: CustomLossHook | None = None
    custom_tis: TisHook | None = None


def load_hooks(config) -> Hooks:
    """Import every hook the config names (ValueError naming the flag if one is missing)."""
    loaded = {}
    for field, (group, name) in HOOK_FLAGS.items():
        path = getattr(getattr(config, group), name)
        if path:
            loaded[field] = load_function(path, "--" + name.replace("_", "-"))
    return Hooks(**loaded)


def load_function(path: str, flag: str) -> Callable:
    """Import `module:function` or `module.function` (or a known alias) and return it."""
    module_name, function_name = _split(ALIASES.get(path, path), flag)
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
