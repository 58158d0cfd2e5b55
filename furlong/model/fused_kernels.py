"""Fewer, larger kernels for a CUDA training model: compiled decoder layers, or Liger-Kernel.

HF's RMSNorm, SwiGLU MLP and rotary embedding are chains of elementwise kernels (a
float32 upcast, a power, a mean, a product, a downcast ...), each a pass over the
activations and a Python call; on a 1.7B model they took more GPU time in a training
step than the GEMMs, and the Python calls made the step CPU-bound. Two remedies:

- `compile_decoder_layers`: torch.compile each decoder layer (Inductor fuses the
  elementwise chains and the layer runs as one compiled call). Shapes are dynamic from
  the first call, so micro-batches of any length reuse one graph, and the layers share
  it (same code, parameters as inputs). Used on one GPU, where it measured fastest
  (bench/RESULTS.md); Liger's kernels inside a compiled layer fail to trace.
- `apply_fused_kernels`: Liger-Kernel (an optional dependency: `pip install
  furlong[gpu]`) replaces each chain with one Triton kernel forward and one backward,
  for the architectures it knows. Used by data-parallel GPU ranks (FSDP2 with compiled
  layers is not yet measured here). Its rotary and norm patches are made at the
  modeling-module level by Liger itself, so every model of that architecture built
  later in the process uses them too (the same math).

The output projection stays furlong's in both cases (model/log_prob_head.py).
"""
from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger("furlong")


def compile_decoder_layers(layers: nn.ModuleList) -> None:
    """torch.compile every layer in place (its parameter names do not change). Apply
    after activation checkpointing, which the compiled graph then contains."""
    for layer in layers:
        layer.compile(dynamic=True)


def apply_fused_kernels(hf_model: nn.Module) -> bool:
    """Patch a CUDA HF model in place with Liger-Kernel's kernels; False (and the model
    unchanged) when Liger-Kernel is not installed or does not know the architecture."""
    try:
        from liger_kernel.transformers import monkey_patch
    except ImportError:
        return False
    model_type = getattr(hf_model.config, "model_type", None)
    apply = monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        log.info("Liger-Kernel has no kernels for %s; the model runs unfused", model_type)
        return False
    apply(model=hf_model, rope=True, rms_norm=True, swiglu=True,
          fused_linear_cross_entropy=False)
    return True
