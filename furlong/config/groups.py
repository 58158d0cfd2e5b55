"""The flag groups as frozen dataclasses: one class per group of the seed.

Each field is one command-line flag (`rollout_batch_size` is `--rollout-batch-size`);
its metadata carries the help text and how argparse should read it, so the parser,
the `--help` groups, the dry-run report and the frozen-flags test all come from this
one table. Defaults are Miles' and slime's. Each class inherits the Miles and Megatron
flags of its group that furlong accepts without acting on them (inert_flags.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from furlong.config.flag import flag, has_no_effect, json_object
from furlong.config.inert_flags import (FROM_HF_CONFIG, CkptInertFlags, ClusterInertFlags,
                                        DebugInertFlags, EvalInertFlags, GrpoInertFlags,
                                        LoggingInertFlags, LoraInertFlags, ModelInertFlags,
                                        OptimizerInertFlags, PerfInertFlags, RolloutInertFlags,
                                        SglangInertFlags)
from furlong.config.moe_layers import moe_layer_freq_argument

MIB = 1024 * 1024


@dataclass(frozen=True)
class ModelArgs(ModelInertFlags):
    """MODEL_ARGS: architecture constants, checked against the HF config.json."""
    num_layers: int | None = flag(help="Transformer layers (HF num_hidden_layers)")
    hidden_size: int | None = flag(help="Hidden size (HF hidden_size)")
    ffn_hidden_size: int | None = flag(help="MLP inner size (HF intermediate_size)")
    num_attention_heads: int | None = flag(help="Query heads (HF num_attention_heads)")
    group_query_attention: bool = flag(False, "Grouped-query attention")
    num_query_groups: int | None = flag(help="KV heads (HF num_key_value_heads)")
    kv_channels: int | None = flag(help="Head dimension (HF head_dim)")
    seq_length: int | None = flag(help="Megatron's sequence length; not a limit here (lengths "
                                       "come from the data, packed by --max-tokens-per-gpu)")
    max_position_embeddings: int | None = flag(help="HF max_position_embeddings")
    vocab_size: int | None = flag(help="Padded vocabulary size; may exceed the config's")
    rotary_base: float | None = flag(help="RoPE theta (HF rope_theta)")
    rotary_percent: float = flag(1.0, "Share of head dims with RoPE (HF partial_rotary_factor)")
    normalization: str | None = flag(choices=("LayerNorm", "RMSNorm"), help="Norm type")
    norm_epsilon: float | None = flag(help="Norm epsilon (HF rms_norm_eps)")
    swiglu: bool = flag(False, "SwiGLU MLP (HF hidden_act silu)")
    disable_bias_linear: bool = flag(False, "No bias in linear layers")
    add_qkv_bias: bool = flag(False, "Bias on q/k/v projections (Qwen2)")
    qk_layernorm: bool = flag(False, "RMSNorm on queries and keys (Qwen3)")
    untie_embeddings_and_output_weights: bool = flag(False, "Separate input and output embeddings")
    use_rotary_position_embeddings: bool = flag(False, "RoPE positions")
    num_experts: int | None = flag(help="MoE routed experts (HF num_experts, n_routed_experts)")
    moe_router_topk: int | None = flag(help="Experts per token (HF num_experts_per_tok)")
    moe_ffn_hidden_size: int | None = flag(help="Expert MLP inner size (HF moe_intermediate_size)")
    moe_shared_expert_intermediate_size: int | None = flag(
        help="Inner size of all shared experts together (HF shared_expert_intermediate_size)")
    moe_shared_expert_gate: bool = flag(False, "Sigmoid gate on the shared experts' output "
                                               "(HF Qwen2-MoE, Qwen3-Next shared_expert_gate)")
    moe_latent_size: int | None = flag(help="Experts work in this projected size (HF "
                                            "moe_latent_size, Nemotron-H)")
    moe_router_score_function: str = flag("softmax", "Router scores (HF scoring_func)",
                                          choices=("softmax", "sigmoid"))
    moe_router_pre_softmax: bool = flag(False, "Softmax over all experts, top-k weights not "
                                               "renormalised (HF norm_topk_prob false)")
    moe_layer_freq: str = flag("1", "MoE layers: every Nth, or 0/1 per layer as '[0]*3+[1]*45' "
                                    "(HF decoder_sparse_step, first_k_dense_replace)",
                               metavar="N|PATTERN", parse=moe_layer_freq_argument)
    moe_router_topk_scaling_factor: float | None = flag(
        help="Factor on the routing weights (HF routed_scaling_factor)")
    moe_router_enable_expert_bias: bool = flag(False, "Per-expert bias in top-k selection (HF "
                                                      "e_score_correction_bias)")
    moe_router_bias_update_rate: float = flag(
        1e-3, "Step of the expert bias update (aux-loss-free balancing)", megatron_only=True,
        why="furlong keeps the checkpoint's expert bias fixed, as rate 0 does")
    moe_router_num_groups: int | None = flag(help="Expert groups for group-limited routing "
                                                  "(HF n_group)")
    moe_router_group_topk: int | None = flag(help="Groups each token may route to (HF "
                                                  "topk_group)")
    moe_aux_loss_coeff: float = flag(0.0, "Weight of the load-balancing loss")
    moe_router_load_balancing_type: str = flag(
        "aux_loss", "Balancing loss per micro-batch, per sequence (seq_), across ranks (global_)",
        choices=("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"))
    moe_router_dtype: str | None = flag(
        choices=("fp32", "fp64"), help="Megatron router precision", megatron_only=True,
        why="furlong's router computes its scores in float32 already")
    moe_token_dispatcher_type: str = flag(
        "allgather", "Megatron token exchange between expert ranks",
        choices=("allgather", "alltoall", "flex"), megatron_only=True,
        why="it picks how Megatron moves tokens between expert ranks")
    moe_grouped_gemm: bool = flag(False, "Grouped GEMM for experts", megatron_only=True,
                                  why="furlong's experts already run as grouped matmuls")
    moe_permute_fusion: bool = flag(False, "Megatron fused token permutation", megatron_only=True,
                                    why="it fuses kernels of Megatron's token dispatcher")
    moe_enable_deepep: bool = flag(False, "DeepEP token dispatch between expert ranks",
                                   megatron_only=True,
                                   why="furlong moves no tokens between expert ranks")
    moe_router_freeze_gate: bool = flag(False, "Keep the routers' weights fixed in training")
    moe_token_drop_policy: str = flag(
        "probs", "Megatron tokens dropped past expert capacity", choices=("probs", "position"),
        megatron_only=True, why="furlong's experts take every token routed to them")
    spec: tuple[str, ...] | None = flag(nargs=2, metavar=("MODULE", "FUNC"),
                                        help="Megatron layer spec plugin", megatron_only=True,
                                        why=FROM_HF_CONFIG)
    position_embedding_type: str | None = flag(help="Megatron position embedding type",
                                               megatron_only=True, why=FROM_HF_CONFIG)
    make_vocab_size_divisible_by: int | None = flag(
        help="Megatron vocab padding", megatron_only=True,
        why="furlong keeps the embedding size of the checkpoint")
    attention_dropout: float | None = flag(help="Megatron attention dropout", megatron_only=True,
                                           why="dropout comes from the HF config.json")
    hidden_dropout: float | None = flag(help="Megatron hidden dropout", megatron_only=True,
                                        why="dropout comes from the HF config.json")
    attention_softmax_in_fp32: bool = flag(
        False, "Megatron softmax precision", megatron_only=True,
        why="furlong's attention kernels keep the softmax in float32")
    attention_backend: str | None = flag(help="Megatron attention kernel", megatron_only=True,
                                         why="furlong's model code picks its own kernel")


@dataclass(frozen=True)
class CkptArgs(CkptInertFlags):
    """CKPT_ARGS: the three model roles and where checkpoints go."""
    hf_checkpoint: str | None = flag(help="HF directory: tokenizer, config, engine boot weights")
    ref_load: str | None = flag(help="Reference model (and warm start); HF or iter_ directory")
    load: str | None = flag(help="Resume from here if it holds latest_checkpointed_iteration.txt")
    save: str | None = flag(help="Checkpoint directory")
    save_interval: int | None = flag(help="Save every N rollouts (and at the last one)")
    save_hf: str | None = flag(help="Export HF safetensors here; {rollout_id} is filled")
    no_save_optim: bool = flag(False, "Do not save optimizer state")
    async_save: bool = flag(False, "Megatron asynchronous save", megatron_only=True,
                            why="furlong saves in step, then carries on")
    save_retain_interval: int | None = flag(
        help="Keep the checkpoints of every Nth rollout; older others are deleted")


@dataclass(frozen=True)
class RolloutArgs(RolloutInertFlags):
    """ROLLOUT_ARGS: prompt data, sampling, reward, filtering, batch flow."""
    prompt_data: str | None = flag(help=".jsonl or .parquet; PATH@[start:end] takes rows")
    input_key: str = flag("input", "Prompt column: a string or a list of chat messages")
    label_key: str | None = flag(help="Label column")
    metadata_key: str = flag("metadata", "Metadata column (a JSON object)")
    tool_key: str = flag("tools", "Tools column, passed to the chat template")
    apply_chat_template: bool = flag(False, "Render prompts with the tokenizer's chat template")
    apply_chat_template_kwargs: dict | None = flag(parse=json_object, metavar="JSON",
                                                   help="Extra chat-template arguments")
    rollout_shuffle: bool = flag(False, "Reshuffle prompts each epoch with rollout_seed + epoch")
    rollout_seed: int = flag(42, "Seed for data order and sampling")
    rollout_max_prompt_len: int | None = flag(help="Drop prompts longer than this (tokens)")
    rollout_batch_size: int | None = flag(help="Prompts per rollout (required)")
    n_samples_per_prompt: int = flag(1, "Responses per prompt (group size)")
    num_rollout: int | None = flag(help="Rollouts to run (default: from --num-epoch)")
    num_epoch: int = flag(1, "Epochs over the prompt data when --num-rollout is unset")
    global_batch_size: int | None = flag(help="Samples per optimizer step")
    num_steps_per_rollout: int | None = flag(help="Optimizer steps per rollout")
    micro_batch_size: int = flag(1, "Samples per micro-batch (without dynamic batching)")
    balance_data: bool = flag(False, "Balance tokens across data-parallel ranks")
    rollout_temperature: float = flag(1.0, "Sampling temperature")
    rollout_top_p: float = flag(1.0, "Nucleus sampling mass")
    rollout_top_k: int = flag(-1, "Top-k sampling (-1: off)")
    rollout_max_response_len: int | None = flag(help="Max new tokens per response")
    rollout_max_context_len: int | None = flag(help="Max prompt + response tokens")
    rollout_stop: tuple[str, ...] | None = flag(nargs="+", help="Stop strings")
    rollout_stop_token_ids: tuple[int, ...] | None = flag(nargs="+", help="Stop token ids")
    rollout_skip_special_tokens: bool = flag(False, "Drop special tokens from response text")
    rm_type: str | None = flag(help="Built-in reward: math, deepscaler, dapo, f1, gpqa, "
                                    "remote_rm, random; prefix boxed_ to extract \\boxed{} first")
    custom_rm_path: str | None = flag(help="module.path:function reward hook")
    group_rm: bool = flag(False, "Reward hook scores a whole group at once")
    custom_reward_post_process_path: str | None = flag(
        help="fn(args, samples) -> (raw_rewards, rewards) over a rollout's samples: the "
             "rewards replace the estimator's normalised ones (Miles' hook)")
    reward_key: str | None = flag(help="Key of a dict reward that is the scalar")
    rm_url: str | None = flag(help="URL for remote_rm")
    rm_timeout: float = flag(60.0, "Seconds a reward may take before it is an error")
    rm_on_error: str = flag("raise", "A reward that raises or times out: raise, or score 0",
                            choices=("raise", "zero"))
    over_sampling_batch_size: int | None = flag(help="Prompts fetched per refill (>= rollout "
                                                     "batch size)")
    dynamic_sampling_filter_path: str | None = flag(help="Group filter hook")
    rollout_sample_filter_path: str | None = flag(
        help="fn(args, groups) at the end of a rollout, on the kept groups: may set "
             "sample.remove_sample (Miles' hook)")
    rollout_all_samples_process_path: str | None = flag(
        help="fn(args, all_groups, data_source) at the end of a rollout, on every finished "
             "group, those the filter dropped too (Miles' hook)")
    partial_rollout: bool = flag(False, "Return unfinished groups to the buffer")
    buffer_filter_path: str | None = flag(
        help="fn(args, rollout_id, buffer, num_samples): the buffered groups a rollout takes "
             "first (Miles' hook; default: the first ones)")
    custom_generate_function_path: str | None = flag(help="Async per-sample generate hook")
    rollout_function_path: str | None = flag(help="Replaces the whole rollout function")
    custom_agent_function_path: str | None = flag(
        help="The agent of furlong.rollout.agentic:generate (Miles' agentic_tool_call): "
             "async fn(base_url, prompt, request_kwargs, metadata) -> dict | None")
    max_seq_len: int | None = flag(help="Agent sessions: tokens per sample (prompt and all "
                                        "turns), cut by the session server")
    generate_max_turns: int = flag(16, "Model turns per sample of "
                                       "furlong.rollout.multi_turn:generate")
    generate_tool_specs_path: str | None = flag(
        help="Tools for the chat template: module:NAME of a list, or a .json file")
    generate_tool_call_parser: str | None = flag(
        help="Tool-call format of the model's output (<tool_call> JSON blocks)",
        choices=("qwen", "qwen25", "qwen3", "hermes"))
    generate_execute_tool_function_path: str | None = flag(
        help="The tools of furlong.rollout.multi_turn:generate: async fn(name, arguments) "
             "-> str")
    custom_config_path: str | None = flag(
        help="YAML of arguments for the custom functions (or base64:<payload>)")
    update_weights_interval: int = flag(1, "Push weights every N rollouts")
    update_weight_buffer_size: int = flag(512 * MIB, "Bytes per weight-sync bucket")
    keep_old_actor: bool = flag(False, "Keep the rollout-time weights for old log-probs")
    rollout_backend: str = flag("auto", "Rollout engine (auto: sglang if importable on a GPU, "
                                        "else fast on GPU, hf on CPU)",
                                choices=("auto", "hf", "fast", "sglang"))
    rollout_external: bool = flag(False, "Use engine servers that are already running, at "
                                         "--rollout-external-engine-addrs")
    rollout_external_engine_addrs: tuple[str, ...] | None = flag(
        nargs="+", metavar="HOST:PORT", help="Running SGLang or furlong engine servers")


@dataclass(frozen=True)
class EvalArgs(EvalInertFlags):
    """EVAL_ARGS: evaluation datasets; unset sampling values inherit rollout ones."""
    eval_interval: int | None = flag(help="Evaluate every N rollouts")
    eval_prompt_data: tuple[str, ...] | None = flag(nargs="+", metavar="NAME PATH",
                                                    help="NAME PATH pairs, or a lone PATH")
    n_samples_per_eval_prompt: int = flag(1, "Responses per eval prompt")
    eval_max_response_len: int | None = flag(help="Default: --rollout-max-response-len")
    eval_top_p: float | None = flag(help="Default: --rollout-top-p")
    eval_top_k: int | None = flag(help="Default: --rollout-top-k")
    eval_temperature: float | None = flag(help="Default: --rollout-temperature")
    eval_input_key: str | None = flag(help="Default: --input-key")
    eval_label_key: str | None = flag(help="Default: --label-key")
    eval_reward_key: str | None = flag(help="Key of a dict reward that eval reads; default: "
                                            "--reward-key")
    eval_tool_key: str | None = flag(help="Default: --tool-key")
    eval_max_prompt_len: int | None = flag(help="Drop eval prompts longer than this (tokens)")
    eval_max_context_len: int | None = flag(help="Eval prompt + response at most; default: "
                                                 "--rollout-max-context-len")
    skip_eval_before_train: bool = flag(False, "No eval before the first rollout")
    log_passrate: bool = flag(False, "Report unbiased pass@k for k = 1, 2, 4, ...")


@dataclass(frozen=True)
class PerfArgs(PerfInertFlags):
    """PERF_ARGS: parallelism, recomputation, dynamic batching."""
    tensor_model_parallel_size: int = flag(1, "Trainer tensor-parallel size")
    sequence_parallel: bool = flag(False, "Shard activations along the sequence (with TP)")
    pipeline_model_parallel_size: int = flag(1, "Pipeline stages")
    num_layers_per_virtual_pipeline_stage: int | None = flag(
        help="Layers per virtual pipeline stage: each stage holds several chunks of this "
             "many layers, run interleaved")
    decoder_first_pipeline_num_layers: int | None = flag(
        help="Decoder layers of the first pipeline stage (the others split the rest equally)")
    decoder_last_pipeline_num_layers: int | None = flag(
        help="Decoder layers of the last pipeline stage (the others split the rest equally)")
    context_parallel_size: int = flag(1, "Context-parallel size")
    expert_model_parallel_size: int = flag(
        1, "Expert-parallel size: experts split over groups of ranks of a stage")
    expert_tensor_parallel_size: int = flag(1, "Expert tensor-parallel size (megatron backend)")
    recompute_granularity: str | None = flag(choices=("full", "selective"),
                                             help="Activation checkpointing")
    recompute_method: str | None = flag(choices=("uniform", "block"),
                                        help="Which layers to recompute")
    recompute_num_layers: int | None = flag(help="block: recompute the first N layers; "
                                                 "uniform: each layer is its own unit here")
    use_dynamic_batch_size: bool = flag(False, "Pack micro-batches by token count")
    max_tokens_per_gpu: int | None = flag(
        help="Token budget of a packed micro-batch on one rank (a context-parallel group "
             "of C ranks packs C times as many)")
    log_probs_chunk_size: int = flag(1024, "Positions per chunk when computing log-probs")
    gradient_checkpointing: bool = flag(False, "Recompute activations in the backward pass "
                                               "(Miles' FSDP backend): --recompute-granularity "
                                               "full --recompute-method uniform unless given")
    attn_implementation: str = flag("flash_attention_2", "Miles' FSDP backend's HF attention; "
                                                         "the trainer runs furlong's packed "
                                                         "varlen attention whatever it names")
    bf16: bool = flag(False, "Train in bfloat16 (furlong does on GPUs, on float32 masters; the "
                             "CPU runs float32)")
    deterministic_mode: bool = flag(False, "Deterministic kernels and reductions: the same "
                                           "run gives the same numbers")
    accumulate_allreduce_grads_in_fp32: bool = flag(
        False, "Megatron gradient reduction dtype", megatron_only=True,
        why="FSDP2 reduces furlong's gradients in float32 already")


@dataclass(frozen=True)
class GrpoArgs(GrpoInertFlags):
    """GRPO_ARGS: the RL objective."""
    advantage_estimator: str = flag("grpo", "Advantage estimator", choices=(
        "grpo", "gspo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"))
    use_kl_loss: bool = flag(False, "Add a KL-to-reference loss (loads the reference)")
    kl_loss_coef: float = flag(0.0, "KL loss weight")
    kl_loss_type: str = flag("k1", "KL estimator", choices=("k1", "k2", "k3", "low_var_kl"))
    use_unbiased_kl: bool = flag(False, "KL loss: each token's estimate times the policy "
                                        "ratio pi / pi_old (DeepSeek-V3.2)")
    kl_coef: float = flag(0.0, "KL reward shaping (REINFORCE++ only)")
    eps_clip: float = flag(0.2, "Lower ratio clip")
    eps_clip_high: float | None = flag(help="Upper ratio clip (default: --eps-clip)")
    eps_clip_c: float | None = flag(help="Dual-clip bound for negative advantages (> 1)")
    entropy_coef: float = flag(0.0, "Entropy bonus weight")
    calculate_per_token_loss: bool = flag(False, "Average over all tokens of the batch")
    disable_grpo_std_normalization: bool = flag(False, "GRPO: do not divide by group std")
    disable_rewards_normalization: bool = flag(
        False, "GRPO, GSPO, REINFORCE++ baseline: the raw rewards, not their group's "
               "mean-centred (and scaled) ones, make the advantages")
    reset_optimizer_states: bool = flag(False, "Zero Adam's moments and step count before "
                                               "each rollout's optimizer steps")
    normalize_advantages: bool = flag(False, "Whiten advantages over the batch")
    use_tis: bool = flag(False, "Truncated importance sampling vs rollout log-probs")
    tis_clip: float = flag(2.0, "TIS upper clip")
    tis_clip_low: float = flag(0.0, "TIS lower clip")
    use_rollout_logprobs: bool = flag(False, "Use the engine's log-probs as old log-probs")
    use_opsm: bool = flag(False, "Off-policy sequence masking: drop the policy loss of "
                                 "negative-advantage sequences that drifted from the old policy")
    opsm_delta: float = flag(1e-4, "--use-opsm: the drift (mean old - current log-prob of a "
                                   "sequence) above which it is dropped")
    loss_type: str = flag("policy_loss", "Loss", choices=("policy_loss", "sft_loss",
                                                          "custom_loss"))
    custom_tis_function_path: str | None = flag(
        help="Importance-sampling correction hook, replacing --use-tis's truncation")
    custom_loss_function_path: str | None = flag(help="Loss hook for --loss-type custom_loss")
    ref_update_interval: int | None = flag(help="Copy the actor into the reference every N "
                                                "rollouts")
    gamma: float = flag(1.0, "Discount (REINFORCE++, PPO)")
    lambd: float = flag(1.0, "GAE lambda (PPO)")
    value_clip: float = flag(0.2, "Value clip (PPO)")
    use_routing_replay: bool = flag(False, "MoE: the optimizer steps of a rollout replay the "
                                           "experts of the old log-prob forward (2507.18071)")
    use_rollout_routing_replay: bool = flag(False, "MoE: training replays the engine's experts "
                                                   "of each token (R3, 2510.11370)")
    use_opd: bool = flag(False, "On-policy distillation: each token's advantage less "
                                "--opd-kl-coef x (student - teacher log-prob)")
    opd_type: str | None = flag(help="--use-opd: where the teacher's log-probs come from: "
                                     "megatron, a teacher model in the trainer "
                                     "(--opd-teacher-load); sglang, each sample's "
                                     "teacher_log_probs, set by a reward hook", choices=(
                                         "sglang", "megatron"))
    opd_kl_coef: float = flag(1.0, "--use-opd: weight of the reverse KL in the advantages")
    opd_log_prob_top_k: int = flag(0, "--use-opd: 0, the KL of the sampled tokens (the only "
                                      "kind furlong has)")
    opd_teacher_load: str | None = flag(help="--opd-type megatron: the teacher's weights (an HF "
                                             "directory or a furlong checkpoint)")
    opd_teacher_urls: tuple[str, ...] | None = flag(
        nargs="+", help="--opd-type sglang, several teachers: NAME=URL of each teacher "
                        "server's /generate; a sample goes to the teacher its metadata names "
                        "(--opd-teacher-key), else to 'default'")
    opd_teacher_adapters: tuple[str, ...] | None = flag(
        nargs="+", help="--opd-type sglang: NAME=ADAPTER, teachers that are LoRA adapters "
                        "of a teacher server (its lora_path), routed as --opd-teacher-urls")
    opd_teacher_key: str = flag("opd_teacher", "--opd-type sglang: the sample metadata key "
                                               "that names its teacher")

    @property
    def records_routes(self) -> bool:
        """--use-routing-replay alone: the old log-prob forward records the routes (R3 has
        the engine's; Miles turns --use-routing-replay on with it)."""
        return self.use_routing_replay and not self.use_rollout_routing_replay

    @property
    def needs_reference(self) -> bool:
        """The reference model is loaded for the KL loss and for KL reward shaping."""
        return self.use_kl_loss or bool(self.kl_coef)

    @property
    def needs_teacher(self) -> bool:
        """--opd-type megatron: the trainer loads the teacher and computes its log-probs."""
        return self.use_opd and self.opd_type == "megatron"


@dataclass(frozen=True)
class OptimizerArgs(OptimizerInertFlags):
    """OPTIMIZER_ARGS: AdamW and its learning-rate schedule."""
    optimizer: str = flag("adam", "Optimizer (AdamW semantics)", choices=("adam",))
    lr: float = flag(1e-6, "Peak learning rate")
    min_lr: float = flag(0.0, "Floor of the decayed learning rate")
    lr_decay_style: str = flag("constant", "Schedule after warmup",
                               choices=("constant", "linear", "cosine"))
    lr_warmup_iters: int = flag(0, "Linear warmup steps")
    lr_warmup_fraction: float | None = flag(help="Warmup as a share of the decay steps")
    lr_decay_iters: int | None = flag(help="Decay steps (default: all optimizer steps)")
    lr_warmup_init: float = flag(0.0, "Learning rate at step 0 of warmup")
    adam_beta1: float = flag(0.9, "Adam beta1")
    adam_beta2: float = flag(0.999, "Adam beta2")
    adam_eps: float = flag(1e-8, "Adam epsilon")
    weight_decay: float = flag(0.01, "Decoupled weight decay")
    clip_grad: float = flag(1.0, "Gradient-norm clip (0: off)")
    seed: int = flag(1234, "Trainer seed")
    optimizer_cpu_offload: bool = flag(False, "Float32 masters and Adam moments in host "
                                              "memory; AdamW steps on the CPU")
    overlap_cpu_optimizer_d2h_h2d: bool = flag(False, "Overlap the CPU optimizer's copies to "
                                                      "and from the device with its step "
                                                      "(pinned memory, CUDA streams)")
    use_precision_aware_optimizer: bool = flag(False, "Megatron's optimizer keeping float32 "
                                                      "masters and moments itself (its default "
                                                      "dtypes): as furlong's always does")


@dataclass(frozen=True)
class SglangArgs(SglangInertFlags):
    """SGLANG_ARGS: engine topology; every --sglang-X flag is forwarded as --X."""
    rollout_num_gpus_per_engine: int = flag(1, "GPUs per engine (the engine's TP size)")
    sglang_server_concurrency: int = flag(512, "Requests in flight per engine")
    # Captured in command-line order by the parser, as (name without prefix, values).
    passthrough: tuple[tuple[str, tuple[str, ...]], ...] = field(
        default=(), metadata={"help": "", "internal": True})

    def passthrough_value(self, name: str, default: str | None = None) -> str | None:
        """The last value given as --sglang-NAME, or `default`."""
        found = [values for key, values in self.passthrough if key == name]
        if not found:
            return default
        return found[-1][0] if found[-1] else "true"

    @property
    def api_key(self) -> str | None:
        """--sglang-api-key: the key the engine servers require (SGLang's --api-key)."""
        return self.passthrough_value("api-key")


@dataclass(frozen=True)
class LoraArgs(LoraInertFlags):
    """LORA_ARGS: LoRA adapters (Miles' flags): the base frozen, the adapters trained,
    pushed to the engines and checkpointed in PEFT's format."""
    lora_rank: int = flag(0, "LoRA rank r (0: train all weights)")
    lora_alpha: int = flag(16, "LoRA alpha: the adapters' update is scaled by alpha / r")
    lora_dropout: float = flag(0.0, "Dropout on the adapters' input (old log-probs are then "
                                    "recomputed)")
    lora_type: str = flag("lora", "Megatron's variant; furlong adapts q/k/v and gate/up "
                                  "separately (canonical_lora) either way",
                          choices=("lora", "canonical_lora"))
    target_modules: str | None = flag(help="Modules to adapt, needed with --lora-rank: "
                                           "all-linear, or a comma list of HF names (q_proj), "
                                           "Megatron names (linear_qkv) or paths with *")
    exclude_modules: str | None = flag(help="Comma list taken out of --target-modules")
    lora_adapter_path: str | None = flag(help="Start from this PEFT adapter directory "
                                              "(adapter_config.json, "
                                              "adapter_model.safetensors)")

    @property
    def enabled(self) -> bool:
        return self.lora_rank > 0


@dataclass(frozen=True)
class ClusterArgs(ClusterInertFlags):
    """Placement of trainer ranks and engines."""
    actor_num_nodes: int = flag(1, "Trainer nodes")
    actor_num_gpus_per_node: int = flag(8, "Trainer GPUs per node")
    rollout_num_gpus: int | None = flag(help="GPUs for engines (disaggregated)")
    num_gpus_per_node: int = flag(8, "GPUs per node")
    colocate: bool = flag(False, "Trainer and engines share devices, taking turns")
    offload: bool = flag(False, "Both --offload-train and --offload-rollout")
    offload_train: bool = flag(False, "Free trainer memory while generating", negatable=True)
    offload_rollout: bool = flag(False, "Free engine memory while training (weights are "
                                 "pushed again after each rollout)", negatable=True)
    train_backend: str = flag("fsdp", "Training backend", choices=("fsdp", "megatron"))
    train_env_vars: dict | None = flag(parse=json_object, metavar="JSON",
                                       help="Extra environment variables of the trainer ranks")
    use_fault_tolerance: bool = flag(False, "Restart failed rollout engines and carry on "
                                            "(furlong's router always restarts the engines "
                                            "it launched)")


@dataclass(frozen=True)
class LoggingArgs(LoggingInertFlags):
    """Where metrics go."""
    run_dir: str | None = flag(help="metrics.jsonl, plots, event files (default: --save or "
                                    "runs/<time>)")
    use_tensorboard: bool = flag(False, "Write TensorBoard event files")
    tb_project_name: str | None = flag(help="TensorBoard subdirectory")
    use_wandb: bool = flag(False, "Log to Weights & Biases")
    wandb_project: str | None = flag(help="W&B project")
    wandb_group: str | None = flag(help="W&B group")
    wandb_mode: str | None = flag(choices=("online", "offline", "disabled"), help="W&B mode")
    wandb_key: str | None = flag(help="W&B API key (for this run only)")
    wandb_host: str | None = flag(help="W&B server URL")
    wandb_team: str | None = flag(help="W&B entity")
    wandb_run_id: str | None = flag(help="Resume this W&B run")
    wandb_dir: str | None = flag(help="W&B files (default: the run directory)")


@dataclass(frozen=True)
class DebugArgs(DebugInertFlags):
    """Debugging and checking."""
    debug_rollout_only: bool = flag(False, "Generate and score; never train")
    debug_train_only: bool = flag(False, "Train on loaded rollouts; no engine")
    save_debug_rollout_data: str | None = flag(help="Save each rollout; {rollout_id} is filled")
    load_debug_rollout_data: str | None = flag(help="Train on saved rollouts; {rollout_id}")
    dry_run: bool = flag(False, "Validate everything, print the resolved config, exit")
    dump_details: str | None = flag(help="Write every rollout's and step's details here for "
                                         "later analysis")


# (title in --help, attribute of Config, dataclass); titles follow the seed's groups.
GROUPS: tuple[tuple[str, str, type], ...] = (
    ("MODEL_ARGS", "model", ModelArgs),
    ("CKPT_ARGS", "ckpt", CkptArgs),
    ("ROLLOUT_ARGS", "rollout", RolloutArgs),
    ("EVAL_ARGS", "eval", EvalArgs),
    ("PERF_ARGS", "perf", PerfArgs),
    ("GRPO_ARGS", "grpo", GrpoArgs),
    ("OPTIMIZER_ARGS", "optimizer", OptimizerArgs),
    ("SGLANG_ARGS", "sglang", SglangArgs),
    ("LORA_ARGS", "lora", LoraArgs),  # after the seed's eight groups
    ("CLUSTER_ARGS", "cluster", ClusterArgs),
    ("LOGGING_ARGS", "logging", LoggingArgs),
    ("DEBUG_ARGS", "debug", DebugArgs),
)


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration; `sources` says where each value came from."""
    model: ModelArgs
    ckpt: CkptArgs
    rollout: RolloutArgs
    eval: EvalArgs
    perf: PerfArgs
    grpo: GrpoArgs
    optimizer: OptimizerArgs
    sglang: SglangArgs
    lora: LoraArgs
    cluster: ClusterArgs
    logging: LoggingArgs
    debug: DebugArgs
    # "group.field" -> "default" | "flag" | "derived" | "inherited"
    sources: dict = field(default_factory=dict, compare=False)

    def given(self, key: str) -> bool:
        """Whether the command line (or --custom-config-path) set `key`, "group.name"."""
        return self.sources.get(key) == "flag"

    def replace(self, group: str, source: str, **values: Any) -> "Config":
        """A copy with fields of one group changed, recording their source."""
        updated = dataclasses.replace(getattr(self, group), **values)
        sources = {**self.sources, **{f"{group}.{name}": source for name in values}}
        return dataclasses.replace(self, **{group: updated}, sources=sources)


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a group that are command-line flags: those that act first, then the
    ones accepted only to be warned about."""
    fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    return sorted(fields, key=has_no_effect)
