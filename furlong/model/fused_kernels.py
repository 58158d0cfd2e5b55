"""Liger-Kernel's fused RMSNorm, SwiGLU and rotary kernels on a GPU training model.

HF's RMSNorm, SwiGLU MLP and rotary embedding are chains of elementwise kernels (a
float32 upcast, a power, a mean, a product, a downcast ...), each a pass over the
activations; on a 1.7B model they take more GPU time in a training step than the
GEMMs. Liger-Kernel (an optional dependency: `pip install furlong[gpu]`) replaces each
with one Triton kernel forward and one backward, for the architectures it knows. Its
rotary and norm patches are made at the modeling-module level by Liger itself, so every
model of that architecture built later in the process uses them too (the same math).
The output projection stays furlong's (model/log_prob_head.py).
"""
from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger("furlong")


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
