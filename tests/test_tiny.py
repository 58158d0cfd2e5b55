"""The embedded default (`python -m furlong.tiny OUT [--seed N]`): files, determinism,
loading with transformers, the tokenizer and chat template, the task's data, and the
MODEL_ARGS scripts against config.json."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, model_args, train_argv
from furlong.config import ConfigError, load_config
from furlong.tiny import NUM_EVAL, write_tiny

DATA_FILES = ("sft.jsonl", "train.jsonl", "eval.jsonl")
PROMPT = re.compile(r"^(\d+)\+(\d+)=$")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model/model.safetensors")


@pytest.fixture(scope="module")
def tiny_again(tmp_path_factory) -> Path:
    """A second write with the seed of `tiny` (0)."""
    return write_tiny(tmp_path_factory.mktemp("tiny_again"), seed=0)


@pytest.fixture(scope="module")
def tiny_seed1(tmp_path_factory) -> Path:
    """Written through the command line, with another seed."""
    out = tmp_path_factory.mktemp("tiny_seed1")
    result = subprocess.run([sys.executable, "-m", "furlong.tiny", str(out), "--seed", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out / 'model'}" in result.stdout
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny / "model")


# ---------------------------------------------------------------- files and determinism

def test_writes_model_and_data(tiny, tiny_seed1):
    for out in (tiny, tiny_seed1):
        model = out / "model"
        for name in ("config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"):
            assert (model / name).is_file(), name
        for name in DATA_FILES:
            assert (out / "data" / name).stat().st_size > 0, name


def test_same_seed_same_bytes_and_weights(tiny, tiny_again):
    for name in DATA_FILES:
        assert (tiny / "data" / name).read_bytes() == (tiny_again / "data" / name).read_bytes()
    for name in ("config.json", "tokenizer.json"):
        assert (tiny / "model" / name).read_bytes() == (tiny_again / "model" / name).read_bytes()
    first, second = weights(tiny), weights(tiny_again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_other_seed_other_data_and_weights(tiny, tiny_seed1):
    for name in DATA_FILES:
        assert (tiny / "data" / name).read_bytes() != (tiny_seed1 / "data" / name).read_bytes()
    first, other = weights(tiny), weights(tiny_seed1)
    assert first.keys() == other.keys()
    assert not any(torch.equal(first[k], other[k]) for k in first if first[k].std() > 0)
    assert sorted(map(json.dumps, read_jsonl(tiny / "data/train.jsonl")
                      + read_jsonl(tiny / "data/eval.jsonl"))) == sorted(
        map(json.dumps, read_jsonl(tiny_seed1 / "data/train.jsonl")
            + read_jsonl(tiny_seed1 / "data/eval.jsonl")))  # same problems, other split/order


# ---------------------------------------------------------------- loading with transformers

def test_model_loads_and_runs(tiny, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny / "model")
    config = json.loads((tiny / "model/config.json").read_text())
    assert config["model_type"] == "qwen3" and config["vocab_size"] == len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) == 495_104  # "0.49M parameters"
    ids = torch.tensor([tokenizer("37+48=", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 6, config["vocab_size"]) and torch.isfinite(logits).all()
    assert model.config.eos_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("text,tokens", [
    ("37+48=", ["3", "7", "+", "4", "8", "="]),
    ("\\boxed{85}", ["\\boxed{", "8", "5", "}"]),
    ("\\boxed{118}<|im_end|>", ["\\boxed{", "1", "1", "8", "}", "<|im_end|>"]),
])
def test_tokenizer_round_trips(tokenizer, text, tokens):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == tokens
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = tokenizer("\\boxed{85}<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "\\boxed{85}"


def test_chat_template_renders(tokenizer):
    messages = [{"role": "user", "content": "37+48="}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n37+48=<|im_end|>\n<|im_start|>assistant\n"
    full = messages + [{"role": "assistant", "content": "\\boxed{85}"}]
    text = tokenizer.apply_chat_template(full, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n\\boxed{85}<|im_end|>\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text


# ---------------------------------------------------------------- the task

def pairs(rows: list[dict]) -> list[tuple[int, int]]:
    return [tuple(map(int, PROMPT.match(row["prompt"]).groups())) for row in rows]


def test_train_and_eval_prompts(tiny):
    train = read_jsonl(tiny / "data/train.jsonl")
    held_out = read_jsonl(tiny / "data/eval.jsonl")
    assert len(held_out) == NUM_EVAL and len(train) == 90 * 90 - NUM_EVAL
    for row in train + held_out:
        assert set(row) == {"prompt", "label"}
        a, b = map(int, PROMPT.match(row["prompt"]).groups())
        assert 10 <= a < 100 and 10 <= b < 100 and row["label"] == str(a + b)
    assert not set(pairs(train)) & set(pairs(held_out))
    assert len(set(pairs(train))) == len(train)


def test_sft_rows_answer_the_train_prompts(tiny):
    train = read_jsonl(tiny / "data/train.jsonl")
    sft = read_jsonl(tiny / "data/sft.jsonl")
    assert len(sft) == len(train)
    for row, prompt_row in zip(sft, train, strict=True):
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": prompt_row["prompt"]}
        assert assistant == {"role": "assistant", "content": f"\\boxed{{{prompt_row['label']}}}"}


# ---------------------------------------------------------------- MODEL_ARGS scripts

def tiny_argv(tiny: Path, **flags) -> list[str]:
    """The tiny command line without the chat template, --n-samples-per-prompt and
    --num-rollout, which the model checks do not need."""
    return train_argv(tiny, apply_chat_template=False, n_samples_per_prompt=None,
                      num_rollout=None, **flags)


def test_tiny_sh_passes_the_config_check(tiny):
    config, warnings = load_config(model_args() + tiny_argv(tiny))
    given = {k for k, v in config.sources.items() if k.startswith("model.") and v == "flag"}
    assert len(given) == 15 and warnings == []


def numeric_model_args() -> list[int]:
    """Indices in tiny.sh's MODEL_ARGS of values that are numbers."""
    argv = model_args()
    return [i for i, token in enumerate(argv) if re.fullmatch(r"[0-9.e+-]+", token)]


@pytest.mark.parametrize("index", numeric_model_args())
def test_every_value_of_tiny_sh_is_checked(tiny, index):
    """Each numeric value of tiny.sh, made smaller, fails the check (vocab padding may
    only grow): no value in the script goes unchecked."""
    argv = model_args()
    argv[index] = str(float(argv[index]) / 2) if "." in argv[index] or "e" in argv[index] \
        else str(int(argv[index]) // 2)
    with pytest.raises(ConfigError, match=re.escape(argv[index - 1])):
        load_config(argv + tiny_argv(tiny))


# config.json values of the Hugging Face checkpoints (Qwen/Qwen3-0.6B, Qwen/Qwen3-1.7B).
QWEN3 = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], num_hidden_layers=28,
             num_attention_heads=16, num_key_value_heads=8, head_dim=128, hidden_act="silu",
             vocab_size=151936, rope_theta=1000000, rms_norm_eps=1e-06, attention_bias=False,
             tie_word_embeddings=True, max_position_embeddings=40960)
QWEN3_SIZES = {"qwen3-0.6B": dict(hidden_size=1024, intermediate_size=3072),
               "qwen3-1.7B": dict(hidden_size=2048, intermediate_size=6144)}


@pytest.mark.parametrize("family", sorted(QWEN3_SIZES))
def test_qwen3_scripts_match_their_configs(tiny, tmp_path, family):
    (tmp_path / "config.json").write_text(json.dumps({**QWEN3, **QWEN3_SIZES[family]}))
    script = (REPO / f"scripts/models/{family}.sh").read_text()
    args = shlex.split(script.split("MODEL_ARGS=(")[1].split(")")[0], comments=True)
    argv = tiny_argv(tiny, hf_checkpoint=tmp_path)
    config, _ = load_config(args + argv)
    assert config.model.hidden_size == QWEN3_SIZES[family]["hidden_size"]
    other = "qwen3-1.7B" if family == "qwen3-0.6B" else "qwen3-0.6B"
    (tmp_path / "config.json").write_text(json.dumps({**QWEN3, **QWEN3_SIZES[other]}))
    with pytest.raises(ConfigError, match=r"^--ffn-hidden-size \d+ disagrees"):
        load_config(args + argv)
