"""Cross-flag rules and derived values, applied before any heavy work.

`resolve` turns the parsed Config into the one the run uses: missing batch values
derived from the invariant, eval values inherited from rollout values, clip bounds
defaulted. Every mistake raises ConfigError naming the flag, the value and the fix.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from furlong.config.groups import GROUPS, Config, PerfArgs, flag_fields
from furlong.config.distillation_check import check_distillation
from furlong.config.lora_check import check_lora
from furlong.config.parser import ConfigError, option_name
from furlong.config.reward_types import LABELLED_REWARDS, split_rm_type
from furlong.config.trainer_flags import resolve_trainer_flags
from furlong.hooks import load_hooks

# Hook flags and their group: each path must import before the run starts.
# (eval field, rollout field) pairs: an unset eval value takes the rollout value.
EVAL_INHERITS = (
    ("eval_max_response_len", "rollout_max_response_len"),
    ("eval_top_p", "rollout_top_p"),
    ("eval_top_k", "rollout_top_k"),
    ("eval_temperature", "rollout_temperature"),
    ("eval_input_key", "input_key"),
    ("eval_label_key", "label_key"),
)


def resolve(config: Config) -> tuple[Config, list[str]]:
    """Apply every rule; returns the resolved config and the warnings to log once each."""
    config = _resolve_batch(config)
    config = _resolve_rollout(config)
    config = _resolve_eval(config)
    config = _resolve_grpo(config)
    config = _resolve_cluster(config)
    config, trainer_warnings = resolve_trainer_flags(config)  # before the recompute checks
    _check_external_engines(config)
    _check_checkpoint_formats(config)
    _check_optimizer(config)
    _check_perf(config)
    check_hooks(config)
    moe_warnings = _check_moe(config)
    return config, (megatron_only_warnings(config) + trainer_warnings + _soft_warnings(config)
                    + moe_warnings + check_lora(config))


def _positive(value: int | float | None, flag: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{flag} {value}: must be {bound}")


def _resolve_batch(config: Config) -> Config:
    r = config.rollout
    if r.rollout_batch_size is None:
        raise ConfigError("--rollout-batch-size is required: the number of prompts per rollout "
                          "(e.g. --rollout-batch-size 32)")
    for name in ("rollout_batch_size", "n_samples_per_prompt", "global_batch_size",
                 "num_steps_per_rollout", "micro_batch_size", "update_weights_interval",
                 "over_sampling_batch_size", "num_epoch"):
        _positive(getattr(r, name), option_name(name))
    _positive(r.num_rollout, "--num-rollout", allow_zero=True)
    samples = r.rollout_batch_size * r.n_samples_per_prompt
    invariant = (f"--rollout-batch-size x --n-samples-per-prompt ({r.rollout_batch_size} x "
                 f"{r.n_samples_per_prompt} = {samples}) must equal --global-batch-size x "
                 f"--num-steps-per-rollout")
    gbs, steps = r.global_batch_size, r.num_steps_per_rollout
    if gbs is None and steps is None:
        config = config.replace("rollout", "derived", global_batch_size=samples,
                                num_steps_per_rollout=1)
    elif steps is None:
        if samples % gbs:
            raise ConfigError(f"{invariant}; --global-batch-size {gbs} does not divide {samples}: "
                              f"use a divisor of {samples} or set --num-steps-per-rollout")
        config = config.replace("rollout", "derived", num_steps_per_rollout=samples // gbs)
    elif gbs is None:
        if samples % steps:
            raise ConfigError(f"{invariant}; --num-steps-per-rollout {steps} does not divide "
                              f"{samples}")
        config = config.replace("rollout", "derived", global_batch_size=samples // steps)
    elif gbs * steps != samples:
        raise ConfigError(f"{invariant}, but {gbs} x {steps} = {gbs * steps}: drop one of "
                          f"--global-batch-size / --num-steps-per-rollout to derive it")
    over = r.over_sampling_batch_size
    if over is None:
        config = config.replace("rollout", "derived", over_sampling_batch_size=r.rollout_batch_size)
    elif over < r.rollout_batch_size:
        raise ConfigError(f"--over-sampling-batch-size {over} is smaller than --rollout-batch-size "
                          f"{r.rollout_batch_size}: it must be >= it (or leave it unset)")
    return config


def _resolve_rollout(config: Config) -> Config:
    r, debug = config.rollout, config.debug
    if config.ckpt.hf_checkpoint is None:
        raise ConfigError("--hf-checkpoint is required: the HF directory with the tokenizer and "
                          "config.json (python -m furlong.tiny OUT writes a tiny one)")
    # Rollouts come from the engine unless replayed from disk or there are none (eval only).
    generates = not (debug.debug_train_only and debug.load_debug_rollout_data) \
        and r.num_rollout != 0
    if r.prompt_data is None and generates:
        raise ConfigError("--prompt-data is required: a .jsonl or .parquet file of prompts")
    if r.rollout_temperature < 0:
        raise ConfigError(f"--rollout-temperature {r.rollout_temperature}: must be >= 0 "
                          "(0 is greedy)")
    if not 0 < r.rollout_top_p <= 1:
        raise ConfigError(f"--rollout-top-p {r.rollout_top_p}: must be in (0, 1]")
    if r.rollout_top_k == 0 or r.rollout_top_k < -1:
        raise ConfigError(f"--rollout-top-k {r.rollout_top_k}: use -1 (off) or a positive k")
    if config.grpo.loss_type != "sft_loss" and generates:
        if r.rollout_max_response_len is None:
            raise ConfigError("--rollout-max-response-len is required: max new tokens per "
                              "response (e.g. --rollout-max-response-len 1024)")
        config = _resolve_reward(config)
    _positive(r.rollout_max_response_len, "--rollout-max-response-len")
    _positive(r.rollout_max_prompt_len, "--rollout-max-prompt-len")
    if r.rollout_function_path and config.grpo.loss_type == "sft_loss":
        raise ConfigError("--rollout-function-path and --loss-type sft_loss: the SFT rollout "
                          "reads responses from the data; drop one of them")
    ending = [option_name(name) for name in ("rollout_sample_filter_path",
                                             "rollout_all_samples_process_path")
              if getattr(r, name)]
    replaced = "--rollout-function-path" if r.rollout_function_path else \
        "--loss-type sft_loss" if config.grpo.loss_type == "sft_loss" else None
    if ending and replaced:
        raise ConfigError(f"{', '.join(ending)} runs at the end of furlong's own rollout, "
                          f"which {replaced} replaces; call it from there, or drop it")
    return config


def _resolve_reward(config: Config) -> Config:
    r = config.rollout
    if r.custom_rm_path is None and r.rm_type is None:
        raise ConfigError("no reward: set --rm-type (math, deepscaler, dapo, f1, gpqa, remote_rm, "
                          "random) or --custom-rm-path module:function")
    if r.group_rm and r.custom_rm_path is None:
        raise ConfigError("--group-rm scores whole groups and needs --custom-rm-path "
                          "module:function(args, samples) -> list")
    if r.custom_rm_path is not None:
        return config
    base = _reward_base(r.rm_type)
    if base == "remote_rm" and not r.rm_url:
        raise ConfigError("--rm-type remote_rm needs --rm-url http://HOST:PORT/PATH")
    if base in LABELLED_REWARDS and r.label_key is None:
        raise ConfigError(f"--rm-type {r.rm_type} compares responses with a label: set "
                          "--label-key to the label column (e.g. --label-key label)")
    if base == "dapo" and r.reward_key is None:
        config = config.replace("rollout", "derived", reward_key="score")
    return config


def _reward_base(rm_type: str) -> str:
    try:
        return split_rm_type(rm_type)[1]
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_hooks(config: Config) -> None:
    """Import every hook given by dotted path, so a typo fails before any heavy work."""
    try:
        load_hooks(config)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _resolve_eval(config: Config) -> Config:
    e, r = config.eval, config.rollout
    inherited = {eval_name: getattr(r, rollout_name) for eval_name, rollout_name in EVAL_INHERITS
                 if getattr(e, eval_name) is None and getattr(r, rollout_name) is not None}
    if inherited:
        config = config.replace("eval", "inherited", **inherited)
    if e.eval_prompt_data is not None:
        pairs = tuple(_eval_pairs(e.eval_prompt_data))
        if pairs != e.eval_prompt_data:  # a lone PATH got its name: derived; pairs stay "flag"
            config = config.replace("eval", "derived", eval_prompt_data=pairs)
    elif e.eval_interval is not None:
        raise ConfigError(f"--eval-interval {e.eval_interval} needs --eval-prompt-data NAME PATH")
    if e.eval_prompt_data is not None:
        config = _check_eval_reward(config)
        if config.eval.eval_max_response_len is None:  # SFT runs have no rollout length
            raise ConfigError("--eval-prompt-data needs --eval-max-response-len (or "
                              "--rollout-max-response-len): max new tokens per answer")
    _positive(e.eval_interval, "--eval-interval")
    _positive(e.eval_max_prompt_len, "--eval-max-prompt-len")
    _positive(e.eval_max_context_len, "--eval-max-context-len")
    _positive(e.n_samples_per_eval_prompt, "--n-samples-per-eval-prompt")
    return config


def _check_eval_reward(config: Config) -> Config:
    r, e = config.rollout, config.eval
    if r.custom_rm_path is None and r.rm_type is None:
        raise ConfigError("--eval-prompt-data needs a reward to score answers: set --rm-type "
                          "or --custom-rm-path")
    base = _reward_base(r.rm_type) if r.custom_rm_path is None else None
    if base in LABELLED_REWARDS and e.eval_label_key is None:
        raise ConfigError(f"--rm-type {r.rm_type} compares answers with a label: set "
                          "--eval-label-key (or --label-key) to the eval label column")
    return config


def _eval_pairs(values: tuple[str, ...]) -> list[str]:
    """NAME PATH [NAME PATH ...]; a lone PATH is named after its file."""
    if len(values) == 1:
        path = values[0]
        return [Path(path.split("@[")[0]).stem, path]
    if len(values) % 2:
        raise ConfigError(f"--eval-prompt-data {' '.join(values)}: give NAME PATH pairs "
                          "(or one PATH)")
    return list(values)


def eval_datasets(config: Config) -> list[tuple[str, str]]:
    """The resolved (name, path) pairs of --eval-prompt-data."""
    values = config.eval.eval_prompt_data or ()
    return list(zip(values[::2], values[1::2], strict=True))


def _resolve_grpo(config: Config) -> Config:
    g = config.grpo
    if g.eps_clip_high is None:
        config = config.replace("grpo", "derived", eps_clip_high=g.eps_clip)
    if g.eps_clip_c is not None and g.eps_clip_c <= 1:
        raise ConfigError(f"--eps-clip-c {g.eps_clip_c}: the dual-clip bound must be > 1 "
                          "(e.g. 3.0)")
    if g.advantage_estimator == "ppo":
        raise ConfigError("--advantage-estimator ppo needs a critic, which this build does not "
                          "have yet: use grpo, gspo, reinforce_plus_plus or "
                          "reinforce_plus_plus_baseline")
    if g.kl_coef and g.advantage_estimator in ("grpo", "gspo"):
        raise ConfigError(f"--kl-coef {g.kl_coef} shapes rewards, which {g.advantage_estimator} "
                          "does not use: use --use-kl-loss --kl-loss-coef instead")
    if g.advantage_estimator.startswith("reinforce_plus_plus") and not g.normalize_advantages:
        raise ConfigError(f"--advantage-estimator {g.advantage_estimator} requires "
                          "--normalize-advantages")
    if g.loss_type == "custom_loss" and not g.custom_loss_function_path:
        raise ConfigError("--loss-type custom_loss needs --custom-loss-function-path "
                          "module:function")
    if g.kl_loss_coef and not g.use_kl_loss:
        raise ConfigError(f"--kl-loss-coef {g.kl_loss_coef} has no effect without --use-kl-loss")
    if not 0 <= g.tis_clip_low <= g.tis_clip:
        raise ConfigError(f"--tis-clip-low {g.tis_clip_low} / --tis-clip {g.tis_clip}: need "
                          "0 <= low <= high")
    _positive(g.ref_update_interval, "--ref-update-interval")
    _positive(g.opsm_delta, "--opsm-delta", allow_zero=True)
    check_distillation(config)
    return config


def _resolve_cluster(config: Config) -> Config:
    """--offload sets both offload flags; --colocate turns on each one the command line
    leaves unset, as in Miles (the trainer and the engines take turns on the devices;
    --no-offload-train / --no-offload-rollout keep one side resident)."""
    c = config.cluster
    if c.offload and not (c.offload_train and c.offload_rollout):
        config = config.replace("cluster", "derived", offload_train=True, offload_rollout=True)
    if c.colocate:
        unset = {name: True for name in ("offload_train", "offload_rollout")
                 if not config.given(f"cluster.{name}") and not getattr(config.cluster, name)}
        if unset:
            config = config.replace("cluster", "derived", **unset)
    if c.train_backend == "megatron":
        raise ConfigError("--train-backend megatron is not available in this build: use "
                          "--train-backend fsdp (the default)")
    for name in ("actor_num_nodes", "actor_num_gpus_per_node", "num_gpus_per_node",
                 "rollout_num_gpus"):
        _positive(getattr(c, name), option_name(name))
    _positive(config.sglang.rollout_num_gpus_per_engine, "--rollout-num-gpus-per-engine")
    return config


def _check_external_engines(config: Config) -> None:
    r = config.rollout
    addresses = r.rollout_external_engine_addrs or ()
    if r.rollout_external and not addresses:
        raise ConfigError("--rollout-external needs --rollout-external-engine-addrs HOST:PORT "
                          "[HOST:PORT ...]: the engine servers that are already running")
    if addresses and not r.rollout_external:
        raise ConfigError("--rollout-external-engine-addrs is read only with "
                          "--rollout-external: add it, or drop the addresses")
    if r.rollout_external and r.rollout_backend in ("hf", "fast"):
        raise ConfigError(f"--rollout-external uses running servers, --rollout-backend "
                          f"{r.rollout_backend} an engine in this process: drop one of them")
    for address in addresses:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--rollout-external-engine-addrs {address}: expected HOST:PORT, "
                              "e.g. 10.0.0.5:30000")


def megatron_checkpoint(path: str | Path) -> Path | None:
    """The directory of a Megatron distributed (torch_dist) checkpoint at `path`: `path`
    itself or one of its iter_* directories, holding `.metadata` and `*.distcp` files."""
    path = Path(path)
    if not path.is_dir():
        return None
    for directory in (path, *sorted(path.glob("iter_*"))):
        if (directory / ".metadata").is_file() and any(directory.glob("*.distcp")):
            return directory
    return None


def _check_checkpoint_formats(config: Config) -> None:
    """--load, --ref-load and --opd-teacher-load are furlong checkpoints or HF directories,
    not Megatron's."""
    models = "loads HF-format model directories and furlong checkpoints"
    for group, name, what, instead in (
            ("ckpt", "load", "resumes furlong's own checkpoints (--save) only", "hf_checkpoint"),
            ("ckpt", "ref_load", models, "ref_load"),
            ("grpo", "opd_teacher_load", models, "opd_teacher_load")):
        path = getattr(getattr(config, group), name)
        found = megatron_checkpoint(path) if path else None
        if found is not None:
            raise ConfigError(
                f"{option_name(name)} {path}: {found} is a Megatron distributed checkpoint "
                "(torch_dist: .metadata and *.distcp files), which furlong cannot read; "
                f"{option_name(name)} {what}. Convert it to an HF directory first, e.g. with "
                "Miles' tools/convert_torch_dist_to_hf.py --input-dir "
                f"{found} --output-dir HF_DIR --origin-hf-dir "
                f"{config.ckpt.hf_checkpoint}, then pass {option_name(instead)} HF_DIR")


def _check_optimizer(config: Config) -> None:
    o = config.optimizer
    _positive(o.lr, "--lr", allow_zero=True)
    if o.min_lr > o.lr:
        raise ConfigError(f"--min-lr {o.min_lr} is above --lr {o.lr}")
    if o.lr_warmup_fraction is not None and o.lr_warmup_iters:
        raise ConfigError("--lr-warmup-fraction and --lr-warmup-iters both set: keep one")
    if o.lr_warmup_fraction is not None and not 0 <= o.lr_warmup_fraction <= 1:
        raise ConfigError(f"--lr-warmup-fraction {o.lr_warmup_fraction}: must be in [0, 1]")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(o, name) < 1:
            raise ConfigError(f"{option_name(name)} {getattr(o, name)}: must be in [0, 1)")


def _check_perf(config: Config) -> None:
    p = config.perf
    if p.expert_tensor_parallel_size != 1:
        raise ConfigError(f"--expert-tensor-parallel-size {p.expert_tensor_parallel_size}: the "
                          "fsdp backend does not do this parallelism; it needs the megatron "
                          "backend (--train-backend megatron), or set it to 1")
    _positive(p.pipeline_model_parallel_size, "--pipeline-model-parallel-size")
    _check_pipeline_stages(p)
    _positive(p.tensor_model_parallel_size, "--tensor-model-parallel-size")
    _positive(p.context_parallel_size, "--context-parallel-size")
    _positive(p.expert_model_parallel_size, "--expert-model-parallel-size")
    if p.use_dynamic_batch_size and p.max_tokens_per_gpu is None:
        raise ConfigError("--use-dynamic-batch-size needs --max-tokens-per-gpu N (the token "
                          "budget of one packed micro-batch)")
    _positive(p.max_tokens_per_gpu, "--max-tokens-per-gpu")
    if p.recompute_method and p.recompute_granularity != "full":
        raise ConfigError(f"--recompute-method {p.recompute_method} applies to "
                          "--recompute-granularity full")


def _check_pipeline_stages(p: PerfArgs) -> None:
    """The stage-size flags shape pipeline stages (train/pipeline_layout.py checks them
    against the model's layers): each at least 1, and only with several stages."""
    for name in ("num_layers_per_virtual_pipeline_stage", "decoder_first_pipeline_num_layers",
                 "decoder_last_pipeline_num_layers"):
        value = getattr(p, name)
        _positive(value, option_name(name))
        if value is not None and p.pipeline_model_parallel_size == 1:
            raise ConfigError(f"{option_name(name)} {value} needs --pipeline-model-parallel-size "
                              "above 1: give several stages, or leave the flag out")


def megatron_only_warnings(config: Config) -> list[str]:
    """One warning per given flag that only the Megatron backend acts on, or that names a
    Miles feature furlong does not have (inert_flags.py)."""
    warnings = []
    for _, attr, cls in GROUPS:
        for f in flag_fields(cls):
            if not config.given(f"{attr}.{f.name}"):
                continue
            why = f": {f.metadata['why']}" if f.metadata.get("why") else ""
            if f.metadata.get("megatron_only"):
                warnings.append(f"{option_name(f.name)} has no effect on the "
                                f"{config.cluster.train_backend} backend (Megatron only{why}); "
                                "ignored")
            elif f.metadata.get("inert"):
                warnings.append(f"{option_name(f.name)} has no effect in furlong{why}; ignored")
    return warnings


def _soft_warnings(config: Config) -> list[str]:
    warnings = []
    p, r = config.perf, config.rollout
    if p.sequence_parallel and p.tensor_model_parallel_size == 1:
        warnings.append("--sequence-parallel has no effect with --tensor-model-parallel-size 1")
    if (r.rm_type or "").removeprefix("boxed_") == "deepscaler":
        warnings.append("--rm-type deepscaler scores only the text after the last </think>; a "
                        "response without </think> scores 0 (use --rm-type math for models "
                        "that do not think)")
    if config.logging.use_wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--use-wandb needs the wandb package: pip install 'furlong[wandb]'")
    return warnings


def _check_moe(config: Config) -> list[str]:
    """Rejects a negative loss weight and the load-balancing losses the trainer does not
    compute; returns a warning for each MoE flag that Megatron itself ignores in the
    combination given (config.json is checked in model_check)."""
    m = config.model
    warnings = []
    _positive(m.moe_aux_loss_coeff, "--moe-aux-loss-coeff", allow_zero=True)
    if m.moe_router_pre_softmax and m.moe_router_score_function == "sigmoid":
        warnings.append("--moe-router-pre-softmax has no effect with --moe-router-score-function "
                        "sigmoid (it applies to softmax scores only); ignored")
    balancing = m.moe_router_load_balancing_type
    if m.moe_aux_loss_coeff > 0 and balancing == "global_aux_loss":
        raise ConfigError("--moe-router-load-balancing-type global_aux_loss is not supported "
                          "yet: use aux_loss (per micro-batch) or seq_aux_loss (per sequence)")
    if m.moe_aux_loss_coeff > 0 and balancing.endswith("aux_loss") \
            and m.moe_router_score_function == "sigmoid":
        raise ConfigError("--moe-aux-loss-coeff with --moe-router-score-function sigmoid: "
                          "furlong's load-balancing loss takes softmax router probabilities; "
                          "set --moe-aux-loss-coeff 0 for sigmoid routers")
    if m.moe_aux_loss_coeff > 0 and balancing in ("sinkhorn", "none"):
        warnings.append(f"--moe-aux-loss-coeff {m.moe_aux_loss_coeff} has no effect with "
                        f"--moe-router-load-balancing-type {balancing} (no auxiliary loss); "
                        "ignored")
    if (m.moe_aux_loss_coeff == 0 and balancing.endswith("aux_loss")
            and config.given("model.moe_router_load_balancing_type")):
        warnings.append(f"--moe-router-load-balancing-type {balancing} has no effect with "
                        "--moe-aux-loss-coeff 0 (the loss is weighted 0); ignored")
    return warnings
