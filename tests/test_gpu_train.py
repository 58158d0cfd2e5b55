"""The trainer on the GPU: packed varlen flash attention against unpacked SDPA, in bf16."""
from __future__ import annotations

import pytest
import torch

from furlong.model.loading import load_hf_model
from furlong.train.batch import pack, split_tokens
from furlong.train.policy import CausalLMPolicy
from conftest import random_batch, reference_log_probs


@pytest.mark.gpu
def test_gpu_packed_log_probs_match_unpacked(tiny):
    packed_model = load_hf_model(str(tiny / "model"), torch.float32, "cuda", packed=True).eval()
    plain_model = load_hf_model(str(tiny / "model"), torch.float32, "cuda").eval()
    batch = random_batch(6, packed_model.config.vocab_size)
    micro = pack(batch, list(range(6)), "cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        log_probs, _ = CausalLMPolicy(packed_model)(micro, temperature=1.0)
        for i, values in enumerate(split_tokens(log_probs, micro)):
            expected = reference_log_probs(plain_model, batch.tokens[i].cuda(),
                                           batch.response_lengths[i], 1.0)
            assert (values - expected).abs().mean() < 0.02
