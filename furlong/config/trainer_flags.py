"""Miles' trainer-side switches, read with Miles' meaning where furlong can act on them.

--gradient-checkpointing (Miles' FSDP backend: every decoder layer recomputed in the
backward) becomes Megatron's spelling of the same thing, --recompute-granularity full
--recompute-method uniform, unless recompute flags say otherwise. The flags below act
only in part here, and each warns once, given, saying what runs instead:
--seq-length, --recompute-num-layers outside --recompute-method block, --bf16 on a
machine without CUDA, --attn-implementation other than flash_attention_2,
--overlap-cpu-optimizer-d2h-h2d without --optimizer-cpu-offload (no copies to overlap).
(--deterministic-mode and --train-env-vars act in train/process_env.py.)
"""
from __future__ import annotations

from furlong.config.groups import Config, PerfArgs
from furlong.config.parser import ConfigError

DEFAULT_ATTENTION = "flash_attention_2"


def resolve_trainer_flags(config: Config) -> tuple[Config, list[str]]:
    """The config with --gradient-checkpointing's recompute flags derived; the warnings."""
    p = config.perf
    if p.recompute_num_layers is not None and p.recompute_num_layers < 1:
        raise ConfigError(f"--recompute-num-layers {p.recompute_num_layers}: must be >= 1")
    if p.gradient_checkpointing and p.recompute_granularity is None:
        derived = {"recompute_granularity": "full"}
        if p.recompute_method is None:
            derived["recompute_method"] = "uniform"
        config = config.replace("perf", "derived", **derived)
    return config, _warnings(config)


def _warnings(config: Config) -> list[str]:
    p = config.perf
    warnings = []
    if config.given("model.seq_length"):
        warnings.append(
            f"--seq-length {config.model.seq_length} is no limit in furlong: the trainer packs "
            "micro-batches by --max-tokens-per-gpu (or --micro-batch-size) and takes each "
            "sample's length from its rollout (as Miles runs Megatron, with variable sequence "
            "lengths); ignored")
    if config.given("perf.recompute_num_layers"):
        warnings += _recompute_num_layers_warning(p)
    if config.given("perf.bf16") and p.bf16 and not _has_cuda():
        warnings.append("--bf16: this machine has no CUDA device, so the trainer runs in "
                        "float32 (on GPUs furlong trains in bfloat16 on float32 master "
                        "weights, with or without --bf16)")
    if p.attn_implementation != DEFAULT_ATTENTION:
        warnings.append(
            f"--attn-implementation {p.attn_implementation} is not used: the trainer's "
            "attention is furlong's packed varlen kernel (flash attention on GPUs, SDPA on "
            "the CPU), which computes the same causal attention per sample")
    optimizer = config.optimizer
    if optimizer.overlap_cpu_optimizer_d2h_h2d and not optimizer.optimizer_cpu_offload:
        warnings.append("--overlap-cpu-optimizer-d2h-h2d overlaps the copies of the CPU "
                        "optimizer, and without --optimizer-cpu-offload the optimizer steps "
                        "on the device: nothing to overlap; ignored")
    return warnings


def _recompute_num_layers_warning(p: PerfArgs) -> list[str]:
    """Block recomputes the first N layers (acts); uniform with N > 1 groups N layers per
    recomputed unit in Megatron, which furlong does not: each layer is its own unit."""
    n = p.recompute_num_layers
    if p.recompute_granularity != "full":
        return [f"--recompute-num-layers {n} applies to --recompute-granularity full only "
                "(Megatron ignores it otherwise); ignored"]
    if p.recompute_method == "block" or n == 1:
        return []
    method = p.recompute_method or "uniform (the default here)"
    return [f"--recompute-num-layers {n} under --recompute-method {method}: furlong recomputes "
            "each decoder layer as its own unit (FSDP's per-layer gathers stay outside the "
            f"recomputation), keeping one input per layer rather than one per {n} layers; "
            "the gradients are the same, the activation memory somewhat larger"]


def _has_cuda() -> bool:
    import torch  # here, not at import: parsing flags does not load torch
    return torch.cuda.is_available()
