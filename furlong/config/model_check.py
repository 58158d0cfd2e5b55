"""MODEL_ARGS against the HF config.json of --hf-checkpoint.

A launch script sources `scripts/models/<family>.sh`; if those constants disagree with
the checkpoint, the run would train a different model than the user thinks. Every
given value is compared; a mismatch names both values.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from furlong.config.groups import ModelArgs
from furlong.config.parser import ConfigError, option_name

# Qwen3 puts RMSNorm on queries and keys; these families do not.
QK_NORM_FAMILIES = ("qwen3", "qwen3_moe")


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
        "qk_layernorm": model_type in QK_NORM_FAMILIES,
        "untie_embeddings_and_output_weights": not hf.get("tie_word_embeddings", True),
        "num_experts": hf.get("num_experts", hf.get("num_local_experts")),
        "moe_router_topk": hf.get("num_experts_per_tok"),
        "add_qkv_bias": model_type == "qwen2" or bool(hf.get("attention_bias")),
        "disable_bias_linear": not hf.get("attention_bias", False) and not hf.get("mlp_bias",
                                                                                  False),
    }
    return {k: v for k, v in values.items() if v is not None}


def check_model_args(model: ModelArgs, given: set[str], hf: dict, directory: str) -> None:
    """Raise ConfigError on the first MODEL_ARGS value that disagrees with config.json.

    `given` holds the field names set on the command line; boolean flags are compared
    only when given (their absence is Megatron's default, not a claim about the model).
    """
    expected = expected_values(hf)
    for name in sorted(given):
        value = getattr(model, name)
        if name == "vocab_size":
            if value < hf.get("vocab_size", 0):
                raise ConfigError(f"--vocab-size {value} is smaller than vocab_size "
                                  f"{hf['vocab_size']} in {directory}/config.json")
            continue
        if name == "group_query_attention":
            continue  # --num-query-groups carries the claim
        if name in ("num_experts", "moe_router_topk") and name not in expected:
            # A dense config.json implies no experts: an MoE claim is a mismatch too.
            raise ConfigError(f"{option_name(name)} {value} disagrees with {directory}/"
                              "config.json, which describes a dense model (no experts): drop "
                              "the MoE flags or fix the checkpoint path")
        if name not in expected:
            continue
        want = expected[name]
        same = math.isclose(value, want, rel_tol=1e-9) if isinstance(want, float) else value == want
        if not same:
            raise ConfigError(f"{option_name(name)} {value} disagrees with {directory}/config.json, "
                              f"which implies {want}: fix the model script "
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
