"""MODEL_ARGS against the HF config.json of --hf-checkpoint.

A launch script sources `scripts/models/<family>.sh`; if those constants disagree with
the checkpoint, the run would train a different model than the user thinks. Every
given value is compared; a mismatch names both values.

MoE flags name their counterpart in config.json, which differs by family: Qwen2/3-MoE
(softmax router, `decoder_sparse_step`/`mlp_only_layers`), DeepSeek-V3 and GLM-4.5
(sigmoid router with `e_score_correction_bias`, `first_k_dense_replace` dense layers,
`n_shared_experts`, expert groups `n_group`/`topk_group`) and Mixtral (every layer MoE,
top-k then softmax); Qwen2-MoE and Qwen3-Next gate their shared expert, Nemotron-H may
route in a smaller `moe_latent_size`. Routing replay needs an MoE family whose HF router
is softmax then top-k (model/moe.py's `replayed_routing`).
"""
from __future__ import annotations

import json
import math
from collections.abc import Container
from pathlib import Path

from furlong.config.groups import GrpoArgs, ModelArgs
from furlong.config.moe_layers import layer_pattern, pattern_text
from furlong.config.parser import ConfigError, option_name

# Qwen3 puts RMSNorm on queries and keys (GLM-4.5 says so by `use_qk_norm`); others do not.
QK_NORM_FAMILIES = ("qwen3", "qwen3_moe")
# How each MoE family scores experts when config.json has no `scoring_func`.
ROUTER_SCORES = {"qwen2_moe": "softmax", "qwen3_moe": "softmax", "mixtral": "softmax",
                 "deepseek_v3": "sigmoid", "glm4_moe": "sigmoid"}
# MoE families whose HF router picks from all experts (no `n_group` expert groups).
UNGROUPED_FAMILIES = ("qwen2_moe", "qwen3_moe", "qwen3_next", "mixtral")
# MoE families whose shared expert's output passes a sigmoid gate (`mlp.shared_expert_gate`).
SHARED_EXPERT_GATE_FAMILIES = ("qwen2_moe", "qwen3_next")
# MoE families whose HF router returns (logits, softmax top-k weights, experts): replayable.
ROUTING_REPLAY_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral")
# MODEL_ARGS fields that only an MoE model has: given for a dense config.json, an error.
MOE_FIELDS = ("num_experts", "moe_router_topk", "moe_ffn_hidden_size",
              "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "moe_latent_size",
              "moe_router_score_function", "moe_router_pre_softmax", "moe_layer_freq",
              "moe_router_topk_scaling_factor", "moe_router_enable_expert_bias",
              "moe_router_num_groups", "moe_router_group_topk", "moe_aux_loss_coeff",
              "moe_router_load_balancing_type")


def read_hf_config(directory: str) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConfigError(f"--hf-checkpoint {directory}: no config.json there; point it at an HF "
                          "model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None


def _rope_theta(hf: dict) -> float | None:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    return hf.get("rope_theta", rope.get("rope_theta"))


def expected_values(hf: dict) -> dict[str, object]:
    """MODEL_ARGS field -> the value the HF config implies (absent when it implies none)."""
    heads = hf.get("num_attention_heads")
    head_dim = hf.get("head_dim") or (hf["hidden_size"] // heads if heads else None)
    model_type = hf.get("model_type", "")
    # Multi-head latent attention (DeepSeek-V3, Kimi): Megatron's --kv-channels is the
    # value head size, and --qk-layernorm the norms of the query and key-value latents.
    latent_attention = "kv_lora_rank" in hf
    if latent_attention:
        head_dim = hf.get("v_head_dim", head_dim)
    values = {
        "num_layers": hf.get("num_hidden_layers"),
        "hidden_size": hf.get("hidden_size"),
        "ffn_hidden_size": hf.get("intermediate_size"),
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads", heads),
        "kv_channels": head_dim,
        "max_position_embeddings": hf.get("max_position_embeddings"),
        "rotary_base": _rope_theta(hf),
        "rotary_percent": hf.get("partial_rotary_factor", 1.0),
        "norm_epsilon": hf.get("rms_norm_eps", hf.get("layer_norm_eps")),
        "normalization": "RMSNorm" if "rms_norm_eps" in hf else None,
        "swiglu": hf.get("hidden_act") in ("silu", "swish"),
        "qk_layernorm": model_type in QK_NORM_FAMILIES or bool(hf.get("use_qk_norm"))
        or latent_attention,
        "untie_embeddings_and_output_weights": not hf.get("tie_word_embeddings", True),
        "add_qkv_bias": model_type == "qwen2" or bool(hf.get("attention_bias")),
        "disable_bias_linear": not hf.get("attention_bias", False) and not hf.get("mlp_bias",
                                                                                  False),
    }
    return {k: v for k, v in values.items() if v is not None}


def moe_expected_values(hf: dict) -> dict[str, tuple[object, str]]:
    """MoE MODEL_ARGS field -> (the value config.json implies, the config.json fields that
    say so); empty for a dense model. Fields a family leaves open are absent."""
    experts = next(((key, hf[key]) for key in ("num_experts", "num_local_experts",
                                                "n_routed_experts") if hf.get(key)), None)
    if experts is None:
        return {}
    model_type = hf.get("model_type", "")
    expert_size = "intermediate_size" if model_type == "mixtral" else "moe_intermediate_size"
    scores = _router_scores(hf, model_type)
    values = {
        "num_experts": (experts[1], f"{experts[0]} {experts[1]}"),
        "moe_router_topk": _field(hf, "num_experts_per_tok"),
        "moe_ffn_hidden_size": _field(hf, expert_size),
        "moe_shared_expert_intermediate_size": _shared_experts(hf, model_type),
        "moe_shared_expert_gate": _shared_expert_gate(model_type),
        "moe_latent_size": _field_or_none(hf, "moe_latent_size", model_type, ROUTER_SCORES,
                                          "no latent projection"),
        "moe_router_score_function": scores,
        "moe_router_pre_softmax": _pre_softmax(hf, model_type, scores),
        "moe_layer_freq": _moe_layer_pattern(hf, model_type),
        "moe_router_topk_scaling_factor": _field(hf, "routed_scaling_factor", 1.0),
        "moe_router_enable_expert_bias": _expert_bias(hf, model_type),
        "moe_router_num_groups": _field_or_none(hf, "n_group", model_type, UNGROUPED_FAMILIES,
                                                "no expert groups"),
        "moe_router_group_topk": _field_or_none(hf, "topk_group", model_type,
                                                UNGROUPED_FAMILIES, "no expert groups"),
    }
    return {name: value for name, value in values.items() if value is not None}


def _field(hf: dict, key: str, absent: object = None) -> tuple[object, str] | None:
    """(value, "key value") of one config.json field; `absent` is what its absence means."""
    value = hf.get(key, absent)
    if value is None:
        return None
    return value, f"{key} {json.dumps(value)}" if key in hf else f"no {key} (so {value})"


def _field_or_none(hf: dict, key: str, model_type: str, families: Container[str],
                   missing: str) -> tuple[object, str] | None:
    """(value, "key value") of one config.json field, null included; for a family whose
    config.json never has `key`, (None, why): the flag must then be left out."""
    if key in hf:
        return hf[key], f"{key} {json.dumps(hf[key])}"
    if model_type in families:
        return None, f"model_type {model_type} ({missing})"
    return None


def _shared_expert_gate(model_type: str) -> tuple[bool, str] | None:
    if model_type in SHARED_EXPERT_GATE_FAMILIES:
        return True, f"model_type {model_type} (a gated shared expert)"
    if model_type in ROUTER_SCORES:
        return False, f"model_type {model_type} (no shared expert gate)"
    return None


def _shared_experts(hf: dict, model_type: str) -> tuple[int, str] | None:
    for key in ("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size"):
        if key in hf:  # Qwen2-MoE and Qwen3-Next; Nemotron-H
            return _field(hf, key)
    if "n_shared_experts" in hf and "moe_intermediate_size" in hf:  # DeepSeek, GLM-4.5
        count, size = hf["n_shared_experts"] or 0, hf["moe_intermediate_size"]
        return count * size, f"n_shared_experts {count} x moe_intermediate_size {size}"
    if model_type in ("qwen3_moe", "mixtral"):
        return 0, f"model_type {model_type} (no shared experts)"
    return None


def _router_scores(hf: dict, model_type: str) -> tuple[str, str] | None:
    if "scoring_func" in hf:
        return _field(hf, "scoring_func")
    scores = ROUTER_SCORES.get(model_type)
    return (scores, f"model_type {model_type} (a {scores} router)") if scores else None


def _pre_softmax(hf: dict, model_type: str, scores: tuple | None) -> tuple[bool, str] | None:
    """Megatron's pre-softmax is a softmax over all experts whose top-k weights are not
    renormalised; HF's softmax routers renormalise them when norm_topk_prob is true (which
    equals Megatron's softmax over the top-k logits). A sigmoid router ignores the flag."""
    if scores is None or scores[0] != "softmax":
        return None
    if model_type == "mixtral":
        return False, "model_type mixtral (softmax over the top-k logits)"
    if "norm_topk_prob" in hf or model_type in ("qwen2_moe", "qwen3_moe"):
        renormalise = hf.get("norm_topk_prob", False)
        return not renormalise, f"norm_topk_prob {json.dumps(renormalise)}"
    return None


def _expert_bias(hf: dict, model_type: str) -> tuple[bool, str] | None:
    if "topk_method" in hf:  # DeepSeek: "noaux_tc" selects with e_score_correction_bias
        return hf["topk_method"] == "noaux_tc", f"topk_method {json.dumps(hf['topk_method'])}"
    if model_type in ROUTER_SCORES:
        bias = ROUTER_SCORES[model_type] == "sigmoid"  # these carry e_score_correction_bias
        return bias, f"model_type {model_type} ({'an' if bias else 'no'} expert bias)"
    return None


def _moe_layer_pattern(hf: dict, model_type: str) -> tuple[list[int], str] | None:
    """1 (MoE) or 0 (dense) per layer, as the HF modelling code decides it."""
    layers = hf.get("num_hidden_layers")
    if layers is None:
        return None
    if "first_k_dense_replace" in hf:  # DeepSeek, GLM-4.5
        dense = hf["first_k_dense_replace"]
        return [int(i >= dense) for i in range(layers)], f"first_k_dense_replace {dense}"
    if model_type in ("qwen2_moe", "qwen3_moe"):
        step, dense = hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or []
        pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(layers)]
        return pattern, f"decoder_sparse_step {step} and mlp_only_layers {dense}"
    if model_type == "mixtral":
        return [1] * layers, "model_type mixtral (every layer MoE)"
    return None


def _same(value: object, want: object) -> bool:
    """A flag's value equals config.json's (floats to rounding)."""
    return math.isclose(value, want, rel_tol=1e-9) if isinstance(want, float) else value == want


def _check_moe_arg(name: str, value: object, moe: dict, directory: str) -> None:
    flag = option_name(name)
    if not moe:
        raise ConfigError(f"{flag} {value} disagrees with {directory}/config.json, which "
                          "describes a dense model (no experts): drop the MoE flags or fix "
                          "the checkpoint path")
    if name not in moe:
        return  # the family leaves it open, or the flag acts on training only
    want, source = moe[name]
    if name == "moe_layer_freq":
        same, want = layer_pattern(value, len(want)) == want, pattern_text(want)
    else:
        same = _same(value, want)
    if not same:
        fix = f"drop {flag}" if want is False or want is None else f"use {flag} {want}"
        raise ConfigError(f"{flag} {value} disagrees with {source} in {directory}/config.json: "
                          f"{fix} (scripts/models/*.sh), or fix the checkpoint path")


def check_model_args(model: ModelArgs, given: set[str], hf: dict, directory: str) -> None:
    """Raise ConfigError on the first MODEL_ARGS value that disagrees with config.json.

    `given` holds the field names set on the command line; boolean flags are compared
    only when given (their absence is Megatron's default, not a claim about the model).
    """
    expected, moe_expected = expected_values(hf), moe_expected_values(hf)
    for name in sorted(given):
        value = getattr(model, name)
        if name == "vocab_size":
            if value < hf.get("vocab_size", 0):
                raise ConfigError(f"--vocab-size {value} is smaller than vocab_size "
                                  f"{hf['vocab_size']} in {directory}/config.json")
            continue
        if name == "group_query_attention":
            continue  # --num-query-groups carries the claim
        if name in MOE_FIELDS:
            _check_moe_arg(name, value, moe_expected, directory)
            continue
        if name not in expected:
            continue
        want = expected[name]
        if not _same(value, want):
            raise ConfigError(f"{option_name(name)} {value} disagrees with {directory}/"
                              f"config.json, which implies {want}: fix the model script "
                              "(scripts/models/*.sh) or the checkpoint path")


def check_tensor_parallel(tp_size: int, hf: dict, directory: str) -> None:
    """Tensor parallelism splits heads, KV heads and the MLP: each must divide evenly."""
    if tp_size == 1:
        return
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = hf.get(key)
        if value is not None and value % tp_size:
            raise ConfigError(f"--tensor-model-parallel-size {tp_size} does not divide {key} "
                              f"{value} of {directory}/config.json: choose a divisor of it")


def check_routing_replay(grpo: GrpoArgs, hf: dict, directory: str) -> None:
    """--use-routing-replay / --use-rollout-routing-replay need an MoE model whose router
    furlong can replay."""
    flags = [flag for flag, on in (("--use-routing-replay", grpo.use_routing_replay),
                                   ("--use-rollout-routing-replay",
                                    grpo.use_rollout_routing_replay)) if on]
    if not flags:
        return
    model_type = hf.get("model_type", "")
    if not moe_expected_values(hf):
        raise ConfigError(f"{flags[0]} replays the experts of an MoE model, and "
                          f"{directory}/config.json describes a dense one ({model_type}): "
                          "drop the flag")
    if model_type not in ROUTING_REPLAY_FAMILIES:
        raise ConfigError(f"{flags[0]}: routing replay supports the MoE families "
                          f"{', '.join(ROUTING_REPLAY_FAMILIES)} (softmax routers), not "
                          f"{model_type} of {directory}/config.json")
    pattern, fields = moe_expected_values(hf).get("moe_layer_freq", ([1], ""))
    if 0 in pattern:  # SGLang sends a row per decoder layer, furlong's engines per MoE layer
        raise ConfigError(f"{flags[0]}: {directory}/config.json has dense layers ({fields}); "
                          "routing replay needs every layer to be MoE: drop the flag")
