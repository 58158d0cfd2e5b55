"""Which engine runs, and with what settings: `--rollout-backend` and the SGLang-style flags.

auto: the fast engine on a GPU for the dense families it supports (Qwen2, Qwen3,
Llama), the HF engine otherwise. The fast engine's KV cache takes
`--sglang-mem-fraction-static` of the GPU (default 0.85 alone; 0.3 when the trainer
shares the device in this process, leaving room for its optimizer and activations).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from furlong.config.groups import Config
from furlong.engine.base import Engine
from furlong.engine.fast import FastEngine, supports
from furlong.engine.hf_engine import HFEngine
from furlong.train.policy import load_hf_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    backend: str = "auto"                    # auto | hf | fast
    max_context_len: int | None = None
    mem_fraction_static: float | None = None
    max_num_seqs: int = 256
    seed: int = 0
    cuda_graphs: bool = True


def engine_options(config: Config, shares_device: bool) -> EngineOptions:
    """EngineOptions from the flags of a training run."""
    r, sglang = config.rollout, config.sglang
    fraction = sglang.passthrough_value("mem-fraction-static")
    context = r.rollout_max_context_len or sglang.passthrough_value("context-length")
    in_flight = r.over_sampling_batch_size * r.n_samples_per_prompt
    return EngineOptions(
        backend=r.rollout_backend,
        max_context_len=int(context) if context else None,
        mem_fraction_static=float(fraction) if fraction else (0.3 if shares_device else 0.85),
        max_num_seqs=max(64, min(1024, in_flight)), seed=r.rollout_seed)


def create_engine(model_path: str, tokenizer, device: torch.device, dtype: torch.dtype,
                  options: EngineOptions) -> Engine:
    model = load_hf_model(model_path, dtype, device)
    fast = options.backend == "fast" or (options.backend == "auto" and device.type == "cuda"
                                         and supports(model.config))
    if options.backend not in ("auto", "hf", "fast"):
        raise ValueError(f"--rollout-backend {options.backend} is not available in this build; "
                         "use auto, fast or hf")
    if fast:
        log.info("rollout engine: fast (%s, KV cache %.0f%% of the GPU)", device,
                 100 * (options.mem_fraction_static or 0.85))
        return FastEngine(model, tokenizer, max_context_len=options.max_context_len,
                          mem_fraction_static=options.mem_fraction_static or 0.85,
                          max_num_seqs=options.max_num_seqs, default_seed=options.seed,
                          cuda_graphs=options.cuda_graphs)
    log.info("rollout engine: hf (%s)", device)
    return HFEngine(model, tokenizer, options.max_context_len, default_seed=options.seed)
