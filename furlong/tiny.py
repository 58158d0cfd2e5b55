"""The embedded default: a tiny Qwen3 model and a verifiable addition task, no network.

`python -m furlong.tiny OUT_DIR [--seed N] [--moe] [--tools]` writes
  OUT_DIR/model/   an HF directory (config.json, tokenizer with a chat template,
                   model.safetensors) that AutoModelForCausalLM/AutoTokenizer load;
  OUT_DIR/data/    sft.jsonl (chat messages with the answer), train.jsonl and
                   eval.jsonl ({"prompt": "37+48=", "label": "85"}).
The answer format is `\\boxed{85}`, so the built-in `math` reward scores it. Everything
is a pure function of the seed. The MODEL_ARGS of this model are in scripts/models/tiny.sh.
`--moe` writes a Qwen3-MoE model of the same width instead (8 experts, 2 per token; its
MODEL_ARGS in scripts/models/tiny-moe.sh).

`--tools` writes the tool-use task instead (docs/agents.md): the prompt is a key
("4821"), the answer the secret number that the tool `lookup(key)` returns
(`\\boxed{731}`), which the model cannot know without calling it. The tokenizer adds
the words of a `<tool_call>{"name": "lookup", "arguments": {"key": "4821"}}</tool_call>`
block and a `tool` role; the chat template renders tool calls and tool messages as
Qwen's does (without listing the tools). sft.jsonl holds whole conversations (call,
tool reply, answer); the tool is `execute_tool` (--generate-execute-tool-function-path
furlong.tiny:execute_tool), its specs `TOOL_SPECS`. MODEL_ARGS:
scripts/models/tiny-tools.sh.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
WORDS = ("\\boxed{", "}", "user", "assistant", "system", "\n", "+", "=", *"0123456789")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The tool-use task's words, after the addition task's (whose ids stay the same): the
# call's fixed JSON around the key is two words (as a BPE vocabulary merges frequent
# text), so the model samples 15 tokens per conversation, 7 of them digits; the
# characters of other JSON are words too.
LOOKUP_CALL = ('{"name": "lookup", "arguments": {"key": "', '"}}')
TOOL_WORDS = ("<tool_call>", "</tool_call>", *LOOKUP_CALL, "tool", "lookup", "key", "name",
              "arguments", "error", "{", '"', ":", ",", " ")
# CHAT_TEMPLATE with assistant tool calls (Qwen's <tool_call> blocks: arguments as given
# when a JSON string, else as JSON) and tool turns. It does not list the tools: the model
# learns its one tool in the warm-up, and a tools list would only lengthen every prompt.
TOOLS_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] or [] %}{% set function = call['function'] %}"
    "<tool_call>{\"name\": \"{{ function['name'] }}\", \"arguments\": "
    "{% if function['arguments'] is string %}{{ function['arguments'] }}"
    "{% else %}{{ function['arguments'] | tojson }}{% endif %}}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOL_SPECS = [{"type": "function", "function": {
    "name": "lookup", "description": "The secret number of a key.",
    "parameters": {"type": "object", "properties": {"key": {"type": "string"}},
                   "required": ["key"]}}}]
# Shape of the model: Qwen3, 0.49M parameters.
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0)
# The MoE variant: each MLP is 8 experts of width 128, 2 routed per token (0.89M parameters).
MOE_SHAPE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                 decoder_sparse_step=1, norm_topk_prob=True)
NUM_EVAL = 500


def build_tokenizer(tools: bool = False):
    """A word-level tokenizer over the task's symbols, with Qwen-style chat tokens; with
    `tools`, also the tool-use task's words and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = (*WORDS, *TOOL_WORDS) if tools else WORDS
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, "<unk>", *words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    longest_first = sorted(words, key=len, reverse=True)
    pattern = "|".join(re.escape(word) for word in longest_first) + "|."
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>",
                                   model_max_length=MODEL_SHAPE["max_position_embeddings"])
    fast.chat_template = TOOLS_CHAT_TEMPLATE if tools else CHAT_TEMPLATE
    return fast


def build_model(tokenizer, seed: int, moe: bool = False):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    shape = dict(MODEL_SHAPE)
    rope_theta = shape.pop("rope_theta")
    config_class, model_class = Qwen3Config, Qwen3ForCausalLM
    if moe:
        config_class, model_class = Qwen3MoeConfig, Qwen3MoeForCausalLM
        shape.update(MOE_SHAPE)
    config = config_class(vocab_size=len(tokenizer), tie_word_embeddings=True,
                          rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                          eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **shape)
    torch.manual_seed(seed)
    return model_class(config)


def addition_problems(seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """All two-digit pairs a+b, shuffled; the first NUM_EVAL are held out for eval."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    return pairs[NUM_EVAL:], pairs[:NUM_EVAL]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_task(data_dir: Path, seed: int) -> None:
    train, held_out = addition_problems(seed)
    prompt_rows = lambda pairs: [{"prompt": f"{a}+{b}=", "label": str(a + b)}  # noqa: E731
                                 for a, b in pairs]
    data_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(data_dir / "train.jsonl", prompt_rows(train))
    _write_jsonl(data_dir / "eval.jsonl", prompt_rows(held_out))
    _write_jsonl(data_dir / "sft.jsonl", [
        {"messages": [{"role": "user", "content": f"{a}+{b}="},
                      {"role": "assistant", "content": f"\\boxed{{{a + b}}}"}]}
        for a, b in train])


def secret(key: str) -> int:
    """The number `lookup(key)` returns: 100-999, a hash of the key (a pure function no
    tiny model can compute, so the answer needs the tool)."""
    digest = hashlib.blake2b(f"lookup/{key}".encode(), digest_size=8).digest()
    return 100 + int.from_bytes(digest, "little") % 900


def lookup_keys(seed: int) -> tuple[list[str], list[str]]:
    """The keys 1000-9999, shuffled; the first NUM_EVAL are held out for eval."""
    keys = [str(key) for key in range(1000, 10000)]
    random.Random(seed).shuffle(keys)
    return keys[NUM_EVAL:], keys[:NUM_EVAL]


def tool_conversation(key: str) -> list[dict]:
    """The right conversation for prompt `key`: call lookup, read the reply, answer it."""
    arguments = json.dumps({"key": key})
    return [{"role": "user", "content": key},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "lookup", "arguments": arguments}}]},
            {"role": "tool", "name": "lookup", "content": str(secret(key))},
            {"role": "assistant", "content": f"\\boxed{{{secret(key)}}}"}]


def write_tool_task(data_dir: Path, seed: int) -> None:
    train, held_out = lookup_keys(seed)
    prompt_rows = lambda keys: [{"prompt": key, "label": str(secret(key))}  # noqa: E731
                                for key in keys]
    data_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(data_dir / "train.jsonl", prompt_rows(train))
    _write_jsonl(data_dir / "eval.jsonl", prompt_rows(held_out))
    _write_jsonl(data_dir / "sft.jsonl", [{"messages": tool_conversation(key)} for key in train])


async def execute_tool(name: str, arguments: dict) -> str:
    """The task's tool (--generate-execute-tool-function-path furlong.tiny:execute_tool):
    `lookup(key)` -> the key's secret number; "error" for another tool or no key."""
    key = arguments.get("key") if isinstance(arguments, dict) else None
    if name != "lookup" or not isinstance(key, str):
        return "error"
    return str(secret(key))


def write_tiny(out_dir: str | Path, seed: int = 0, moe: bool = False,
               tools: bool = False) -> Path:
    """Write OUT_DIR/model and OUT_DIR/data (the tool-use task with `tools`); returns
    OUT_DIR."""
    out = Path(out_dir)
    tokenizer = build_tokenizer(tools)
    model = build_model(tokenizer, seed, moe)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    (write_tool_task if tools else write_task)(out / "data", seed)
    return out


def sharpened_state(model_dir: str | Path) -> dict:
    """The tiny model's weights with seeded noise on every matrix (4 x its std): a model
    whose next-token distributions are peaked, so engines' greedy choices can be compared."""
    import torch

    from furlong.model.loading import load_hf_model
    model = load_hf_model(str(model_dir))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.dim() > 1:
                param.add_(torch.randn(param.shape, generator=generator) * param.std() * 4)
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--moe", action="store_true", help="a Qwen3-MoE model (8 experts)")
    parser.add_argument("--tools", action="store_true",
                        help="the tool-use task (lookup a key's secret) instead of addition")
    args = parser.parse_args()
    out = write_tiny(args.out_dir, args.seed, args.moe, args.tools)
    print(f"wrote {out / 'model'} and {out / 'data'}/{{sft,train,eval}}.jsonl")


if __name__ == "__main__":
    main()
