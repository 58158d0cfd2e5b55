"""Build the roles of a run from its Config, in order: data, trainer, engine, rollout.

Each `build_*` function makes one piece; `build_run` calls them in the order the
pieces depend on each other and restores a checkpoint when --load holds one.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from furlong import checkpoint
from furlong.cluster.placement import plan_placement
from furlong.config import Config, eval_datasets
from furlong.data import DataError, DataKeys, PromptDataset, PromptEncoder
from furlong.engine.adapter import AdapterEngine
from furlong.engine.base import Engine
from furlong.engine.factory import create_engine, engine_options
from furlong.hooks import Hooks, load_hooks
from furlong.model.lora import ADAPTER_NAME
from furlong.output.metrics import MetricsLogger
from furlong.rollout import agentic, multi_turn
from furlong.rollout.context import HookArgs
from furlong.rollout.manager import RolloutManager
from furlong.rollout.rewards import RewardModel
from furlong.rollout.tools import ToolSetup
from furlong.rollout.router_front import RouterFront, given_router
from furlong.train.actor import RankInfo, TrainActor
from furlong.train.base import Trainer
from furlong.train.process_env import prepare_trainer_process

log = logging.getLogger("furlong")


@dataclass
class Run:
    """Everything the loop drives. `start_rollout`/`num_rollout` bound the loop."""
    config: Config
    argv: list[str]
    tokenizer: object
    trainer: Trainer | None  # a TrainActor in this process, or a RayTrainGroup
    engine: Engine | None
    manager: RolloutManager
    logger: MetricsLogger
    run_dir: Path
    start_rollout: int
    num_rollout: int
    closers: list[Callable[[], None]] = field(default_factory=list)  # run at shutdown
    router_front: RouterFront | None = None  # served by the loop while the run lasts


def build_tokenizer(config: Config):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(config.ckpt.hf_checkpoint)


def build_datasets(config: Config, tokenizer) -> tuple[PromptDataset | None, dict]:
    r, e = config.rollout, config.eval
    encoder = PromptEncoder(tokenizer, r.apply_chat_template, r.apply_chat_template_kwargs)
    train = None
    if r.prompt_data is not None:
        train = PromptDataset(r.prompt_data, DataKeys(r.input_key, r.label_key, r.metadata_key,
                                                      r.tool_key),
                              encoder, r.rollout_max_prompt_len, r.rollout_shuffle, r.rollout_seed)
        if train.num_too_long:
            log.warning("dropped %d of %d prompts longer than --rollout-max-prompt-len %d",
                        train.num_too_long, train.num_too_long + len(train),
                        r.rollout_max_prompt_len)
    eval_keys = DataKeys(e.eval_input_key or r.input_key, e.eval_label_key, r.metadata_key,
                         e.eval_tool_key or r.tool_key)
    evals = {name: PromptDataset(path, eval_keys, encoder, e.eval_max_prompt_len,
                                 max_prompt_len_flag="--eval-max-prompt-len")
             for name, path in eval_datasets(config)}
    for name, dataset in evals.items():
        if dataset.num_too_long:
            log.warning("eval dataset %s: dropped %d of %d prompts longer than "
                        "--eval-max-prompt-len %d", name, dataset.num_too_long,
                        dataset.num_too_long + len(dataset), e.eval_max_prompt_len)
    return train, evals


def count_rollouts(config: Config, dataset: PromptDataset | None) -> int:
    """--num-rollout, or len(dataset) // rollout_batch_size * num_epoch."""
    r = config.rollout
    if r.num_rollout is not None:
        return r.num_rollout
    if dataset is None:
        raise ValueError("--num-rollout is required when there is no --prompt-data")
    rollouts = len(dataset) // r.rollout_batch_size * r.num_epoch
    if rollouts == 0:
        raise DataError(f"--prompt-data has {len(dataset)} prompts (after filtering), fewer "
                        f"than --rollout-batch-size {r.rollout_batch_size}: no rollout would "
                        "run; lower --rollout-batch-size or set --num-rollout")
    return rollouts


def build_rank() -> RankInfo:
    """One process: the first GPU if there is one, else the CPU."""
    if torch.cuda.is_available():
        return RankInfo(device=torch.device("cuda", 0))
    return RankInfo(device=torch.device("cpu"))


def build_in_process(config: Config, hooks: Hooks, tokenizer, init: str, total_steps: int,
                     trains: bool, generates: bool) -> tuple[TrainActor | None, Engine | None]:
    """Trainer and engine in this process (the engine boots from --hf-checkpoint, or under
    LoRA computes with the trainer's base; the actor's weights or adapter are pushed to it
    before the first rollout). --train-env-vars and
    --deterministic-mode apply to this process first, as to each Ray trainer rank."""
    prepare_trainer_process(config)
    rank = build_rank()
    trainer = None
    if trains:
        log.info("actor weights from %s", init)
        trainer = TrainActor(config, rank, init, total_steps, hooks.custom_loss,
                             HookArgs(config))
    engine = None
    if generates:
        engine = create_engine(config.ckpt.hf_checkpoint, tokenizer, rank.device,
                               rank.compute_dtype,
                               engine_options(config, shares_device=trainer is not None),
                               base=trainer.frozen_base() if trainer is not None else None)
    return trainer, engine


def check_generate_setup(config: Config, hooks: Hooks) -> None:
    """The built-in multi-turn and agent generate functions' flags, checked at startup
    rather than at the first sample (a ValueError naming the flag)."""
    r = config.rollout
    if hooks.generate is multi_turn.generate:
        ToolSetup.load(r.generate_tool_specs_path, r.generate_tool_call_parser,
                       r.generate_execute_tool_function_path)
    if hooks.generate is agentic.generate and hooks.agent is None:
        raise ValueError("--custom-generate-function-path furlong.rollout.agentic:generate runs "
                         "the agent that --custom-agent-function-path names: give it "
                         "(module:function, async fn(base_url, prompt, request_kwargs, "
                         "metadata) -> dict | None)")


def build_router(config: Config, engine: Engine | None,
                 tokenizer) -> tuple[RouterFront | None, tuple[str, int] | None]:
    """The SGLang router hooks post to (args.sglang_router_ip/port): the user's, named by
    --sglang-router-ip/--sglang-router-port, or else a front over the run's engine."""
    given = given_router(config.sglang)
    if given is not None or engine is None:
        return None, given
    from transformers import AutoConfig
    model = AutoConfig.from_pretrained(config.ckpt.hf_checkpoint).get_text_config()
    context = config.rollout.rollout_max_context_len or model.max_position_embeddings
    front = RouterFront(engine, tokenizer, model.vocab_size, config.ckpt.hf_checkpoint, context,
                        config.grpo.use_rollout_routing_replay)
    return front, front.address


def build_manager(config: Config, hooks: Hooks, hook_args: HookArgs, dataset,
                  evals) -> RolloutManager:
    r = config.rollout
    reward = None
    if r.rm_type or hooks.custom_rm:
        reward = RewardModel(r.rm_type, hooks.custom_rm, r.group_rm, r.rm_url, r.rm_timeout,
                             r.rm_on_error, hook_args, r.rollout_seed)
    return RolloutManager(config, hook_args, dataset, reward, hooks, evals)


def run_directory(config: Config) -> Path:
    if config.logging.run_dir:
        return Path(config.logging.run_dir)
    if config.ckpt.save:
        return Path(config.ckpt.save)
    return Path("runs") / time.strftime("furlong-%Y%m%d-%H%M%S")


def build_run(config: Config, argv: list[str]) -> Run:
    random.seed(config.optimizer.seed)
    torch.manual_seed(config.optimizer.seed)
    hooks = load_hooks(config)
    check_generate_setup(config, hooks)
    tokenizer = build_tokenizer(config)
    dataset, evals = build_datasets(config, tokenizer)
    num_rollout = count_rollouts(config, dataset)
    resume = checkpoint.latest_iteration(config.ckpt.load)
    init = (str(checkpoint.iteration_dir(config.ckpt.load, resume)) if resume is not None
            else config.ckpt.ref_load or config.ckpt.hf_checkpoint)
    trains = not config.debug.debug_rollout_only
    generates = not config.debug.debug_train_only and config.grpo.loss_type != "sft_loss" \
        or bool(evals)
    total_steps = num_rollout * config.rollout.num_steps_per_rollout
    placement = plan_placement(config, torch.cuda.device_count())
    closers: list[Callable[[], None]] = []
    if placement.in_process:
        trainer, engine = build_in_process(config, hooks, tokenizer, init, total_steps, trains,
                                           generates)
    else:  # Ray is imported only by runs that use it
        from furlong.cluster.ray_cluster import build_ray_roles
        roles = build_ray_roles(config, placement, init, total_steps,
                                engine_options(config, shares_device=placement.colocate), trains)
        trainer, engine = roles.trainer, roles.engine
        closers.append(roles.close)
    rollout_engine = engine
    if engine is not None and config.lora.lora_rank > 0:
        rollout_engine = AdapterEngine(engine, ADAPTER_NAME)  # sample the policy, not the base
    router_front, router = build_router(config, rollout_engine, tokenizer)
    hook_args = HookArgs(config, rollout_engine, tokenizer, router)
    manager = build_manager(config, hooks, hook_args, dataset, evals)
    run_dir = run_directory(config)
    run = Run(config, argv, tokenizer, trainer, engine, manager,
              MetricsLogger(run_dir, config.logging, dict(config.sources)), run_dir,
              0 if resume is None else resume + 1, num_rollout, closers, router_front)
    if resume is not None:
        restore(run, checkpoint.iteration_dir(config.ckpt.load, resume))
    return run


def restore(run: Run, directory: Path) -> None:
    """Optimizer, schedule, RNG and rollout state of a checkpoint (weights load with the actor)."""
    log.info("resuming from %s", directory)
    if run.trainer is not None:
        run.trainer.restore(directory)
    run.manager.load_state_dict(checkpoint.read_rollout_state(directory))
