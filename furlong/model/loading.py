"""Loading HF causal LMs by path (a model directory or a furlong checkpoint), copying
weights into them by HF parameter name, and the token ids that end a response."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from furlong import checkpoint
from furlong.model import attention


def resolve_hf_dir(path: str) -> Path:
    """An HF directory, or the model inside a furlong checkpoint (`iter_N/` or its parent)."""
    root = Path(path)
    tracker = root / checkpoint.TRACKER
    if tracker.is_file():
        root = checkpoint.iteration_dir(root, int(tracker.read_text().strip()))
    if (root / "model" / "config.json").is_file():
        return root / "model"
    if (root / "config.json").is_file():
        return root
    raise FileNotFoundError(f"{path}: neither an HF model directory (config.json) nor a furlong "
                            "checkpoint (iter_NNNNNNN/ with latest_checkpointed_iteration.txt)")


def load_hf_model(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  packed: bool = False) -> nn.Module:
    """An HF causal LM; `packed` selects the attention for packed micro-batches (training)."""
    from transformers import AutoModelForCausalLM
    implementation = attention.register() if packed else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(
        resolve_hf_dir(path), dtype=dtype, attn_implementation=implementation)
    return model.to(device)


@torch.no_grad()
def load_named_tensors(model: torch.nn.Module,
                       named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Copy tensors into `model` by HF parameter name (casting dtype). Returns the count.

    A name the model does not have, or a tensor of another shape, is an error naming it
    (`copy_` would broadcast a smaller tensor silently); tied weights (lm_head sharing the
    embedding) are listed once by `named_parameters` on both sides.
    """
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    count = 0
    for name, tensor in named_tensors:
        if name not in params:
            raise KeyError(f"weight {name!r} is not a parameter of {type(model).__name__}")
        if tensor.shape != params[name].shape:
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, the model's is "
                             f"{tuple(params[name].shape)}")
        params[name].copy_(tensor.to(params[name].device), non_blocking=True)
        count += 1
    return count


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a response: config, generation config and tokenizer EOS."""
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None),
                  model.config.eos_token_id, tokenizer.eos_token_id):
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    return ids
