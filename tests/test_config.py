"""Flags in, typed config out: the flag set and its defaults, validation, the sglang
passthrough, the model check against config.json, --help and --dry-run.

Most tests call `load_config`/`parse_config` in-process; two run `train.py` in a
subprocess (--help, and --dry-run of the seed's launch script on a model directory
whose weights are corrupt), since that is what a user types.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from conftest import REPO, model_args, train_argv
from furlong import cli, dry_run
from furlong.config import ConfigError, build_parser, eval_datasets, load_config
from furlong.config.groups import GROUPS, flag_fields
from furlong.config.parser import option_name, parse_config
from furlong.config.report import format_config
from furlong.config.sglang import OWNED, launch_server_args

SNAPSHOT = Path(__file__).with_name("flags_snapshot.json")
UPDATE_ENV = "FURLONG_UPDATE_FLAGS_SNAPSHOT"
GROUP_TITLES = [title for title, _, _ in GROUPS]
SEED_GROUPS = ["MODEL_ARGS", "CKPT_ARGS", "ROLLOUT_ARGS", "EVAL_ARGS", "PERF_ARGS",
               "GRPO_ARGS", "OPTIMIZER_ARGS", "SGLANG_ARGS"]

# Every flag of the seed's flag groups (the --sglang-* ones are passthrough, tested below).
SEED_FLAGS = """
--num-layers --hidden-size --ffn-hidden-size --num-attention-heads --group-query-attention
--num-query-groups --kv-channels --seq-length --max-position-embeddings --vocab-size
--rotary-base --rotary-percent --normalization --norm-epsilon --swiglu --disable-bias-linear
--qk-layernorm --untie-embeddings-and-output-weights --use-rotary-position-embeddings
--num-experts --moe-router-topk --moe-grouped-gemm --spec
--hf-checkpoint --ref-load --load --save --save-interval --save-hf --no-save-optim --async-save
--prompt-data --input-key --label-key --metadata-key --tool-key --apply-chat-template
--apply-chat-template-kwargs --rollout-shuffle --rollout-seed --rollout-max-prompt-len
--rollout-batch-size --n-samples-per-prompt --num-rollout --num-epoch --global-batch-size
--num-steps-per-rollout --micro-batch-size --rollout-temperature --rollout-top-p
--rollout-top-k --rollout-max-response-len --rollout-max-context-len --rollout-stop
--rollout-stop-token-ids --rollout-skip-special-tokens --rm-type --custom-rm-path --group-rm
--reward-key --rm-url --over-sampling-batch-size --dynamic-sampling-filter-path
--partial-rollout --custom-generate-function-path --rollout-function-path
--update-weights-interval --update-weight-buffer-size --keep-old-actor --balance-data
--eval-interval --eval-prompt-data --n-samples-per-eval-prompt --eval-max-response-len
--eval-top-p --eval-top-k --eval-temperature --eval-input-key --eval-label-key
--skip-eval-before-train --log-passrate
--tensor-model-parallel-size --sequence-parallel --pipeline-model-parallel-size
--context-parallel-size --expert-model-parallel-size --expert-tensor-parallel-size
--recompute-granularity --recompute-method --recompute-num-layers --use-dynamic-batch-size
--max-tokens-per-gpu
--advantage-estimator --use-kl-loss --kl-loss-coef --kl-loss-type --kl-coef --eps-clip
--eps-clip-high --eps-clip-c --entropy-coef --calculate-per-token-loss
--disable-grpo-std-normalization --normalize-advantages --use-tis --tis-clip --tis-clip-low
--use-rollout-logprobs --loss-type --custom-loss-function-path --ref-update-interval
--optimizer --lr --min-lr --lr-decay-style --lr-warmup-iters --lr-warmup-fraction
--lr-decay-iters --adam-beta1 --adam-beta2 --adam-eps --weight-decay --clip-grad --seed
--rollout-num-gpus-per-engine
--actor-num-nodes --actor-num-gpus-per-node --rollout-num-gpus --num-gpus-per-node --colocate
--offload --offload-train --offload-rollout --train-backend
--use-tensorboard --tb-project-name --use-wandb --wandb-project --wandb-group --wandb-mode
--debug-rollout-only --debug-train-only --save-debug-rollout-data --load-debug-rollout-data
--attention-dropout --hidden-dropout --accumulate-allreduce-grads-in-fp32
--attention-softmax-in-fp32 --attention-backend
""".split()
SEED_SGLANG_FLAGS = ["--sglang-mem-fraction-static", "--sglang-context-length",
                     "--sglang-enable-ep-moe", "--sglang-enable-dp-attention",
                     "--sglang-log-level"]

# The defaults the seed's flag groups give in brackets.
SEED_DEFAULTS = {
    "--input-key": "input", "--label-key": None, "--metadata-key": "metadata",
    "--tool-key": "tools", "--rollout-seed": 42, "--n-samples-per-prompt": 1,
    "--micro-batch-size": 1, "--rollout-temperature": 1.0, "--rollout-top-p": 1.0,
    "--rollout-top-k": -1, "--update-weights-interval": 1,
    "--update-weight-buffer-size": 512 * 1024 * 1024, "--n-samples-per-eval-prompt": 1,
    "--kl-loss-coef": 0.0, "--kl-loss-type": "k1", "--kl-coef": 0.0, "--eps-clip": 0.2,
    "--eps-clip-high": None, "--entropy-coef": 0.0, "--tis-clip": 2.0, "--tis-clip-low": 0.0,
    "--gamma": 1.0, "--lambd": 1.0, "--value-clip": 0.2, "--optimizer": "adam", "--lr": 1e-6,
    "--lr-decay-style": "constant", "--adam-beta1": 0.9, "--adam-beta2": 0.999,
    "--adam-eps": 1e-8, "--weight-decay": 0.01, "--clip-grad": 1.0, "--seed": 1234,
    "--rollout-num-gpus-per-engine": 1, "--actor-num-nodes": 1, "--actor-num-gpus-per-node": 8,
    "--num-gpus-per-node": 8, "--over-sampling-batch-size": None, "--rollout-shuffle": False,
    "--apply-chat-template": False, "--colocate": False,
}


def launch_script(tiny: Path, save: Path) -> list[str]:
    """The launch script quoted at the end of the seed's flag groups, paths on the tiny model."""
    model, data = str(tiny / "model"), tiny / "data"
    return f"""
--hf-checkpoint {model} --ref-load {model} --load {save} --save {save} --save-interval 20
--prompt-data {data / 'train.jsonl'} --input-key prompt --label-key label --apply-chat-template
--rollout-shuffle --rm-type deepscaler --num-rollout 3000 --rollout-batch-size 32
--n-samples-per-prompt 8 --rollout-max-response-len 8192 --rollout-temperature 1
--global-batch-size 256 --balance-data
--eval-interval 20 --eval-prompt-data aime {data / 'eval.jsonl'} --n-samples-per-eval-prompt 16
--eval-max-response-len 16384 --eval-top-p 1
--tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size 1
--context-parallel-size 1 --expert-model-parallel-size 1
--expert-tensor-parallel-size 1 --recompute-granularity full
--recompute-method uniform --recompute-num-layers 1 --use-dynamic-batch-size
--max-tokens-per-gpu 9216
--advantage-estimator grpo --use-kl-loss --kl-loss-coef 0.00
--kl-loss-type low_var_kl --entropy-coef 0.00 --eps-clip 0.2 --eps-clip-high 0.28
--optimizer adam --lr 1e-6 --lr-decay-style constant --weight-decay 0.1
--adam-beta1 0.9 --adam-beta2 0.98
--rollout-num-gpus-per-engine 2 --sglang-mem-fraction-static 0.7
--attention-dropout 0.0 --hidden-dropout 0.0 --accumulate-allreduce-grads-in-fp32
--attention-softmax-in-fp32 --attention-backend flash
--actor-num-nodes 1 --actor-num-gpus-per-node 8 --colocate
""".split()


def config_error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    return str(info.value)


# ---------------------------------------------------------------- the flag set, frozen

def current_flags() -> dict[str, dict]:
    """Every flag of the parser: its --help group, default, arity and choices."""
    flags = {}
    for group in build_parser()._action_groups:
        for action in group._group_actions:
            if not action.option_strings or action.dest == "help":
                continue
            default = list(action.default) if isinstance(action.default, tuple) else action.default
            flags[action.option_strings[0]] = {
                "group": group.title, "default": default, "nargs": action.nargs,
                "choices": list(action.choices) if action.choices else None}
    return flags


def test_flag_set_and_defaults_match_snapshot():
    """Guards launch scripts: removing or renaming a flag, changing a default, its arity
    or its choices fails here until tests/flags_snapshot.json is updated on purpose
    (FURLONG_UPDATE_FLAGS_SNAPSHOT=1 pytest tests/test_config.py -k snapshot)."""
    current = current_flags()
    if os.environ.get(UPDATE_ENV):
        SNAPSHOT.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    frozen = json.loads(SNAPSHOT.read_text())
    removed = sorted(set(frozen) - set(current))
    added = sorted(set(current) - set(frozen))
    changed = sorted(name for name in set(frozen) & set(current) if frozen[name] != current[name])
    details = [f"{name}: {frozen[name]} -> {current[name]}" for name in changed]
    assert not (removed or added or changed), (
        f"flags removed {removed}, added {added}, changed {details}; if deliberate, rerun "
        f"with {UPDATE_ENV}=1 and commit tests/flags_snapshot.json")


def test_snapshot_holds_every_spec_flag():
    frozen = json.loads(SNAPSHOT.read_text())
    assert [flag for flag in SEED_FLAGS if flag not in frozen] == []


def test_every_spec_flag_is_accepted():
    options = set(current_flags())
    assert [flag for flag in SEED_FLAGS if flag not in options] == []


@pytest.mark.parametrize("flag", SEED_DEFAULTS)
def test_spec_defaults(flag):
    assert current_flags()[flag]["default"] == SEED_DEFAULTS[flag]


def test_flags_sit_in_the_seed_groups_and_dataclasses_agree():
    """--help groups, the dataclasses and the parser are one table: each field is the
    flag of the same name in the group titled after its dataclass."""
    flags = current_flags()
    assert GROUP_TITLES[:8] == SEED_GROUPS
    assert GROUP_TITLES[8:] == ["LORA_ARGS", "CLUSTER_ARGS", "LOGGING_ARGS", "DEBUG_ARGS"]
    from_dataclasses = {option_name(f.name): title for title, _, cls in GROUPS
                        for f in flag_fields(cls)}
    assert {name: flag["group"] for name, flag in flags.items()} == from_dataclasses
    assert flags["--rollout-num-gpus-per-engine"]["group"] == "SGLANG_ARGS"
    assert flags["--eval-top-p"]["group"] == "EVAL_ARGS"
    assert flags["--colocate"]["group"] == "CLUSTER_ARGS"


def test_config_is_frozen(grpo_argv):
    config, _ = load_config(grpo_argv)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rollout.rollout_batch_size = 3  # type: ignore[misc]


# ---------------------------------------------------------------- the seed's launch script

def test_spec_launch_script_parses(tiny, tmp_path):
    config, warnings = load_config(model_args() + launch_script(tiny, tmp_path / "save"))
    r, e, g, s = config.rollout, config.eval, config.grpo, config.sources
    assert (r.rollout_batch_size, r.n_samples_per_prompt, r.global_batch_size) == (32, 8, 256)
    assert r.num_steps_per_rollout == 1 and s["rollout.num_steps_per_rollout"] == "derived"
    assert (g.eps_clip, g.eps_clip_high, g.kl_loss_type, g.use_kl_loss) == (0.2, 0.28,
                                                                          "low_var_kl", True)
    assert g.kl_loss_coef == 0.0 and s["grpo.kl_loss_coef"] == "flag"
    assert eval_datasets(config) == [("aime", str(tiny / "data/eval.jsonl"))]
    assert (e.eval_max_response_len, e.eval_top_p, e.n_samples_per_eval_prompt) == (16384, 1.0,
                                                                                   16)
    assert e.eval_temperature == 1.0 and s["eval.eval_temperature"] == "inherited"
    assert config.perf.tensor_model_parallel_size == 2 and config.perf.max_tokens_per_gpu == 9216
    assert config.optimizer.adam_beta2 == 0.98 and config.optimizer.weight_decay == 0.1
    assert config.sglang.rollout_num_gpus_per_engine == 2
    assert config.sglang.passthrough == (("mem-fraction-static", ("0.7",)),)
    assert config.cluster.colocate and config.cluster.actor_num_gpus_per_node == 8
    assert config.model.num_layers == 2 and config.model.attention_backend == "flash"
    megatron = sorted(w.split()[0] for w in warnings if "Megatron only" in w)
    assert megatron == ["--accumulate-allreduce-grads-in-fp32", "--attention-backend",
                        "--attention-dropout", "--attention-softmax-in-fp32", "--hidden-dropout"]


def _sample_argv(cls: type, f) -> list[str]:
    """A command-line occurrence of field f with some valid value."""
    flag = option_name(f.name)
    hint = typing.get_type_hints(cls)[f.name]
    if hint is bool:
        return [flag]
    if f.metadata.get("nargs") == 2:
        return [flag, "a", "b"]
    if f.metadata.get("choices"):
        return [flag, f.metadata["choices"][0]]
    text = str(hint)
    return [flag, "x" if "str" in text else "1" if "int" in text else "0.5"]


MEGATRON_ONLY = [(cls, f) for _, _, cls in GROUPS for f in flag_fields(cls)
                 if f.metadata.get("megatron_only")]


@pytest.mark.parametrize("cls,f", MEGATRON_ONLY,
                         ids=[option_name(f.name) for _, f in MEGATRON_ONLY])
def test_megatron_only_flag_warns_once(grpo_argv, cls, f):
    sample = _sample_argv(cls, f)
    _, warnings = load_config(grpo_argv + sample + sample)  # given twice, still one warning
    why = f": {f.metadata['why']}" if f.metadata.get("why") else ""
    assert [w for w in warnings if w.startswith(option_name(f.name) + " ")] == [
        f"{option_name(f.name)} has no effect on the fsdp backend (Megatron only{why}); ignored"]


def test_no_warnings_without_megatron_flags(grpo_argv):
    assert load_config(grpo_argv)[1] == []


# ---------------------------------------------------------------- unknown flags, bad values

@pytest.mark.parametrize("typo,meant", [
    ("--rollout-batch-sise", "--rollout-batch-size"),
    ("--eval-intervall", "--eval-interval"),
    ("--lr-decay-stile", "--lr-decay-style"),
    ("--n-sample-per-prompt", "--n-samples-per-prompt"),
])
def test_unknown_flag_names_the_closest(grpo_argv, typo, meant):
    assert config_error(grpo_argv + [typo, "3"]) == f"unknown flag {typo}; did you mean {meant}?"
    assert config_error(grpo_argv + [f"{typo}=3"]) == f"unknown flag {typo}; did you mean {meant}?"


def test_unknown_flag_without_close_match(grpo_argv):
    assert "unknown flag --zzzz" in config_error(grpo_argv + ["--zzzz"])


def test_abbreviations_are_not_accepted(grpo_argv):
    """argparse would otherwise take --rollout-batch for --rollout-batch-size."""
    assert "unknown flag --rollout-batch" in config_error(grpo_argv + ["--rollout-batch", "3"])


def test_stray_value_is_an_error(grpo_argv):
    assert "unexpected value 'oops'" in config_error(grpo_argv + ["oops"])


def test_cli_unknown_flag_exit_2_and_one_line(capsys):
    assert cli.main(["--rollout-batch-sise", "32"]) == 2
    err = capsys.readouterr().err
    assert ("train.py: error: unknown flag --rollout-batch-sise; did you mean "
            "--rollout-batch-size?") in err


def test_cli_bad_value_is_one_line_naming_flag_and_value(grpo_argv, capsys):
    """Guards against argparse printing its ~150-line usage plus a second, vaguer error
    ('invalid flag value (see the message above)') for a bad value."""
    assert cli.main(grpo_argv + ["--n-samples-per-prompt", "abc"]) == 2
    err = capsys.readouterr().err
    assert "usage:" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert "--n-samples-per-prompt" in errors[0] and "'abc'" in errors[0]


@pytest.mark.parametrize("argv_tail,words", [
    (["--kl-loss-type", "k9"], ["--kl-loss-type", "k9", "low_var_kl"]),
    (["--apply-chat-template-kwargs", "[1]"], ["--apply-chat-template-kwargs", "[1]",
                                               "JSON object"]),
    (["--apply-chat-template-kwargs", "{bad"], ["--apply-chat-template-kwargs", "{bad"]),
    (["--rollout-batch-size"], ["--rollout-batch-size", "expected one argument"]),
])
def test_bad_values_name_the_flag(grpo_argv, argv_tail, words):
    message = config_error(grpo_argv + argv_tail)
    assert all(word in message for word in words), message


def test_chat_template_kwargs_parse_to_a_dict(grpo_argv):
    config, _ = load_config(grpo_argv + ["--apply-chat-template-kwargs",
                                         '{"enable_thinking": false}'])
    assert config.rollout.apply_chat_template_kwargs == {"enable_thinking": False}


@pytest.mark.parametrize("drop,flag", [("--rollout-batch-size", "--rollout-batch-size"),
                                       ("--hf-checkpoint", "--hf-checkpoint"),
                                       ("--prompt-data", "--prompt-data"),
                                       ("--rollout-max-response-len", "--rollout-max-response-len"),
                                       ("--rm-type", "--rm-type")])
def test_required_flags(grpo_argv, drop, flag):
    i = grpo_argv.index(drop)
    assert flag in config_error(grpo_argv[:i] + grpo_argv[i + 2:])


# ---------------------------------------------------------------- batch invariant, derived values

@pytest.mark.parametrize("given,expected", [
    ([], (16, 1)),
    (["--global-batch-size", "8"], (8, 2)),
    (["--global-batch-size", "16"], (16, 1)),
    (["--num-steps-per-rollout", "4"], (4, 4)),
    (["--global-batch-size", "4", "--num-steps-per-rollout", "4"], (4, 4)),
])
def test_batch_invariant_derives_the_missing_value(grpo_argv, given, expected):
    """rollout_batch_size 4 x n_samples_per_prompt 4 = 16 samples per rollout."""
    config, _ = load_config(grpo_argv + given)
    r, s = config.rollout, config.sources
    assert (r.global_batch_size, r.num_steps_per_rollout) == expected
    assert r.global_batch_size * r.num_steps_per_rollout == 16
    for name in ("global_batch_size", "num_steps_per_rollout"):
        assert s[f"rollout.{name}"] == ("flag" if option_name(name) in given else "derived")


@pytest.mark.parametrize("given,words", [
    (["--global-batch-size", "8", "--num-steps-per-rollout", "3"], ["8 x 3 = 24", "16"]),
    (["--global-batch-size", "5"], ["--global-batch-size 5", "16"]),
    (["--num-steps-per-rollout", "3"], ["--num-steps-per-rollout 3", "16"]),
    (["--global-batch-size", "0"], ["--global-batch-size 0", "> 0"]),
])
def test_batch_invariant_contradictions(grpo_argv, given, words):
    message = config_error(grpo_argv + given)
    assert all(word in message for word in words), message


def test_over_sampling_batch_size(grpo_argv):
    config, _ = load_config(grpo_argv)
    assert config.rollout.over_sampling_batch_size == 4
    assert config.sources["rollout.over_sampling_batch_size"] == "derived"
    config, _ = load_config(grpo_argv + ["--over-sampling-batch-size", "6"])
    assert config.rollout.over_sampling_batch_size == 6
    message = config_error(grpo_argv + ["--over-sampling-batch-size", "3"])
    assert "--over-sampling-batch-size 3" in message and "--rollout-batch-size 4" in message


def test_eps_clip_high_defaults_to_eps_clip(grpo_argv):
    config, _ = load_config(grpo_argv + ["--eps-clip", "0.3"])
    assert config.grpo.eps_clip_high == 0.3
    assert config.sources["grpo.eps_clip_high"] == "derived"
    config, _ = load_config(grpo_argv + ["--eps-clip", "0.3", "--eps-clip-high", "0.4"])
    assert config.grpo.eps_clip_high == 0.4 and config.sources["grpo.eps_clip_high"] == "flag"


@pytest.mark.parametrize("given,words", [
    (["--eps-clip-c", "0.5"], ["--eps-clip-c 0.5", "> 1"]),
    (["--kl-loss-coef", "0.1"], ["--kl-loss-coef 0.1", "--use-kl-loss"]),
    (["--rollout-top-p", "0"], ["--rollout-top-p 0"]),
    (["--rollout-top-k", "0"], ["--rollout-top-k 0"]),
    (["--pipeline-model-parallel-size", "0"], ["--pipeline-model-parallel-size 0", "> 0"]),
    (["--expert-model-parallel-size", "0"], ["--expert-model-parallel-size 0", "> 0"]),
    (["--context-parallel-size", "0"], ["--context-parallel-size 0", "> 0"]),
    (["--advantage-estimator", "ppo"], ["--advantage-estimator ppo", "critic"]),
    (["--use-dynamic-batch-size"], ["--max-tokens-per-gpu"]),
    (["--eval-interval", "5"], ["--eval-interval 5", "--eval-prompt-data"]),
    (["--min-lr", "1"], ["--min-lr 1", "--lr"]),
    (["--rollout-max-prompt-len", "0"], ["--rollout-max-prompt-len 0"]),
    (["--ref-load", "/nonexistent"], ["--ref-load /nonexistent", "config.json"]),
])
def test_cross_flag_rules(grpo_argv, given, words):
    message = config_error(grpo_argv + given)
    assert all(word in message for word in words), message


def test_checkpoint_paths_and_eval_length_are_checked_up_front(grpo_argv, tiny, tmp_path):
    """Caught by validation (so by --dry-run), not after the data and weights load."""
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("oops")
    message = config_error(grpo_argv + ["--load", str(tmp_path)])
    assert f"--load {tmp_path}" in message and "'oops'" in message
    sft = [a for a in grpo_argv if a not in ("--rollout-max-response-len", "8")]
    message = config_error(sft + ["--loss-type", "sft_loss", "--eval-prompt-data", "e",
                                  str(tiny / "data/eval.jsonl"), "--eval-label-key", "label"])
    assert "--eval-max-response-len" in message


def test_a_dataset_smaller_than_one_rollout_is_an_error(grpo_argv):
    from furlong.build import count_rollouts
    from furlong.data import DataError
    config, _ = load_config([a for a in grpo_argv if a not in ("--num-rollout", "2")])
    with pytest.raises(DataError, match="3 prompts .* --rollout-batch-size 4"):
        count_rollouts(config, [None] * 3)
    assert count_rollouts(config, [None] * 9) == 2


def test_eval_values_inherit_rollout_values(grpo_argv, tiny):
    eval_path = str(tiny / "data/eval.jsonl")
    config, _ = load_config(grpo_argv + ["--rollout-temperature", "0.7", "--rollout-top-k", "5",
                                         "--eval-prompt-data", "add", eval_path,
                                         "--eval-top-p", "0.9"])
    e, s = config.eval, config.sources
    inherited = {"eval_max_response_len": 8, "eval_temperature": 0.7, "eval_top_k": 5,
                 "eval_input_key": "prompt", "eval_label_key": "label"}
    for name, value in inherited.items():
        assert (getattr(e, name), s[f"eval.{name}"]) == (value, "inherited"), name
    assert (e.eval_top_p, s["eval.eval_top_p"]) == (0.9, "flag")
    assert eval_datasets(config) == [("add", eval_path)]


def test_eval_prompt_data_pairs_and_lone_path(grpo_argv, tiny):
    """A lone PATH is named after its file ('derived'); NAME PATH pairs given on the
    command line stay 'flag' (they were once reported as 'derived' too)."""
    path = str(tiny / "data/eval.jsonl")
    config, _ = load_config(grpo_argv + ["--eval-prompt-data", path])
    assert eval_datasets(config) == [("eval", path)]
    assert config.sources["eval.eval_prompt_data"] == "derived"
    config, _ = load_config(grpo_argv + ["--eval-prompt-data", "a", path, "b", f"{path}@[:10]"])
    assert eval_datasets(config) == [("a", path), ("b", f"{path}@[:10]")]
    assert config.sources["eval.eval_prompt_data"] == "flag"
    assert "NAME PATH" in config_error(grpo_argv + ["--eval-prompt-data", "a", path, "b"])


def test_sources_default_and_flag(grpo_argv):
    config, _ = load_config(grpo_argv)
    s = config.sources
    assert s["rollout.rollout_batch_size"] == "flag"
    assert s["rollout.apply_chat_template"] == "flag"
    assert s["optimizer.lr"] == "default" and s["rollout.rollout_seed"] == "default"
    config, _ = load_config(grpo_argv + ["--rollout-seed", "42"])  # equal to the default
    assert config.sources["rollout.rollout_seed"] == "flag"


# ---------------------------------------------------------------- MODEL_ARGS against config.json

def test_tiny_model_args_pass(grpo_argv):
    config, _ = load_config(model_args() + grpo_argv)
    assert config.sources["model.hidden_size"] == "flag"


@pytest.mark.parametrize("flag,value,implied", [
    ("--num-layers", "3", "2"),
    ("--hidden-size", "64", "128"),
    ("--ffn-hidden-size", "256", "512"),
    ("--num-attention-heads", "8", "4"),
    ("--num-query-groups", "4", "2"),
    ("--kv-channels", "64", "32"),
    ("--max-position-embeddings", "4096", "128"),
    ("--rotary-base", "1000000", "10000"),
    ("--norm-epsilon", "1e-5", "1e-06"),
    ("--normalization", "LayerNorm", "RMSNorm"),
    ("--rotary-percent", "0.5", "1.0"),
])
def test_model_arg_mismatch_names_both_values(grpo_argv, tiny, flag, value, implied):
    message = config_error(model_args() + grpo_argv + [flag, value])
    assert message.startswith(f"{flag} ")
    assert str(float(value) if flag in ("--rotary-base", "--norm-epsilon") else value) in message
    assert implied in message and str(tiny / "model") in message


@pytest.mark.parametrize("flag", ["--untie-embeddings-and-output-weights", "--add-qkv-bias"])
def test_boolean_model_arg_mismatch(grpo_argv, flag):
    assert config_error(grpo_argv + [flag]).startswith(f"{flag} True disagrees")


@pytest.mark.parametrize("flag", ["--num-experts", "--moe-router-topk"])
def test_moe_flags_on_a_dense_model(grpo_argv, flag):
    """Guards against MoE flags passing silently when config.json has no experts (the
    check used to skip any value the config did not mention)."""
    message = config_error(grpo_argv + [flag, "8"])
    assert message.startswith(f"{flag} 8 disagrees") and "dense" in message


def test_vocab_size_may_exceed_the_config(grpo_argv):
    config, _ = load_config(grpo_argv + ["--vocab-size", "128"])
    assert config.model.vocab_size == 128
    message = config_error(grpo_argv + ["--vocab-size", "16"])
    assert "--vocab-size 16" in message and "22" in message


def test_hf_checkpoint_without_config_json(tiny, tmp_path):
    message = config_error(train_argv(tiny, hf_checkpoint=tmp_path))
    assert "--hf-checkpoint" in message and "config.json" in message


# ---------------------------------------------------------------- SGLANG passthrough

def server_argv(argv: list[str], **kwargs) -> list[str]:
    """launch_server_args for the sglang flags of argv, without the python executable."""
    sglang = parse_config(argv).sglang
    built = launch_server_args(sglang, "/m", "10.0.0.1", 30001, 7, **kwargs)
    assert built[:3] == [sys.executable, "-m", "sglang.launch_server"]
    return built[3:]


OWNED_HEAD = ["--model-path", "/m", "--host", "10.0.0.1", "--port", "30001", "--tp-size", "1",
              "--random-seed", "7"]


@pytest.mark.parametrize("argv,tail", [
    ([], []),
    (["--sglang-enable-dp-attention"], ["--enable-dp-attention"]),
    (["--sglang-mem-fraction-static", "0.7", "--sglang-log-level", "warning"],
     ["--mem-fraction-static", "0.7", "--log-level", "warning"]),
    (["--sglang-log-level=debug", "--sglang-mem-fraction-static=0.5"],
     ["--log-level", "debug", "--mem-fraction-static", "0.5"]),
    (["--sglang-json-model-override-args={\"a\": \"b=c\"}"],
     ["--json-model-override-args", "{\"a\": \"b=c\"}"]),
    (["--sglang-cuda-graph-bs", "1", "2", "4", "--sglang-enable-ep-moe"],
     ["--cuda-graph-bs", "1", "2", "4", "--enable-ep-moe"]),
    (["--sglang-enable-ep-moe", "--lr", "1e-5", "--sglang-context-length", "4096",
      "--sglang-enable-dp-attention", "--sglang-offset", "-1"],
     ["--enable-ep-moe", "--context-length", "4096", "--enable-dp-attention", "--offset", "-1"]),
])
def test_launch_server_args_exact(argv, tail):
    assert server_argv(argv) == OWNED_HEAD + tail


def test_rollout_num_gpus_per_engine_is_tp_size():
    built = server_argv(["--rollout-num-gpus-per-engine", "4", "--sglang-log-level", "info",
                         "--tensor-model-parallel-size", "2"])
    assert built[built.index("--tp-size") + 1] == "4"
    assert built.count("--tp-size") == 1


def test_multi_node_engine_args():
    built = server_argv(["--rollout-num-gpus-per-engine", "16"], nnodes=2, node_rank=1,
                        dist_init_addr="10.0.0.1:5000")
    assert built == ["--model-path", "/m", "--host", "10.0.0.1", "--port", "30001", "--tp-size",
                     "16", "--random-seed", "7", "--nnodes", "2", "--node-rank", "1",
                     "--dist-init-addr", "10.0.0.1:5000"]


def test_declared_sglang_flag_is_not_forwarded():
    """--sglang-server-concurrency is furlong's own flag, not the server's."""
    config = parse_config(["--sglang-server-concurrency", "8", "--sglang-log-level", "info"])
    assert config.sglang.sglang_server_concurrency == 8
    assert config.sglang.passthrough == (("log-level", ("info",)),)


def test_passthrough_value():
    sglang = parse_config(["--sglang-mem-fraction-static", "0.5", "--sglang-enable-ep-moe",
                           "--sglang-mem-fraction-static", "0.6"]).sglang
    assert sglang.passthrough_value("mem-fraction-static") == "0.6"
    assert sglang.passthrough_value("enable-ep-moe") == "true"
    assert sglang.passthrough_value("context-length", "32") == "32"


@pytest.mark.parametrize("name", sorted(OWNED))
@pytest.mark.parametrize("equals", [False, True])
def test_owned_sglang_flags_are_rejected(grpo_argv, name, equals):
    flag = [f"--sglang-{name}=1"] if equals else [f"--sglang-{name}", "1"]
    message = config_error(grpo_argv + flag)
    assert message.startswith(f"--sglang-{name} is set by furlong from {OWNED[name]}")
    with pytest.raises(ConfigError):
        launch_server_args(parse_config(flag).sglang, "/m", "h", 1, 0)


def test_owned_tp_size_points_at_the_flag_to_use(grpo_argv):
    assert "--rollout-num-gpus-per-engine" in config_error(grpo_argv + ["--sglang-tp-size", "2"])
    assert "--hf-checkpoint" in config_error(grpo_argv + ["--sglang-model-path", "/x"])


def test_spec_sglang_flags_are_captured(grpo_argv):
    argv = grpo_argv + [SEED_SGLANG_FLAGS[0], "0.7", SEED_SGLANG_FLAGS[1], "4096",
                        *SEED_SGLANG_FLAGS[2:4], SEED_SGLANG_FLAGS[4], "debug"]
    config, _ = load_config(argv)
    assert [name for name, _ in config.sglang.passthrough] == [
        flag.removeprefix("--sglang-") for flag in SEED_SGLANG_FLAGS]


# ---------------------------------------------------------------- report, dry run, --help

def test_format_config_groups_and_sources(grpo_argv, tiny):
    config, _ = load_config(grpo_argv + ["--eval-prompt-data", str(tiny / "data/eval.jsonl"),
                                         "--sglang-log-level", "info", "--use-mlflow"])
    lines = format_config(config).splitlines()
    assert [line for line in lines if not line.startswith(" ")] == GROUP_TITLES
    rows = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert rows["--rollout-batch-size"].split()[1:] == ["4", "(flag)"]
    assert rows["--lr"].split()[1:] == ["1e-06", "(default)"]
    assert rows["--num-steps-per-rollout"].split()[1:] == ["1", "(derived)"]
    assert rows["--eval-temperature"].split()[1:] == ["1.0", "(inherited)"]
    assert rows["--sglang-log-level"].split()[1:] == ["info", "(flag,", "forwarded)"]
    # flags without effect here appear when given, not among the defaults
    assert rows["--use-mlflow"].split()[1:] == ["True", "(flag)"]
    assert "--mlflow-run-name" not in rows
    # the section a value is printed in is the group of its flag in --help
    section, group_of = None, {}
    for line in lines:
        if not line.startswith(" "):
            section = line
        else:
            group_of[line.split()[0]] = section
    flags = current_flags()
    assert all(group_of[name] == flags[name]["group"] for name in group_of
               if name.startswith("--") and not name.startswith("--sglang-"))


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(dry_run.torch.cuda, "device_count", lambda: 0)


@pytest.mark.parametrize("extra,expected", [
    ([], "devices: no cluster flags: one process on the CPU (no GPU here)"),
    (["--actor-num-gpus-per-node", "4", "--colocate"],
     "devices: the run needs 4 GPUs on 1 node(s): 4 GPUs shared by trainer and engines "
     "(--colocate); this machine has none"),
    (["--actor-num-nodes", "2", "--actor-num-gpus-per-node", "4", "--rollout-num-gpus", "2"],
     "devices: the run needs 10 GPUs on 2 node(s): 8 trainer GPUs + 2 engine GPUs; "
     "this machine has none"),
])
def test_device_plan_without_gpus(grpo_argv, no_gpu, extra, expected):
    config, _ = load_config(grpo_argv + extra)
    assert dry_run.device_plan(config).startswith(expected)


def test_without_gpus_the_run_is_one_cpu_process(monkeypatch):
    from furlong.build import build_rank
    monkeypatch.setattr(dry_run.torch.cuda, "is_available", lambda: False)
    rank = build_rank()
    assert (rank.device.type, rank.dp_rank, rank.dp_size) == ("cpu", 0, 1)


def test_dry_run_in_process(grpo_argv, tiny, capsys, no_gpu):
    assert cli.main(grpo_argv + ["--eval-prompt-data", str(tiny / "data/eval.jsonl"),
                                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"data: {tiny / 'data/train.jsonl'}: first 5 rows OK" in out
    assert f"data: {tiny / 'data/eval.jsonl'}: first 5 rows OK" in out
    assert "devices: no cluster flags: one process on the CPU" in out
    assert out.rstrip().endswith("dry run: configuration is valid")


def test_dry_run_rejects_a_bad_first_row(tiny, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "label": "2"}\n{"prompt": ["oops"], "label": "3"}\n')
    assert cli.main(train_argv(tiny, prompt_data=data, dry_run=True)) == 2
    assert f"train.py: error: {data}:2: " in capsys.readouterr().err


def test_dry_run_renders_prompts_with_the_chat_template(tiny, tmp_path, capsys):
    """Guards against a dry run that passes with --apply-chat-template on a tokenizer that
    has no chat template: the real run would fail only after loading the weights."""
    model = tmp_path / "model"
    shutil.copytree(tiny / "model", model)
    (model / "chat_template.jinja").unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert cli.main(train_argv(tiny, hf_checkpoint=model, dry_run=True)) == 2
    err = capsys.readouterr().err
    assert f"{tiny / 'data/train.jsonl'}:1: cannot render the prompt" in err
    assert "chat_template" in err


def run_train_py(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_help_lists_the_groups():
    result = run_train_py("--help")
    assert result.returncode == 0, result.stderr
    titles = [line[:-1] for line in result.stdout.splitlines() if line[:-1] in GROUP_TITLES]
    assert titles == GROUP_TITLES
    assert "--rollout-num-gpus-per-engine" in result.stdout


def test_dry_run_of_the_spec_launch_script_loads_no_weights(tiny, tmp_path):
    """train.py --dry-run on the seed's launch script checks data and flags with a model
    directory whose model.safetensors is garbage (only config.json and the tokenizer may
    be read), and describes its layout: colocated engines of two GPUs, offload on."""
    model = tmp_path / "model"
    shutil.copytree(tiny / "model", model)
    (model / "model.safetensors").write_bytes(b"not safetensors")
    argv = [str(model) if a == str(tiny / "model") else a
            for a in launch_script(tiny, tmp_path / "save")]
    result = run_train_py(*model_args(), *argv, "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for source in ("(flag)", "(default)", "(derived)", "(inherited)"):
        assert source in out
    assert "devices: the run needs 8 GPUs on 1 node(s)" in out
    assert "engines:" in out and "configuration is valid" in out
    assert "--attention-backend has no effect" in result.stderr
    assert not (tmp_path / "save").exists()
