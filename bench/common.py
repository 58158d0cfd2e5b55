"""Shared pieces of the GPU benchmarks: model shapes, a synthetic tokenizer, ceilings.

Models are random-init (no hub on the GPU machine): the architectures of Qwen3-0.6B,
Qwen3-1.7B and Qwen3-4B with their published shapes, and Qwen3-30B-A3B's layer with
fewer layers (48 in the release) so that it fits one GPU. Timings are independent of the weights'
values except where EOS would stop a sequence, and benchmarks ignore EOS.
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import torch

QWEN3_SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     tie_word_embeddings=False),
    # bench scripts' --cpu-check: the same code paths in seconds on a CPU
    "qwen3-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}
VOCAB = 151936
QWEN3_MOE_SHAPES = {
    "qwen3-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                          norm_topk_prob=True, tie_word_embeddings=False),
    "qwen3-moe-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                           norm_topk_prob=True, tie_word_embeddings=True),
}


def qwen3_config(name: str):
    from transformers import Qwen3Config
    shape = {"tie_word_embeddings": True, **QWEN3_SHAPES[name]}
    return Qwen3Config(vocab_size=VOCAB, max_position_embeddings=40960, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                       eos_token_id=VOCAB - 1, pad_token_id=0, bos_token_id=None, **shape)


def qwen3_model(name: str, dtype=torch.bfloat16, device="cuda", seed: int = 0):
    """Random-init float32 weights cast to `dtype` (the figures so far were taken on these)."""
    from transformers import Qwen3ForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(qwen3_config(name))
    return model.to(dtype).eval()


def qwen3_model_direct(name: str, dtype=torch.bfloat16, device="cuda", seed: int = 0):
    """Random-init, built directly in `dtype` (an 8B model is 16 GB in bf16, 32 in float32)."""
    from transformers import Qwen3ForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM._from_config(qwen3_config(name), dtype=dtype)
    return model.eval()


def qwen3_moe_model(name: str, num_layers: int | None = None, dtype=torch.bfloat16,
                    device="cuda", seed: int = 0):
    """Random-init Qwen3-MoE of `name`'s layer shape, `num_layers` layers (default: all),
    built directly in `dtype` (30B-A3B's 8 layers are 11 GB in bf16)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    shape = dict(QWEN3_MOE_SHAPES[name])
    if num_layers is not None:
        shape["num_hidden_layers"] = num_layers
    config = Qwen3MoeConfig(vocab_size=VOCAB, max_position_embeddings=40960, rms_norm_eps=1e-6,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                            eos_token_id=VOCAB - 1, pad_token_id=0, bos_token_id=None, **shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3MoeForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def save_model_dir(model, directory: Path, tokenizer) -> Path:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def synthetic_tokenizer(vocab_size: int = VOCAB):
    """A word-level tokenizer with `vocab_size` tokens "t0", "t1", ... (EOS is the last)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=f"t{vocab_size - 1}",
                                   pad_token="t0", unk_token="t0")


def write_prompts(path: Path, count: int, length: int, seed: int = 0) -> Path:
    """`count` prompts of `length` words of the synthetic tokenizer, JSONL key "prompt"."""
    rng = random.Random(seed)
    path.write_text("".join(
        json.dumps({"prompt": " ".join(f"t{rng.randrange(1, 150000)}" for _ in range(length))})
        + "\n" for _ in range(count)))
    return path


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_token(config, itemsize: int = 2) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize


def copy_bandwidth(num_bytes: int = 4 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    source = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    target = torch.empty_like(source)
    target.copy_(source)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    del source, target
    torch.cuda.empty_cache()
    return 2 * (num_bytes // 2) * 2 / seconds


def matmul_flops(size: int = 8192, repeats: int = 20) -> float:
    """bf16 GEMM rate in FLOP/s on random data."""
    a = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def device_name() -> str:
    return torch.cuda.get_device_name(0)


def write_results(name: str, results: dict) -> Path:
    out = Path(os.environ.get("OUT", "bench-out"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    return path
