"""The adapter a TrainActor trains under --lora-rank: where it starts and how it joins
the frozen base (model/lora.py does the PEFT work, model/lora_files.py the files).

The base is always --hf-checkpoint (the engines boot from it, and with its adapters
disabled the policy is the KL reference). The adapter starts from, in order: the
`adapter/` of the checkpoint being resumed (its iteration directory is the actor's
`init_weights`), --lora-adapter-path, or fresh (A random from the trainer's seed, B = 0,
so the first policy is exactly the base).
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from furlong.config.groups import LoraArgs
from furlong.model import lora
from furlong.model.lora_files import read_adapter

ADAPTER_DIR = "adapter"  # in a checkpoint's iter_X/


def adapter_source(init_weights: str, args: LoraArgs) -> str | None:
    """The adapter directory to start from (None: a fresh adapter). `init_weights` is what
    the run would start a full fine-tune from: a checkpoint's iteration directory when it
    resumes one."""
    saved = Path(init_weights) / ADAPTER_DIR
    if saved.is_dir():
        return str(saved)
    if (Path(init_weights) / "model" / "config.json").is_file():
        raise ValueError(f"{init_weights} holds a checkpoint of all weights (model/), not an "
                         "adapter (adapter/): it was saved without --lora-rank; resume it "
                         "without --lora-rank, or start from its model/ with --hf-checkpoint")
    return args.lora_adapter_path


def attach_adapter(hf_model: nn.Module, args: LoraArgs, seed: int,
                   source: str | None) -> lora.LoraSpec:
    """Put the flags' adapter on `hf_model` (the base, whole: before any parallelism) and
    load it from `source` when given; returns its spec."""
    targets, excludes = lora.resolve_targets(args.target_modules, args.exclude_modules,
                                             hf_model.config)
    spec = lora.LoraSpec(args.lora_rank, args.lora_alpha, args.lora_dropout, targets,
                         excludes)
    spec = lora.attach(hf_model, spec, seed)
    if source is not None:
        _, tensors = read_adapter(source)
        lora.load_adapter_tensors(hf_model, tensors, source)
    return spec
