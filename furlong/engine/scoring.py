"""Scoring a sequence: the log-prob of each token given the ones before it, what SGLang
returns as `input_token_logprobs` (with `logprob_start_len`), and what a teacher server
gives on-policy distillation. One forward of the HF decoder; the output projection runs
in chunks of positions, in float32 (model/logits.py), so no (length, vocabulary) logits
are ever whole. The logits are not divided by a temperature, as SGLang's are not."""
from __future__ import annotations

import torch

from furlong.model.logits import output_logits

CHUNK_POSITIONS = 256  # (256, 152k) float32 logits: 150 MB, twice that with logsumexp's


@torch.no_grad()
def token_log_probs(model, input_ids: list[int]) -> list[float]:
    """log p(input_ids[i] | input_ids[:i]) for i = 1 .. len - 1, under HF causal LM `model`
    (no KV cache kept)."""
    if len(input_ids) < 2:
        return []
    weight = model.get_output_embeddings().weight
    ids = torch.tensor([input_ids], device=weight.device)
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
    targets = ids[0, 1:]
    weight = weight.to(hidden.dtype)
    scores = []
    for start in range(0, len(targets), CHUNK_POSITIONS):
        end = start + CHUNK_POSITIONS
        logits = output_logits(hidden[start:end], weight)
        scores.append(logits.gather(1, targets[start:end, None])[:, 0] - logits.logsumexp(-1))
    return torch.cat(scores).tolist()
