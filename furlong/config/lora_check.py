"""LORA_ARGS against the rest of the flags: what LoRA needs, and what this build does not
combine with it (each refusal names the flag and the fix).

The reference model under LoRA is the policy with its adapters disabled, so it is the
base, --hf-checkpoint, which the engines boot from too: a different --ref-load or a
reference that moves (--ref-update-interval) would need a second model. Every layout
of ranks trains adapters: tensor and sequence parallelism adapt the sliced layers,
context parallelism changes no parameter, pipeline stages hold their layers' adapters,
and expert parallelism splits experts, which take no adapters (model/lora.py). Every engine
takes the adapter, SGLang's included (started with its LoRA flags, config/sglang.py; the
trainer's pushes load it through SGLang's LoRA endpoints, engine/weights/lora_send.py);
only the trainer's push loads it, so a run without a trainer is refused.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from furlong.config.groups import Config
from furlong.config.parser import ConfigError
from furlong.model.lora_files import read_adapter_config


def check_lora(config: Config) -> list[str]:
    """Raise ConfigError for LoRA flags that cannot run; returns the warnings."""
    lora = config.lora
    if lora.lora_rank < 0:
        raise ConfigError(f"--lora-rank {lora.lora_rank}: give the adapters' rank (> 0), or 0 "
                          "to train all weights")
    if not lora.enabled:
        if lora.lora_adapter_path is not None:
            raise ConfigError(f"--lora-adapter-path {lora.lora_adapter_path} needs --lora-rank "
                              "> 0 (the adapter's r) and --target-modules")
        return []
    if lora.target_modules is None:
        raise ConfigError(f"--target-modules is required with --lora-rank {lora.lora_rank}: "
                          "give all-linear, or a comma list such as q_proj,v_proj")
    if not 0.0 <= lora.lora_dropout < 1.0:
        raise ConfigError(f"--lora-dropout {lora.lora_dropout}: give a probability in [0, 1)")
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(f"--lora-rank {lora.lora_rank} needs PEFT: pip install "
                          "'furlong[lora]' (or pip install peft)")
    _check_reference(config)
    _check_engines(config)
    if lora.lora_adapter_path is not None:
        _check_adapter(config)
    if config.given("lora.lora_type") and lora.lora_type == "lora":
        return ["--lora-type lora: Megatron's fused layout (one A shared by q, k and v, and "
                "by gate and up) is not reproduced; furlong adapts each projection "
                "(canonical_lora), and both write the same PEFT adapter"]
    return []


def _check_reference(config: Config) -> None:
    ckpt = config.ckpt
    if config.grpo.ref_update_interval:
        raise ConfigError(f"--ref-update-interval {config.grpo.ref_update_interval} with "
                          "--lora-rank: the reference is the base model (adapters disabled) "
                          "and does not move; drop --ref-update-interval")
    if ckpt.ref_load is not None and not _same_path(ckpt.ref_load, ckpt.hf_checkpoint):
        raise ConfigError(f"--ref-load {ckpt.ref_load} with --lora-rank: the reference is the "
                          f"base, --hf-checkpoint {ckpt.hf_checkpoint}; drop --ref-load (to "
                          "start from an adapter, give --lora-adapter-path)")


def _same_path(a: str, b: str | None) -> bool:
    return b is not None and Path(a).resolve() == Path(b).resolve()


def _check_engines(config: Config) -> None:
    """The engines get the adapter from the trainer's push (SGLang's servers too: IPC
    handles on the trainer's GPU, else PEFT files on a disk they read), so a run with no
    trainer would sample the base model."""
    if config.debug.debug_rollout_only:
        raise ConfigError("--debug-rollout-only with --lora-rank: the engines get the adapter "
                          "from the trainer's push, and this run has no trainer; drop one of "
                          "them")


def _check_adapter(config: Config) -> None:
    """--lora-adapter-path: PEFT's files, plain LoRA, of --lora-rank / --lora-alpha."""
    lora = config.lora
    try:
        adapter = read_adapter_config(lora.lora_adapter_path)
    except ValueError as error:
        raise ConfigError(f"--lora-adapter-path: {error}") from None
    if (adapter.get("r"), float(adapter.get("lora_alpha", 0))) != \
            (lora.lora_rank, float(lora.lora_alpha)):
        raise ConfigError(f"--lora-adapter-path {lora.lora_adapter_path} has r "
                          f"{adapter.get('r')} and lora_alpha {adapter.get('lora_alpha')}; "
                          f"--lora-rank {lora.lora_rank} --lora-alpha {lora.lora_alpha} must "
                          "match them")
