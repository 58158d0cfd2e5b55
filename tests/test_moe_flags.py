"""The MoE flags of Miles' model scripts: each is checked against config.json, acts in
training, or warns once saying why it has no effect here.

The config.json files below carry the MoE fields of the real checkpoints (Qwen3-30B-A3B,
Qwen1.5-MoE-A2.7B, DeepSeek-V3, GLM-4.5-Air, Mixtral-8x7B, Qwen3-Next-80B-A3B,
Nemotron-3-Super-120B-A12B); each family spells the same facts with different fields, and
the flags must agree with every spelling.
"""
from __future__ import annotations

import json

import pytest

from conftest import train_argv
from furlong.config import ConfigError, load_config
from furlong.config.model_check import MOE_FIELDS
from furlong.config.moe_layers import layer_pattern, parse_moe_layer_freq, pattern_text
from furlong.config.parser import option_name

QWEN3_MOE = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
             "num_hidden_layers": 48, "hidden_size": 2048, "intermediate_size": 6144,
             "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
             "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True}
QWEN2_MOE = {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"],
             "num_hidden_layers": 24, "hidden_size": 2048, "intermediate_size": 5632,
             "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
             "shared_expert_intermediate_size": 5632, "decoder_sparse_step": 1,
             "mlp_only_layers": [], "norm_topk_prob": False}
DEEPSEEK_V3 = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
               "num_hidden_layers": 61, "hidden_size": 7168, "intermediate_size": 18432,
               "n_routed_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 2048,
               "n_shared_experts": 1, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
               "topk_method": "noaux_tc", "first_k_dense_replace": 3, "moe_layer_freq": 1,
               "norm_topk_prob": True, "n_group": 8, "topk_group": 4}
GLM4_MOE = {"model_type": "glm4_moe", "architectures": ["Glm4MoeForCausalLM"],
            "num_hidden_layers": 46, "hidden_size": 4096, "intermediate_size": 10944,
            "n_routed_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 1408,
            "n_shared_experts": 1, "routed_scaling_factor": 1.0, "first_k_dense_replace": 1,
            "norm_topk_prob": True, "n_group": 1, "topk_group": 1}
MIXTRAL = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
           "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
           "num_local_experts": 8, "num_experts_per_tok": 2}
QWEN3_NEXT = {"model_type": "qwen3_next", "architectures": ["Qwen3NextForCausalLM"],
              "num_hidden_layers": 48, "hidden_size": 2048, "intermediate_size": 5120,
              "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
              "shared_expert_intermediate_size": 512, "decoder_sparse_step": 1,
              "mlp_only_layers": [], "norm_topk_prob": True}
NEMOTRON_H = {"model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"],
              "num_hidden_layers": 88, "hidden_size": 4096, "intermediate_size": 2688,
              "n_routed_experts": 512, "num_experts_per_tok": 22, "moe_intermediate_size": 2688,
              "moe_shared_expert_intermediate_size": 5376, "n_shared_experts": 1,
              "moe_latent_size": 1024, "n_group": 1, "topk_group": 1,
              "routed_scaling_factor": 5.0, "norm_topk_prob": True}

# The flags that only tune Megatron's kernels: one warning each, whatever the model.
PERF_ONLY = ["--moe-grouped-gemm", "--moe-permute-fusion", "--moe-router-dtype fp32",
             "--moe-token-dispatcher-type alltoall"]
# The MoE part of each family's Miles model script (scripts/models/*.py), with its values.
MILES_MOE_ARGS = {
    "qwen3_moe": (QWEN3_MOE, """--moe-ffn-hidden-size 768 --moe-router-score-function softmax
        --moe-router-topk 8 --moe-layer-freq [1]*48 --num-experts 128
        --moe-aux-loss-coeff 0"""),
    "qwen2_moe": (QWEN2_MOE, """--moe-ffn-hidden-size 1408
        --moe-shared-expert-intermediate-size 5632 --moe-router-pre-softmax
        --moe-router-score-function softmax --moe-router-topk 4 --moe-layer-freq 1
        --num-experts 60 --moe-aux-loss-coeff 0"""),
    "deepseek_v3": (DEEPSEEK_V3, """--num-experts 256 --moe-layer-freq [0]*3+[1]*58
        --moe-ffn-hidden-size 2048 --moe-router-topk 8 --moe-shared-expert-intermediate-size 2048
        --moe-router-pre-softmax --moe-router-score-function sigmoid
        --moe-router-enable-expert-bias --moe-router-load-balancing-type seq_aux_loss
        --moe-aux-loss-coeff 0 --moe-router-topk-scaling-factor 2.5"""),
    "glm4_moe": (GLM4_MOE, """--moe-ffn-hidden-size 1408 --moe-shared-expert-intermediate-size 1408
        --moe-router-pre-softmax --moe-router-score-function sigmoid
        --moe-router-enable-expert-bias --moe-router-load-balancing-type seq_aux_loss
        --moe-router-topk 8 --moe-layer-freq ([0]*1+[1]*45) --num-experts 128
        --moe-aux-loss-coeff 0"""),
    "mixtral": (MIXTRAL, """--num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 14336
        --moe-layer-freq 1 --moe-router-score-function softmax"""),
}
# Warnings the sigmoid families' scripts earn: flags Megatron itself ignores there.
SIGMOID_WARNINGS = [
    "--moe-router-pre-softmax has no effect with --moe-router-score-function sigmoid (it "
    "applies to softmax scores only); ignored",
    "--moe-router-load-balancing-type seq_aux_loss has no effect with --moe-aux-loss-coeff 0 "
    "(the loss is weighted 0); ignored"]


@pytest.fixture
def checkpoint(tmp_path):
    """Writes an HF config.json into a fresh directory; returns the directory."""
    def write(hf: dict, **changes):
        directory = tmp_path / hf["model_type"]
        directory.mkdir(exist_ok=True)
        (directory / "config.json").write_text(json.dumps({**hf, **changes}))
        return directory
    return write


def moe_argv(tiny, directory, flags: str) -> list[str]:
    return train_argv(tiny, *flags.split(), hf_checkpoint=directory)


def config_error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    return str(info.value)


@pytest.mark.parametrize("family", MILES_MOE_ARGS)
def test_miles_moe_args_pass_with_one_warning_per_ignored_flag(tiny, checkpoint, family):
    hf, flags = MILES_MOE_ARGS[family]
    argv = moe_argv(tiny, checkpoint(hf), flags + " " + " ".join(PERF_ONLY))
    config, warnings = load_config(argv)
    warned = [w.split()[0] for w in warnings if "(Megatron only: " in w]
    assert warned == ["--moe-router-dtype", "--moe-token-dispatcher-type", "--moe-grouped-gemm",
                      "--moe-permute-fusion"]
    sigmoid = hf["model_type"] in ("deepseek_v3", "glm4_moe")
    assert [w for w in warnings if "Megatron only" not in w] == (SIGMOID_WARNINGS if sigmoid
                                                                 else [])
    assert config.model.moe_router_score_function == ("sigmoid" if sigmoid else "softmax")


def test_aux_loss_fields_reach_the_trainer(tiny, checkpoint):
    """The trainer reads config.model.moe_aux_loss_coeff and moe_router_load_balancing_type."""
    directory = checkpoint(QWEN3_MOE)
    model = load_config(moe_argv(tiny, directory, "--num-experts 128"))[0].model
    assert (model.moe_aux_loss_coeff, model.moe_router_load_balancing_type) == (0.0, "aux_loss")
    flags = "--moe-aux-loss-coeff 1e-3 --moe-router-load-balancing-type seq_aux_loss"
    config, warnings = load_config(moe_argv(tiny, directory, flags))
    assert config.model.moe_aux_loss_coeff == 1e-3
    assert config.model.moe_router_load_balancing_type == "seq_aux_loss"
    assert config.sources["model.moe_aux_loss_coeff"] == "flag" and warnings == []


def test_negative_aux_loss_coeff(tiny, checkpoint):
    message = config_error(moe_argv(tiny, checkpoint(QWEN3_MOE), "--moe-aux-loss-coeff -0.1"))
    assert message == "--moe-aux-loss-coeff -0.1: must be >= 0"


@pytest.mark.parametrize("balancing", ["none", "sinkhorn"])
def test_aux_loss_coeff_without_an_aux_loss_warns(tiny, checkpoint, balancing):
    flags = f"--moe-aux-loss-coeff 0.01 --moe-router-load-balancing-type {balancing}"
    assert load_config(moe_argv(tiny, checkpoint(QWEN3_MOE), flags))[1] == [
        f"--moe-aux-loss-coeff 0.01 has no effect with --moe-router-load-balancing-type "
        f"{balancing} (no auxiliary loss); ignored"]


@pytest.mark.parametrize("hf,flags,source,fix", [
    (QWEN3_MOE, "--num-experts 64", "num_experts 128", "use --num-experts 128"),
    (DEEPSEEK_V3, "--num-experts 128", "n_routed_experts 256", "use --num-experts 256"),
    (QWEN3_MOE, "--moe-router-topk 4", "num_experts_per_tok 8", "use --moe-router-topk 8"),
    (QWEN3_MOE, "--moe-ffn-hidden-size 1536", "moe_intermediate_size 768",
     "use --moe-ffn-hidden-size 768"),
    (MIXTRAL, "--moe-ffn-hidden-size 768", "intermediate_size 14336",
     "use --moe-ffn-hidden-size 14336"),
    (QWEN2_MOE, "--moe-shared-expert-intermediate-size 1408",
     "shared_expert_intermediate_size 5632", "use --moe-shared-expert-intermediate-size 5632"),
    (DEEPSEEK_V3, "--moe-shared-expert-intermediate-size 4096",
     "n_shared_experts 1 x moe_intermediate_size 2048",
     "use --moe-shared-expert-intermediate-size 2048"),
    (QWEN3_MOE, "--moe-shared-expert-intermediate-size 768",
     "model_type qwen3_moe (no shared experts)", "use --moe-shared-expert-intermediate-size 0"),
    (QWEN3_MOE, "--moe-router-score-function sigmoid", "model_type qwen3_moe (a softmax router)",
     "use --moe-router-score-function softmax"),
    (DEEPSEEK_V3, "--moe-router-score-function softmax", 'scoring_func "sigmoid"',
     "use --moe-router-score-function sigmoid"),
    (GLM4_MOE, "--moe-router-score-function softmax", "model_type glm4_moe (a sigmoid router)",
     "use --moe-router-score-function sigmoid"),
    (QWEN3_MOE, "--moe-router-pre-softmax", "norm_topk_prob true",
     "drop --moe-router-pre-softmax"),
    (MIXTRAL, "--moe-router-pre-softmax", "model_type mixtral (softmax over the top-k logits)",
     "drop --moe-router-pre-softmax"),
    (QWEN3_MOE, "--moe-router-enable-expert-bias", "model_type qwen3_moe (no expert bias)",
     "drop --moe-router-enable-expert-bias"),
    (DEEPSEEK_V3, "--moe-router-topk-scaling-factor 1.0", "routed_scaling_factor 2.5",
     "use --moe-router-topk-scaling-factor 2.5"),
    (QWEN3_MOE, "--moe-router-topk-scaling-factor 2.5", "no routed_scaling_factor (so 1.0)",
     "use --moe-router-topk-scaling-factor 1.0"),
    (DEEPSEEK_V3, "--moe-layer-freq 1", "first_k_dense_replace 3",
     "use --moe-layer-freq [0]*3+[1]*58"),
    (GLM4_MOE, "--moe-layer-freq [0]*3+[1]*43", "first_k_dense_replace 1",
     "use --moe-layer-freq [0]*1+[1]*45"),
    (QWEN3_MOE, "--moe-layer-freq [0]*3+[1]*45", "decoder_sparse_step 1 and mlp_only_layers []",
     "use --moe-layer-freq [1]*48"),
])
def test_moe_mismatch_names_the_flag_the_field_and_the_fix(tiny, checkpoint, hf, flags, source,
                                                           fix):
    directory = checkpoint(hf)
    message = config_error(moe_argv(tiny, directory, flags))
    flag, *value = flags.split()
    shown = value[0] if value else "True"
    assert message.startswith(f"{flag} {shown} disagrees with {source} in {directory}/config.json: "
                              f"{fix} ")


def test_expert_bias_follows_deepseek_topk_method(tiny, checkpoint):
    directory = checkpoint(DEEPSEEK_V3, topk_method="greedy")
    message = config_error(moe_argv(tiny, directory, "--moe-router-enable-expert-bias"))
    assert 'topk_method "greedy"' in message and "drop --moe-router-enable-expert-bias" in message


def test_qwen_layer_step_counts_from_one_and_megatron_from_zero(tiny, checkpoint):
    """HF Qwen-MoE makes layer i MoE when (i+1) % decoder_sparse_step == 0 (layers 1, 3, ...);
    Megatron's step N makes layers 0, N, 2N, ... MoE: the same number means other layers."""
    directory = checkpoint(QWEN2_MOE, num_hidden_layers=4, decoder_sparse_step=2)
    message = config_error(moe_argv(tiny, directory, "--moe-layer-freq 2"))
    assert "use --moe-layer-freq [0]*1+[1]*1+[0]*1+[1]*1 " in message
    load_config(moe_argv(tiny, directory, "--moe-layer-freq [0,1,0,1]"))
    directory = checkpoint(QWEN2_MOE, num_hidden_layers=4, mlp_only_layers=[0, 2])
    load_config(moe_argv(tiny, directory, "--moe-layer-freq ([0]*1+[1]*1)*2"))


@pytest.mark.parametrize("name", MOE_FIELDS)
def test_every_moe_flag_on_a_dense_model(grpo_argv, name):
    """Guards against an MoE model script passing on a dense checkpoint: every MoE flag that
    describes the model or its training is an error there, not only --num-experts."""
    flag = option_name(name)
    value = {"moe_router_score_function": "sigmoid", "moe_layer_freq": "1",
             "moe_router_load_balancing_type": "seq_aux_loss",
             "moe_router_topk_scaling_factor": "2.5", "moe_aux_loss_coeff": "0.0"}.get(name, "8")
    switch = name in ("moe_router_pre_softmax", "moe_router_enable_expert_bias",
                      "moe_shared_expert_gate")
    message = config_error(grpo_argv + ([flag] if switch else [flag, value]))
    shown = "True" if switch else value
    assert message.startswith(f"{flag} {shown} disagrees") and "dense model" in message


@pytest.mark.parametrize("text,pattern", [
    ("1", [1, 1, 1, 1]),
    ("2", [1, 0, 1, 0]),
    ("[0,1,1,1]", [0, 1, 1, 1]),
    ("[0]*1+[1]*3", [0, 1, 1, 1]),
    ("([0]*1+[1]*3)", [0, 1, 1, 1]),
    ("([1]*1+[0]*1)*2", [1, 0, 1, 0]),
])
def test_layer_freq_forms(text, pattern):
    assert layer_pattern(text, 4) == pattern


@pytest.mark.parametrize("text", ["0", "-1", "x", "[2]*4", "[0]*3+", "__import__('os')",
                                  "[0]*10**9", "[0.5]*4", "([0]*1000)*1000", "[[0],[1]]", "[]"])
def test_layer_freq_rejects_anything_but_ints_lists_plus_and_times(grpo_argv, text):
    """Guards against evaluating the flag's text as Python: only literals, + and * count,
    and a pattern may not grow past any real model's depth."""
    with pytest.raises(ValueError):
        parse_moe_layer_freq(text)
    message = config_error(grpo_argv + ["--moe-layer-freq", text])
    assert message.startswith("argument --moe-layer-freq:") and "'[0]*3+[1]*45'" in message


def test_pattern_text_round_trips():
    pattern = [0, 0, 0] + [1] * 58
    assert pattern_text(pattern) == "[0]*3+[1]*58"
    assert parse_moe_layer_freq(pattern_text(pattern)) == pattern


def miles_layer_freq(num_layers: int, num_dense: int) -> str:
    """--moe-layer-freq as Miles' model scripts render it: one 0 or 1 per layer."""
    return "[" + ",".join(["0"] * num_dense + ["1"] * (num_layers - num_dense)) + "]"


def megatron_only(flag: str, why: str) -> str:
    return f"{flag} has no effect on the fsdp backend (Megatron only: {why}); ignored"


DTYPE_WARNING = megatron_only("--moe-router-dtype",
                              "furlong's router computes its scores in float32 already")
DISPATCHER_WARNING = megatron_only("--moe-token-dispatcher-type",
                                   "it picks how Megatron moves tokens between expert ranks")
GEMM_WARNING = megatron_only("--moe-grouped-gemm", "furlong's experts already run as grouped "
                                                   "matmuls")
FUSION_WARNING = megatron_only("--moe-permute-fusion",
                               "it fuses kernels of Megatron's token dispatcher")
BIAS_RATE_WARNING = megatron_only("--moe-router-bias-update-rate", "furlong keeps the "
                                  "checkpoint's expert bias fixed, as rate 0 does")
DROP_POLICY_WARNING = megatron_only("--moe-token-drop-policy",
                                    "furlong's experts take every token routed to them")
# Every --moe-* flag (and --num-experts) of five Miles model scripts, as written there
# (scripts/models/<name>.py), with the warnings each set earns, in order.
MILES_SCRIPTS = {
    "qwen3-30B-A3B": (QWEN3_MOE, f"""--moe-ffn-hidden-size 768
        --moe-router-score-function softmax --moe-token-dispatcher-type alltoall
        --moe-router-topk 8 --moe-layer-freq {miles_layer_freq(48, 0)} --num-experts 128
        --moe-grouped-gemm --moe-token-drop-policy probs --moe-router-dtype fp32
        --moe-permute-fusion --moe-aux-loss-coeff 0""",
        [DTYPE_WARNING, DISPATCHER_WARNING, GEMM_WARNING, FUSION_WARNING,
         DROP_POLICY_WARNING]),
    "deepseek-v3": (DEEPSEEK_V3, f"""--num-experts 256
        --moe-layer-freq {miles_layer_freq(61, 3)} --moe-ffn-hidden-size 2048
        --moe-router-topk 8 --moe-shared-expert-intermediate-size 2048 --moe-router-pre-softmax
        --moe-router-score-function sigmoid --moe-router-enable-expert-bias
        --moe-router-load-balancing-type seq_aux_loss --moe-token-dispatcher-type alltoall
        --moe-aux-loss-coeff 0 --moe-router-bias-update-rate 0 --moe-router-group-topk 4
        --moe-router-num-groups 8 --moe-grouped-gemm --moe-router-topk-scaling-factor 2.5
        --moe-router-dtype fp32 --moe-permute-fusion""",
        [BIAS_RATE_WARNING, DTYPE_WARNING, DISPATCHER_WARNING, GEMM_WARNING, FUSION_WARNING]
        + SIGMOID_WARNINGS),
    "glm4.5-106B-A12B": (GLM4_MOE, """--moe-ffn-hidden-size 1408
        --moe-shared-expert-intermediate-size 1408 --moe-router-pre-softmax
        --moe-router-score-function sigmoid --moe-router-enable-expert-bias
        --moe-router-bias-update-rate 0 --moe-router-load-balancing-type seq_aux_loss
        --moe-token-dispatcher-type alltoall --moe-router-topk 8 --moe-layer-freq [0]*1+[1]*45
        --num-experts 128 --moe-grouped-gemm --moe-router-dtype fp32 --moe-permute-fusion
        --moe-aux-loss-coeff 0""",
        [BIAS_RATE_WARNING, DTYPE_WARNING, DISPATCHER_WARNING, GEMM_WARNING, FUSION_WARNING]
        + SIGMOID_WARNINGS),
    "qwen3-next-80B-A3B": (QWEN3_NEXT, f"""--moe-ffn-hidden-size 512
        --moe-shared-expert-intermediate-size 512 --moe-router-score-function softmax
        --moe-token-dispatcher-type alltoall --moe-router-topk 10
        --moe-layer-freq {miles_layer_freq(48, 0)} --num-experts 512 --moe-grouped-gemm
        --moe-token-drop-policy probs --moe-router-dtype fp32 --moe-permute-fusion
        --moe-aux-loss-coeff 0 --moe-shared-expert-gate""",
        [DTYPE_WARNING, DISPATCHER_WARNING, GEMM_WARNING, FUSION_WARNING,
         DROP_POLICY_WARNING]),
    "nemotron-3-super-120b-a12b": (NEMOTRON_H, """--num-experts 512 --moe-router-topk 22
        --moe-ffn-hidden-size 2688 --moe-shared-expert-intermediate-size 5376
        --moe-latent-size 1024 --moe-router-score-function sigmoid
        --moe-router-enable-expert-bias --moe-grouped-gemm --moe-router-dtype fp32
        --moe-router-num-groups 1 --moe-router-group-topk 1
        --moe-router-topk-scaling-factor 5.0 --moe-router-pre-softmax
        --moe-router-load-balancing-type seq_aux_loss --moe-router-bias-update-rate 0
        --moe-aux-loss-coeff 0""",
        [BIAS_RATE_WARNING, DTYPE_WARNING, GEMM_WARNING] + SIGMOID_WARNINGS),
}


@pytest.mark.parametrize("script", MILES_SCRIPTS)
def test_miles_script_moe_flags_pass_with_exactly_the_expected_warnings(tiny, checkpoint,
                                                                        script):
    """Guards against a Miles model script that furlong's parser rejects: every --moe-* flag
    those scripts write is accepted, agrees with config.json, or warns once saying why."""
    hf, flags, expected = MILES_SCRIPTS[script]
    assert load_config(moe_argv(tiny, checkpoint(hf), flags))[1] == expected


@pytest.mark.parametrize("hf,flags,source,fix", [
    (DEEPSEEK_V3, "--moe-router-num-groups 4", "n_group 8", "use --moe-router-num-groups 8"),
    (DEEPSEEK_V3, "--moe-router-group-topk 8", "topk_group 4", "use --moe-router-group-topk 4"),
    (GLM4_MOE, "--moe-router-num-groups 8", "n_group 1", "use --moe-router-num-groups 1"),
    (QWEN3_MOE, "--moe-router-num-groups 8", "model_type qwen3_moe (no expert groups)",
     "drop --moe-router-num-groups"),
    (MIXTRAL, "--moe-router-group-topk 2", "model_type mixtral (no expert groups)",
     "drop --moe-router-group-topk"),
    (QWEN3_MOE, "--moe-shared-expert-gate", "model_type qwen3_moe (no shared expert gate)",
     "drop --moe-shared-expert-gate"),
    (DEEPSEEK_V3, "--moe-shared-expert-gate", "model_type deepseek_v3 (no shared expert gate)",
     "drop --moe-shared-expert-gate"),
    (NEMOTRON_H, "--moe-latent-size 2048", "moe_latent_size 1024", "use --moe-latent-size 1024"),
    (QWEN3_MOE, "--moe-latent-size 1024", "model_type qwen3_moe (no latent projection)",
     "drop --moe-latent-size"),
    (NEMOTRON_H, "--moe-shared-expert-intermediate-size 2688",
     "moe_shared_expert_intermediate_size 5376",
     "use --moe-shared-expert-intermediate-size 5376"),
])
def test_new_moe_flag_mismatch_message(tiny, checkpoint, hf, flags, source, fix):
    directory = checkpoint(hf)
    flag, *value = flags.split()
    shown = value[0] if value else "True"
    assert config_error(moe_argv(tiny, directory, flags)) == (
        f"{flag} {shown} disagrees with {source} in {directory}/config.json: {fix} "
        "(scripts/models/*.sh), or fix the checkpoint path")


def test_latent_size_on_a_nemotron_without_one(tiny, checkpoint):
    """Nemotron-3-Nano's config.json has moe_latent_size null: the flag must be left out."""
    directory = checkpoint(NEMOTRON_H, moe_latent_size=None)
    assert config_error(moe_argv(tiny, directory, "--moe-latent-size 1024")) == (
        f"--moe-latent-size 1024 disagrees with moe_latent_size null in {directory}/"
        "config.json: drop --moe-latent-size (scripts/models/*.sh), or fix the checkpoint path")


@pytest.mark.parametrize("hf", [QWEN2_MOE, QWEN3_NEXT])
def test_shared_expert_gate_on_the_families_that_have_one(tiny, checkpoint, hf):
    config, warnings = load_config(moe_argv(tiny, checkpoint(hf), "--moe-shared-expert-gate"))
    assert config.model.moe_shared_expert_gate and warnings == []


def test_new_moe_flags_keep_megatron_defaults(grpo_argv):
    model = load_config(grpo_argv)[0].model
    assert (model.moe_token_drop_policy, model.moe_router_bias_update_rate,
            model.moe_router_num_groups, model.moe_router_group_topk,
            model.moe_shared_expert_gate, model.moe_latent_size) == ("probs", 1e-3, None, None,
                                                                     False, None)


# The attention lines of Miles' model scripts for the families whose attention is not
# Qwen's: DeepSeek-V3's latent attention (Megatron's --kv-channels is the value head size,
# --qk-layernorm the latent norms) and GLM-4.5 (query/key norms by `use_qk_norm`).
DEEPSEEK_V3_ATTENTION = {**DEEPSEEK_V3, "num_attention_heads": 128, "num_key_value_heads": 128,
                         "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
                         "qk_rope_head_dim": 64, "v_head_dim": 128}
GLM4_5_ATTENTION = {**GLM4_MOE, "num_attention_heads": 96, "num_key_value_heads": 8,
                    "head_dim": 128, "use_qk_norm": True}


@pytest.mark.parametrize("hf,flags", [
    (DEEPSEEK_V3_ATTENTION, "--num-attention-heads 128 --kv-channels 128 --qk-layernorm"),
    (GLM4_5_ATTENTION, "--num-attention-heads 96 --num-query-groups 8 --kv-channels 128 "
                       "--qk-layernorm"),
])
def test_latent_and_glm_attention_flags_agree_with_config_json(tiny, checkpoint, hf, flags):
    load_config(moe_argv(tiny, checkpoint(hf), flags))  # no ConfigError


def test_qk_layernorm_is_refused_where_config_json_has_no_such_norms(tiny, checkpoint):
    assert "--qk-layernorm" in config_error(moe_argv(
        tiny, checkpoint({**GLM4_5_ATTENTION, "use_qk_norm": False}), "--qk-layernorm"))
