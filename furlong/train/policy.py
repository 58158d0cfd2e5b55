"""The trained model: an HF causal LM plus chunked per-token log-probs and entropy.

`CausalLMPolicy.forward` takes a packed row of several samples and returns, for each
position whose next token is a response token, log p(next token) under logits / T and
the entropy of that distribution. The output projection runs in chunks, each under
activation checkpointing, so the float32 logits of a whole micro-batch never exist at
once (vocabularies of 150k tokens make them the largest tensor of the step).
Keeping the projection inside this module's forward also means a sharded root
(FSDP2) gathers the embedding/output weights around it.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from furlong.algo.losses import entropy_from_logits
from furlong.model.logits import compute_dtype, output_logits
from furlong.train.batch import PackedMicroBatch


def chunk_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    inv_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and entropy for one chunk. hidden (C, H), weight (V, H), targets (C,).

    z = (hidden @ weight.T) / T in float32; log p = z[target] - logsumexp(z);
    entropy = logsumexp(z) - sum(softmax(z) * z).
    """
    logits = output_logits(hidden, weight) * inv_temperature  # (C, V) float32
    log_probs = logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(dim=-1)
    return log_probs, entropy_from_logits(logits)


class CausalLMPolicy(nn.Module):
    """Wraps an HF `*ForCausalLM`; `hf_model` keeps HF parameter names for weight sync."""

    def __init__(self, hf_model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.hf_model = hf_model
        self.chunk_size = chunk_size

    def forward(self, micro: PackedMicroBatch,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropy at the micro-batch's target positions, (N,) each, float32."""
        decoder = self.hf_model.base_model
        hidden = decoder(input_ids=micro.input_ids, position_ids=micro.position_ids,
                         use_cache=False, cu_seq_lens_q=micro.cu_seq_lens,
                         cu_seq_lens_k=micro.cu_seq_lens, max_length_q=micro.max_length,
                         max_length_k=micro.max_length).last_hidden_state[0]  # (T, H)
        targets = micro.targets
        hidden = hidden[micro.target_positions]  # (N, H)
        weight = self.hf_model.get_output_embeddings().weight
        weight = weight.to(compute_dtype(hidden))  # once, not per chunk
        inv_temperature = 1.0 / temperature if temperature > 0 else 1.0
        pieces = []
        for start in range(0, hidden.shape[0], self.chunk_size):
            args = (hidden[start:start + self.chunk_size], weight,
                    targets[start:start + self.chunk_size], inv_temperature)
            if torch.is_grad_enabled():
                pieces.append(checkpoint(chunk_log_probs, *args, use_reentrant=False))
            else:
                pieces.append(chunk_log_probs(*args))
        if not pieces:
            empty = hidden.new_zeros(0, dtype=torch.float32)
            return empty, empty
        log_probs, entropy = zip(*pieces, strict=True)
        return torch.cat(log_probs), torch.cat(entropy)
