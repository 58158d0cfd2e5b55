"""A LoRA adapter on disk, in PEFT's format: what `PeftModel.from_pretrained` loads and
SGLang's `--lora-paths` serves.

    adapter_config.json          PEFT's LoraConfig (peft_type LORA, r, lora_alpha,
                                 target_modules, base_model_name_or_path, ...)
    adapter_model.safetensors    `base_model.model.<module>.lora_A.weight` (r, in) and
                                 `...lora_B.weight` (out, r) per adapted module

Only plain LoRA is read: DoRA, rsLoRA, per-module ranks or alphas, biases and
`modules_to_save` change what the adapter computes, and are refused naming the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # config/lora_check.py reads adapter configs without importing torch
    import torch

    from furlong.model.lora import LoraSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel's prefix of the HF model's names


def save_adapter(directory: str | Path, named_tensors: Iterable[tuple[str, torch.Tensor]],
                 spec: LoraSpec, base_path: str) -> None:
    """Write an adapter: `named_tensors` under PEFT's names (`lora.adapter_tensors`),
    saved as given (float32 masters stay float32)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = spec.peft_config()
    config.base_model_name_or_path = base_path
    config.save_pretrained(str(directory))
    _save_tensors(directory, named_tensors)


def write_adapter(directory: str | Path, config: dict,
                  named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Write an adapter an engine loads (/load_lora_adapter): `config` is the adapter
    config the engines receive (`LoraSpec.sglang_config`, adapter_config.json's keys),
    written as it is; the tensors as `save_adapter` writes them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    _save_tensors(directory, named_tensors)


def _save_tensors(directory: Path, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    from safetensors.torch import save_file
    tensors = {PEFT_PREFIX + name: tensor.detach().cpu().contiguous()
               for name, tensor in named_tensors}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


def read_adapter_config(directory: str | Path) -> dict:
    """adapter_config.json of an adapter directory; a ValueError naming it for a missing
    file or an adapter furlong does not compute as PEFT would."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{directory}: no {CONFIG_FILE}; a LoRA adapter directory holds "
                         f"{CONFIG_FILE} and {WEIGHTS_FILE} (PEFT's save_pretrained)")
    config = json.loads(path.read_text())
    check_adapter_config(config, str(path))
    return config


def check_adapter_config(config: dict, source: str) -> None:
    """A ValueError naming `source` unless `config` (adapter_config.json, or an engine's
    SGLang `config_dict`) is plain LoRA, which furlong trains and serves."""
    refused = {"peft_type": config.get("peft_type", "LORA") != "LORA",
               "use_dora": bool(config.get("use_dora")),
               "use_rslora": bool(config.get("use_rslora")),
               "rank_pattern": bool(config.get("rank_pattern")),
               "alpha_pattern": bool(config.get("alpha_pattern")),
               "modules_to_save": bool(config.get("modules_to_save")),
               "bias": config.get("bias", "none") not in (None, "none")}
    wrong = [key for key, bad in refused.items() if bad]
    if wrong:
        raise ValueError(f"{source}: {', '.join(f'{k}={config.get(k)!r}' for k in wrong)}: "
                         "furlong trains and serves plain LoRA only (peft_type LORA, no DoRA, "
                         "rsLoRA, per-module ranks, biases or modules_to_save)")


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors by PEFT's name without `base_model.model.`)."""
    from safetensors.torch import load_file
    config = read_adapter_config(directory)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"{directory}: no {WEIGHTS_FILE} beside {CONFIG_FILE}")
    tensors = load_file(str(path))
    return config, {name.removeprefix(PEFT_PREFIX): tensor for name, tensor in tensors.items()}
