"""Loading HF causal LMs by path (a model directory or a furlong checkpoint), weights by
name both ways (copied in by parameter or checkpoint name; renamed to the checkpoint's
names for a push), and the token ids that end a response."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator

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


def hf_model_over(path: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The HF causal LM of `path`'s config computing with `tensors` (HF name -> parameter
    or buffer, `lora.base_tensors`'s): the very objects, so the model allocates and reads
    nothing and a change of a parameter's `.data` is seen by both holders. A name the
    model has and `tensors` lacks is a ValueError naming it."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    directory = resolve_hf_dir(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory),
                                                 attn_implementation="sdpa")
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    named = [*model.named_parameters(remove_duplicate=False),
             *model.named_buffers(remove_duplicate=False)]
    unfit = [name for name, meta in named
             if name not in tensors or tensors[name].shape != meta.shape]
    if unfit:
        raise ValueError(f"{directory}: the given weights lack {unfit[:4]} or have other "
                         "shapes; they are not this model's")
    for name, _ in named:
        module_path, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_path)
        slots = module._parameters if leaf in module._parameters else module._buffers
        slots[leaf] = tensors[name]
    return model.eval()


@torch.no_grad()
def load_named_tensors(model: torch.nn.Module,
                       named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Copy tensors into `model` by HF parameter name, or by the checkpoint's per-expert
    name of a slice of a fused expert parameter (`checkpoint_named_tensors`), casting
    dtype. Returns the count.

    A name the model does not have, or a tensor of another shape, is an error naming it
    (`copy_` would broadcast a smaller tensor silently); tied weights (lm_head sharing the
    embedding) are listed once by `named_parameters` on both sides.
    """
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    count = 0
    with torch.no_grad():
        for name, tensor in named_tensors:
            target = params.get(name)
            if target is None:
                target = _expert_slice(params, name)
            if target is None:
                raise KeyError(f"weight {name!r} is not a parameter of {type(model).__name__}")
            if tensor.shape != target.shape:
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, the "
                                 f"model's is {tuple(target.shape)}")
            target.copy_(tensor.to(target.device), non_blocking=True)
            count += 1
    return count


# A checkpoint's name of one expert's projection, in the Qwen-MoE / DeepSeek layout.
_EXPERT_NAME = re.compile(
    r"(?P<experts>.+\.mlp\.experts)\.(?P<index>\d+)\.(?P<projection>gate|up|down)_proj\.weight")


def _expert_slice(params: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """The part of a fused expert parameter that per-expert `name` stands for (a view);
    None when `name` is not one. gate_up_proj (E, 2I, H) holds [gate | up] along dim 1,
    down_proj is (E, H, I)."""
    match = _EXPERT_NAME.fullmatch(name)
    if match is None or f"{match['experts']}.gate_up_proj" not in params:
        return None
    index = int(match["index"])
    if match["projection"] == "down":
        return params[f"{match['experts']}.down_proj"][index]
    gate_up = params[f"{match['experts']}.gate_up_proj"][index]
    half = gate_up.shape[0] // 2
    return gate_up[:half] if match["projection"] == "gate" else gate_up[half:]


def checkpoint_named_tensors(model: torch.nn.Module,
                             named_tensors: Iterable[tuple[str, torch.Tensor]]
                             ) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors under the names of the model's checkpoint files, one at a time, as
    SGLang loads them. transformers >= 5 fuses some checkpoint tensors into one parameter
    (an MoE layer's experts into gate_up_proj and down_proj); its own reverse conversion
    (what `save_pretrained` writes) splits each again. Other names pass unchanged."""
    from transformers.core_model_loading import revert_weight_conversion
    for name, tensor in named_tensors:
        for checkpoint_name, part in revert_weight_conversion(model, {name: tensor}).items():
            yield checkpoint_name, part.contiguous()


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a response: config, generation config and tokenizer EOS."""
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None),
                  model.config.eos_token_id, tokenizer.eos_token_id):
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    return ids
