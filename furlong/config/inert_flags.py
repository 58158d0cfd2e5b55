"""Miles and Megatron flags that furlong accepts but does not act on, one mixin per group.

Miles' launch scripts pass them, so each is declared with Miles' (or Megatron's) type,
default, arity and choices; giving one produces one warning that names it and says
why it has no effect here or what furlong does instead (validate.py). Flags are listed
under the reason they share: `megatron(...)` for Megatron's own flags (the warning says
"Megatron only"), `inert(...)` for features of Miles that furlong does not have. Each
group class of groups.py inherits its mixin (`class ModelArgs(ModelInertFlags)`); the
parser lists the flags that act first.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from furlong.config.flag import flag, json_object

# ---------------------------------------------------------------- how a flag is written

SWITCH = (bool, False, {})


def value(kind: type, default: Any = None, *, choices: tuple | None = None,
          nargs: str | int | None = None, parse: Any = None) -> tuple:
    """A flag that takes a value: (element type, default, extra flag() arguments)."""
    return kind, default, {"choices": choices, "nargs": nargs, "parse": parse}


def _field(name: str, spec: tuple, why: str, megatron_only: bool) -> tuple:
    kind, default, extra = spec
    annotation: Any = kind
    if extra.get("nargs") not in (None, "?"):
        annotation = tuple[kind, ...]
        default = tuple(default) if isinstance(default, list) else default
    if default is None:
        annotation = annotation | None
    kinds = {"megatron_only": True} if megatron_only else {"inert": True}
    extra = {key: item for key, item in extra.items() if item is not None}
    return name, annotation, flag(default, why=why, **kinds, **extra)


def megatron(why: str, **flags: tuple) -> list[tuple]:
    """Megatron flags that share one reason for having no effect on furlong's trainer."""
    return [_field(name, spec, why, True) for name, spec in flags.items()]


def inert(why: str, **flags: tuple) -> list[tuple]:
    """Flags of Miles features that furlong does not have, sharing one reason."""
    return [_field(name, spec, why, False) for name, spec in flags.items()]


def mixin(name: str, *reasons: list[tuple]) -> type:
    """A frozen dataclass holding the fields of several reasons, for a group to inherit."""
    fields = [item for reason in reasons for item in reason]
    cls = dataclasses.make_dataclass(name, fields, frozen=True)
    cls.__module__ = __name__
    return cls


# ---------------------------------------------------------------- reasons shared by many

FROM_HF_CONFIG = ("Megatron's description of the architecture; furlong builds the model "
                  "from the config.json of --hf-checkpoint")
FUSED_KERNEL = "a Megatron fused-kernel switch; furlong's trainer is FSDP2 + torch.compile"
LOW_PRECISION = ("a Transformer Engine FP8/FP4 recipe; furlong's trainer has no FP8/FP4 "
                 "training (engines quantise with --sglang-quantization)")
MEGATRON_DDP = ("Megatron's data-parallel and optimizer sharding; FSDP2 shards the "
                "optimizer state and overlaps its own collectives")
MEGATRON_PLUGIN = ("a hook into Megatron's training loop; furlong's hooks are listed in "
                   "docs/hooks.md")
CI_ONLY = "a check of Miles' own CI test suite"
NO_CRITIC = "furlong has no critic model (--advantage-estimator ppo is refused)"
NO_MULTI_LORA = "furlong trains one adapter per run; Miles' multi-LoRA service is not implemented"
NO_EXPERT_LORA = ("furlong puts LoRA on attention and dense MLP projections; adapters on MoE "
                  "experts are not implemented")
NO_DISTILLATION = ("furlong's on-policy distillation (--use-opd) uses the log-probs of the "
                   "sampled tokens (--opd-log-prob-top-k 0)")
NO_FULLY_ASYNC = ("furlong's asynchrony is train_async.py: one rollout ahead, weights pushed "
                  "every --update-weights-interval rollouts")
NO_SESSIONS = ("furlong's agent sessions are routes of every engine server and of the "
               "hooks' router (docs/agents.md), not a server of their own; appended messages "
               "are tokenised with the tokenizer's own chat template, and a request extends a "
               "trajectory only when its messages start with the recorded ones")
WEIGHT_PUSH = ("furlong pushes weights to the engines in --update-weight-buffer-size buckets "
               "over its own transport")
SAMPLE_HOOK = ("a hook of Miles' rollout buffer; furlong's sample hooks are "
               "--dynamic-sampling-filter-path, --custom-rm-path, "
               "--custom-reward-post-process-path, --rollout-sample-filter-path, "
               "--rollout-all-samples-process-path and --buffer-filter-path")
OWN_FAULT_HANDLING = ("furlong's router health-checks its engines itself; Miles' fault-tolerance "
                      "controller does not apply")
NO_EXTRA_SINK = "not a furlong metrics sink; use --use-wandb or --use-tensorboard"
MILES_DEBUG = "a debugging aid of Miles' Megatron or weight-sync internals"
MTP = "multi-token-prediction layers are not trained by furlong"


# ---------------------------------------------------------------- the mixins, by group

ModelInertFlags = mixin(
    "ModelInertFlags",
    megatron(FROM_HF_CONFIG,
             apply_layernorm_1p=SWITCH, attention_output_gate=SWITCH,
             multi_latent_attention=SWITCH, kv_lora_rank=value(int, 32),
             q_lora_rank=value(int), qk_head_dim=value(int, 128),
             qk_pos_emb_head_dim=value(int, 64), v_head_dim=value(int, 128),
             rotary_scaling_factor=value(float, 1.0), mscale=value(float, 1.0),
             mscale_all_dim=value(float, 0.0), beta_fast=value(float, 32.0),
             beta_slow=value(float, 1.0), original_max_position_embeddings=value(int),
             rope_type=value(str, choices=("rope", "yarn")), use_rope_scaling=SWITCH,
             rotary_interleaved=SWITCH, no_position_embedding=SWITCH,
             post_mlp_layernorm=SWITCH, post_self_attn_layernorm=SWITCH,
             softmax_type=value(str, "vanilla", choices=("vanilla", "off-by-one", "learnable")),
             window_size=value(str), window_attn_skip_freq=value(str),
             activation_func_clamp_value=value(float),
             no_activation_func_clamp_shared_expert=SWITCH,
             experimental_attention_variant=value(str), enable_experimental=SWITCH,
             dsa_indexer_n_heads=value(int), dsa_indexer_head_dim=value(int),
             dsa_indexer_topk=value(int), dsv4_hc_mult=value(int),
             dsv4_hc_sinkhorn_iters=value(int), dsv4_compress_ratios=value(str),
             dsv4_compress_rope_theta=value(float), dsv4_o_groups=value(int),
             dsv4_o_lora_rank=value(int), dsv4_n_hash_layers=value(int),
             dsv4_window_size=value(int), padded_vocab_size=value(int),
             moe_input_jitter_eps=value(float), moe_router_force_load_balancing=SWITCH,
             moe_router_force_biased=value(float)),
    megatron(FUSED_KERNEL,
             no_rope_fusion=SWITCH, no_masked_softmax_fusion=SWITCH,
             no_bias_dropout_fusion=SWITCH, no_bias_swiglu_fusion=SWITCH,
             use_flash_attn=SWITCH,
             transformer_impl=value(str, "transformer_engine",
                                    choices=("local", "transformer_engine")),
             qkv_format=value(str, "thd", choices=("thd", "bshd")),
             moe_flex_dispatcher_backend=value(str, "deepep", choices=("deepep", "hybridep")),
             moe_router_padding_for_quantization=SWITCH),
    megatron("furlong's router keeps the checkpoint's expert bias as loaded",
             freeze_e_score_correction_bias=SWITCH),
    megatron(MTP, mtp_num_layers=value(int), mtp_loss_scaling_factor=value(float, 0.2),
             enable_mtp_training=SWITCH),
    inert("a kernel choice of Miles' Megatron models; furlong's model code picks its own",
          linear_attention_backend=value(str, "fla", choices=("fla", "flashqla")),
          miles_dsa_topk_backend=value(str, "torch", choices=("torch", "flashinfer")),
          dsa_attention_backend=value(str, "tilelang", choices=("megatron", "tilelang")),
          freeze_indexer=SWITCH),
    megatron(MEGATRON_PLUGIN,
             custom_model_provider_path=value(str), custom_megatron_init_path=value(str),
             custom_megatron_before_log_prob_hook_path=value(str),
             custom_megatron_before_train_step_hook_path=value(str)),
)

CkptInertFlags = mixin(
    "CkptInertFlags",
    megatron("furlong's --load resumes model, optimizer and RNG together; to start "
             "afresh from weights, give them as --ref-load without --load",
             no_load_optim=SWITCH, no_load_rng=SWITCH, finetune=SWITCH),
    inert("furlong's checkpoints hold HF-named weights, converted by name with no bridge",
          megatron_to_hf_mode=value(str, "raw", choices=("raw", "bridge")),
          model_name=value(str), extra_high_precision_layers_hf=value(str, [], nargs="*"),
          extra_high_precision_layers_megatron=value(str, [], nargs="*")),
    inert("--ref-load names one checkpoint; give the iter_ directory itself",
          ref_ckpt_step=value(int)),
    inert("furlong starts at the iteration after --load's latest checkpoint",
          start_rollout_id=value(int)),
    inert("furlong saves every --save-interval rollouts and at the last one",
          save_trigger_sentinel=value(str)),
    megatron(MEGATRON_PLUGIN, custom_megatron_post_save_hook_path=value(str)),
    megatron("a Megatron resume-memory option; furlong's resume has no such switch",
             low_memory_resume=SWITCH),
    inert(NO_CRITIC, critic_load=value(str), critic_save=value(str)),
)

RolloutInertFlags = mixin(
    "RolloutInertFlags",
    inert(NO_FULLY_ASYNC,
          fully_async=SWITCH, max_weight_staleness=value(int),
          async_max_concurrent_samples=value(int),
          async_data_buffer_capacity_factor=value(float, 2.0),
          async_unused_samples_handler=value(str, "drop", choices=("retry", "drop")),
          custom_async_data_buffer_path=value(str),
          rollout_submission_granularity=value(str, choices=("group", "sample")),
          mask_offpolicy_in_partial_rollout=SWITCH),
    inert("rollout data passes between furlong's processes through Ray",
          object_store_backend=value(str, "ray"),
          mooncake_store_init_kwargs=value(dict, parse=json_object),
          mooncake_replica_num=value(int, 1), use_distributed_post=SWITCH, http_proxy=value(str)),
    inert(WEIGHT_PUSH,
          update_weight_transfer_mode=value(str, "broadcast",
                                            choices=("broadcast", "p2p", "disk-delta")),
          update_weight_disk_dir=value(str), update_weight_local_checkpoint_dir=value(str),
          update_weight_delta_encoding=value(str, "xor", choices=("xor", "overwrite")),
          update_weight_delta_checksum=value(str, "xxh3-128",
                                             choices=("xxh3-128", "blake3", "adler32")),
          custom_update_weight_post_write_path=value(str), p2p_transfer_num_workers=value(int, 4),
          p2p_transfer_timeout=value(float, 30.0)),
    inert("furlong's engines finish the requests in flight before weights change",
          pause_generation_mode=value(str, "retract", choices=("abort", "retract", "in_place"))),
    inert(SAMPLE_HOOK,
          rollout_data_postprocess_path=value(str),
          custom_convert_samples_to_train_data_path=value(str),
          data_source_path=value(str, "miles.rollout.data_source.RolloutDataSourceWithBuffer"),
          disable_rollout_global_dataset=SWITCH, disable_rollout_trim_samples=SWITCH,
          use_dynamic_global_batch_size=SWITCH,
          allow_partial_train_step=SWITCH),
    inert("a client of Miles' external rollout buffer service; furlong generates its "
          "rollouts itself",
          rollout_buffer_url=value(str), fetch_trajectory_retry_times=value(int, -1),
          min_batch_collection_ratio=value(float, 1.0), rollout_task_type=value(str, "math"),
          loss_mask_type=value(str, "qwen", choices=("qwen", "qwen3", "distill_qwen"))),
    inert("furlong renders prompts with the tokenizer's own chat template",
          chat_template_path=value(str)),
    inert("furlong's prompts are text; images and other media are not read",
          multimodal_keys=value(dict, parse=json_object)),
    inert(NO_SESSIONS,
          use_session_server=value(str, nargs="?"), session_server_ip=value(str),
          session_server_port=value(int, nargs="+"), tito_model=value(str, "default"),
          session_message_matcher=value(str, "strict"),
          session_sample_picker_path=value(
              str, "miles.rollout.session.v2.picker_hub.drop_retries"),
          session_sample_postprocessor_path=value(
              str, "miles.rollout.session.v2.postprocessor_hub.default_postprocess")),
)

EvalInertFlags = mixin(
    "EvalInertFlags",
    inert("furlong evaluates the --eval-prompt-data datasets on the rollout engines, with "
          "the --eval-* sampling flags",
          eval_function_path=value(str), eval_config=value(str),
          eval_min_new_tokens=value(int)),
    inert("furlong has no separate eval engines: eval runs on the rollout engines, in step",
          eval_num_gpus=value(int, 0), eval_num_gpus_per_engine=value(int, 1),
          eval_hf_dir=value(str), eval_max_in_flight=value(int, 2),
          eval_overflow_policy=value(str, "backpressure", choices=("backpressure", "skip")),
          eval_keep_snapshots=value(int, 2)),
)

PerfInertFlags = mixin(
    "PerfInertFlags",
    megatron(LOW_PRECISION,
             fp8_format=value(str, choices=("e4m3", "hybrid")),
             fp8_recipe=value(str, "delayed",
                              choices=("tensorwise", "delayed", "mxfp8", "blockwise")),
             fp8_param_gather=SWITCH, fp4_format=value(str, choices=("e2m1",)),
             fp4_recipe=value(str, "nvfp4", choices=("nvfp4", "custom")),
             first_last_layers_bf16=SWITCH, num_layers_at_start_in_bf16=value(int, 1),
             num_layers_at_end_in_bf16=value(int, 1), te_precision_config_file=value(str),
             reuse_grad_buf_for_mxfp8_param_ag=SWITCH, grad_reduce_in_bf16=SWITCH),
    megatron(MEGATRON_DDP,
             use_distributed_optimizer=SWITCH, overlap_grad_reduce=SWITCH,
             overlap_param_gather=SWITCH, no_gradient_accumulation_fusion=SWITCH,
             offload_optimizer_states=SWITCH,
             distributed_backend=value(str, "nccl"), distributed_timeout_minutes=value(int, 10),
             indep_dp=SWITCH, delay_split_train_data_by_dp=SWITCH),
    megatron("furlong's --optimizer-cpu-offload keeps the whole optimizer on the CPU, "
             "Megatron's default fraction 1.0; a share stepped on the device is not implemented",
             optimizer_offload_fraction=value(float, 1.0)),
    megatron("Megatron's context-parallel exchange schemes; furlong's has one, not chosen by flag",
             cp_comm_type=value(str, ["p2p"], nargs="+"), allgather_cp=SWITCH),
    megatron("Megatron's NaN check of loss and gradients; furlong's trainer has no such switch",
             no_check_for_nan_in_loss_and_grad=SWITCH),
    inert("furlong's log-prob passes use --max-tokens-per-gpu; --log-probs-chunk-size "
          "bounds their memory",
          log_probs_max_tokens_per_gpu=value(int), recompute_loss_function=SWITCH),
    inert("furlong balances micro-batches by token count (--use-dynamic-batch-size)",
          balance_by_flops=SWITCH, data_pad_size_multiplier=value(int, 128)),
    inert("furlong reserves no fixed margin; PyTorch's allocator manages trainer memory",
          train_memory_margin_bytes=value(int, 1 << 30)),
    inert("furlong's FSDP2 trainer keeps its parameters on the device; --offload-train "
          "frees them while the engines generate",
          fsdp_cpu_offload=SWITCH),
)

GrpoInertFlags = mixin(
    "GrpoInertFlags",
    inert("furlong always computes advantages and returns",
          disable_compute_advantages_and_returns=SWITCH),
    inert("furlong logs the policy entropy of every training step already",
          use_rollout_entropy=SWITCH, observe_training_entropy=SWITCH),
    inert("furlong logs the gap between rollout and training log-probs already",
          get_mismatch_metrics=SWITCH),
    inert("furlong's old log-prob pass follows --use-rollout-logprobs and --keep-old-actor",
          skip_actor_forward_only=SWITCH),
    inert("furlong reduces the policy loss by --calculate-per-token-loss; a whole custom "
          "loss is --custom-loss-function-path",
          custom_pg_loss_reducer_function_path=value(str)),
    inert("furlong's models have no sparse-attention indexer to replay",
          use_indexer_replay=SWITCH, use_rollout_indexer_replay=SWITCH),
    inert("furlong's rollout log-probs come from the engine's decode as sampled",
          true_on_policy_mode=SWITCH, recompute_logprobs_via_prefill=SWITCH),
    inert(NO_DISTILLATION, opd_top_k_strategy=value(str, "only-student", choices=(
              "only-student", "only-teacher", "intersection", "union", "xor")),
          opd_reward_weight_mode=value(str, "student_p",
                                       choices=("student_p", "teacher_p", "none")),
          opd_topk_per_position=SWITCH),
    inert("--opd-teacher-load reads an HF directory, or a furlong checkpoint's latest "
          "iteration", opd_teacher_ckpt_step=value(int)),
    inert(NO_CRITIC, critic_lr=value(float), critic_lr_warmup_iters=value(int, 0),
          num_critic_only_steps=value(int, 0)),
)

OptimizerInertFlags = mixin(
    "OptimizerInertFlags",
    megatron("furlong's optimizer is AdamW (--optimizer adam)", muon_momentum=value(float, 0.95)),
)

SglangInertFlags = mixin(
    "SglangInertFlags",
    inert("furlong's own router spreads requests over the engines (prompt affinity, then load)",
          use_miles_router=SWITCH, miles_router_timeout=value(float),
          miles_router_max_connections=value(int),
          miles_router_health_check_failure_threshold=value(int, 3)),
    inert("an option of sglang-router, which Miles starts; furlong's own router spreads "
          "requests and health-checks the engines",
          router_policy=value(str, "cache_aware"), router_prefill_policy=value(str),
          router_decode_policy=value(str), router_assignment_mode=value(str),
          router_health_check_interval_secs=value(int, 60),
          router_health_failure_threshold=value(int, 3),
          router_health_success_threshold=value(int, 2)),
    inert("prefill-decode disaggregation is not implemented in furlong",
          prefill_num_servers=value(int)),
)

ClusterInertFlags = mixin(
    "ClusterInertFlags",
    inert(NO_CRITIC, critic_num_nodes=value(int), critic_num_gpus_per_node=value(int)),
    inert("--offload-rollout frees the engines' weights and KV cache together",
          offload_rollout_level=value(str, ["kv_cache", "weight"], nargs="+")),
    inert("--offload-train moves the trainer's state to CPU memory; disk offload is not "
          "implemented",
          offload_train_target=value(str, "cpu", choices=("cpu", "disk")),
          stream_optimizer_state_to_disk=SWITCH,
          stream_optimizer_state_moment_dtype=value(
              str, "fp32", choices=("fp32", "bf16", "fp16", "fp8e4m3", "fp8e5m2")),
          offload_train_disk_dir=value(str), offload_train_disk_chunk_mb=value(int, 256),
          rematerialize_param_from_master_weight=SWITCH,
          check_rematerialize_param_from_master_weight=SWITCH),
    inert("furlong places its Ray actors itself", pin_rollout_manager_to_head=SWITCH),
    inert(OWN_FAULT_HANDLING,
          ft_components=value(str, nargs="+", choices=("rollout", "train")),
          rollout_health_check_interval=value(float, 30.0),
          rollout_health_check_timeout=value(float, 30.0),
          rollout_health_check_first_wait=value(float, 0.0), control_server_port=value(int, 0),
          mini_ft_controller_enable=SWITCH, mini_ft_controller_poll_interval=value(float, 10.0),
          mini_ft_controller_resume_delay=value(float, 10.0)),
    inert("a report handed over by Miles' own launcher",
          env_report=value(str, "")),
)

LoggingInertFlags = mixin(
    "LoggingInertFlags",
    inert(NO_EXTRA_SINK,
          use_mlflow=SWITCH, mlflow_tracking_uri=value(str),
          mlflow_experiment_name=value(str, "miles"), mlflow_run_name=value(str),
          mlflow_run_id=value(str), use_prometheus=SWITCH, prometheus_port=value(int, 9090),
          prometheus_run_name=value(str), use_miles_dashboard=SWITCH,
          dashboard_gpu_sample_interval=value(float), dashboard_sglang_scrape_mode=value(str)),
    inert("furlong's W&B run name and step metric are not configurable",
          disable_wandb_random_suffix=SWITCH, wandb_always_use_train_step=SWITCH),
    inert("--tb-project-name names the TensorBoard subdirectory",
          tb_experiment_name=value(str)),
    inert("furlong's rollout metrics are fixed; a custom reward can return a dict with "
          "extra keys",
          log_multi_turn=SWITCH, log_reward_category=value(str), log_correct_samples=SWITCH,
          custom_rollout_log_function_path=value(str),
          custom_eval_rollout_log_function_path=value(str)),
    inert("furlong reports no MFU", mfu_peak_tflops=value(float)),
)

DebugInertFlags = mixin(
    "DebugInertFlags",
    inert(MILES_DEBUG,
          debug_skip_weight_update=SWITCH, debug_disable_optimizer=SWITCH,
          debug_exit_after_rollout=value(int), save_debug_trajectory_data=value(str),
          load_debug_rollout_data_subsample=value(float), save_debug_train_data=value(str),
          save_debug_event_data=value(str), dumper_enable=SWITCH,
          dumper_dir=value(str, "/tmp/dumper"), dumper_inference=value(str, nargs="*"),
          dumper_fwd_only=value(str, nargs="*"), dumper_fwd_bwd=value(str, nargs="*"),
          dumper_source_patcher_config_inference=value(str),
          dumper_source_patcher_config_train=value(str),
          memory_snapshot_dir=value(str, "."), memory_snapshot_num_steps=value(int),
          profile_target=value(str, ["train_overall"], nargs="+", choices=(
              "train_overall", "train_actor", "train_log_probs")),
          memory_recorder=value(str, "torch", choices=("torch", "memray")),
          check_weight_update_equal=SWITCH,
          check_weight_update_selector=value(str, "all", choices=("all", "target", "draft")),
          check_weight_update_skip_list=value(str, nargs="*"),
          check_weight_update_allow_quant_error=SWITCH, check_lora_weight_equal=SWITCH,
          save_local_weight_checksum=SWITCH, enable_event_analyzer=SWITCH,
          enable_witness=SWITCH, witness_buffer_size=value(int, 1 << 20),
          debug_deterministic_collective=SWITCH),
    inert(CI_ONLY,
          ci_test=SWITCH, ci_disable_kl_checker=SWITCH, ci_disable_logprobs_checker=SWITCH,
          ci_disable_weight_update_checker=SWITCH, ci_metric_checker_key=value(str),
          ci_metric_checker_threshold=value(float), ci_save_grad_norm=value(str),
          ci_load_grad_norm=value(str), ci_save_model_hash=SWITCH, ci_check_model_hash=SWITCH,
          ci_ft_test_actions=value(str), ci_inject_rollout_data_path=value(str),
          ci_inject_rollout_data_start_rollout_id=value(int),
          ci_inject_rollout_data_min_match_ratio=value(float, 0.9)),
)

LoraInertFlags = mixin(
    "LoraInertFlags",
    inert("furlong always pushes adapters as tensors (Engine.load_lora_adapter)",
          lora_sync_from_tensor=SWITCH),
    inert("furlong never sends the base weights again: engines keep them from "
          "--hf-checkpoint and receive only the adapters", lora_base_cpu_backup=SWITCH),
    inert("furlong's engines always sample with the trained adapter",
          lora_train_only=SWITCH),
    inert(NO_EXPERT_LORA,
          experts_shared_outer_loras=SWITCH, no_sglang_lora_use_virtual_experts=SWITCH),
    inert(NO_MULTI_LORA,
          multi_lora_n_adapters=value(int, 0),
          multi_lora_adapter=value(str, nargs=2), multi_lora_idle_poll_s=value(float, 5.0),
          multi_lora_http_server_path=value(str), multi_lora_backend_path=value(str),
          multi_lora_api_port=value(int, 8068), multi_lora_disable_service_mode=SWITCH,
          multi_lora_max_adapter_global_batch_size=value(int),
          multi_lora_max_coalesce_wait_s=value(float, 0.5),
          multi_lora_max_empty_wait_s=value(float, 30.0)),
)
