"""LoRA adapters on an HF model (--lora-rank > 0), through PEFT: the one PEFT importer.

An adapter adds `scaling * B @ A` to a frozen linear layer's weight, A (r, in) and
B (out, r), scaling = alpha / r; B starts at zero, so a fresh adapter leaves the model's
outputs exactly as they were. PEFT's `inject_adapter_in_model` wraps the targeted
`nn.Linear` modules in place: the HF class and its other parameter names stay, the
targeted layer's weight becomes `<module>.base_layer.weight` and the adapter's
`<module>.lora_A.default.weight` / `<module>.lora_B.default.weight`.

Names outside the model (checkpoints, engines) are PEFT's and SGLang's, without the
adapter name: `model.layers.0.self_attn.q_proj.lora_A.weight`.

Targets (`resolve_targets`, Miles' vocabulary of --target-modules): "all-linear" (q, k, v,
o, gate, up, down; the MLA projections when the HF config has kv_lora_rank /
q_lora_rank), HF leaf names, Megatron names (linear_qkv, linear_proj, linear_fc1,
linear_fc2 and the canonical ones), or paths with `*` wildcards.
"""
from __future__ import annotations

import contextlib
import fnmatch
import re
from dataclasses import dataclass, replace
from typing import Iterable, Iterator

import torch
from torch import nn

from furlong.model.moe import is_moe

ADAPTER_NAME = "furlong_lora"  # the engines' name for the run's adapter (SGLang lora_path)
PEFT_ADAPTER = "default"  # PEFT's adapter inside the trained model

STANDARD_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                    "down_proj")
MLA_KV_TARGETS = ("kv_a_proj_with_mqa", "kv_b_proj")  # with kv_lora_rank
MLA_Q_TARGETS = ("q_a_proj", "q_b_proj")  # with q_lora_rank too
ALL_LINEAR = ("all", "all-linear", "all_linear")
MEGATRON_NAMES = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",),
    "linear_q": ("q_proj",), "linear_k": ("k_proj",), "linear_v": ("v_proj",),
    "linear_fc1_gate": ("gate_proj",), "linear_fc1_up": ("up_proj",),
    "linear_q_down_proj": ("q_a_proj",), "linear_q_up_proj": ("q_b_proj",),
    "linear_kv_down_proj": ("kv_a_proj_with_mqa",), "linear_kv_up_proj": ("kv_b_proj",),
}


@dataclass(frozen=True)
class LoraSpec:
    """One adapter's shape: rank, alpha, dropout, and which modules it adapts (HF leaf
    names or `*` paths; `excludes` the same, taken out)."""
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = STANDARD_TARGETS
    excludes: tuple[str, ...] = ()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def target_leaves(self) -> tuple[str, ...]:
        """The HF leaf names the targets adapt (what SGLang's --lora-target-modules and
        an engine's adapter config list): a path's last segment, a `*` leaf matched
        against the standard projections (`resolved` names the exact ones)."""
        leaves: list[str] = []
        for target in self.targets:
            leaf = target.rsplit(".", 1)[-1]
            for name in fnmatch.filter(STANDARD_TARGETS, leaf) if "*" in leaf else (leaf,):
                if name not in leaves and name not in self.excludes:
                    leaves.append(name)
        return tuple(leaves)

    @property
    def has_wildcards(self) -> bool:
        return any("*" in entry for entry in self.targets + self.excludes)

    def peft_config(self):
        """PEFT's LoraConfig (PEFT matches the targets as name suffixes; a spec with `*`
        paths is `resolved` to full module names first)."""
        from peft import LoraConfig
        assert not self.has_wildcards, "resolve `*` paths first (LoraSpec.resolved)"
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.targets),
                          exclude_modules=list(self.excludes) or None,
                          bias="none", task_type="CAUSAL_LM")

    def resolved(self, hf_model: nn.Module) -> "LoraSpec":
        """This spec with its targets replaced by the full names of the linear layers
        they match in `hf_model` when it has `*` paths, or when the model has MoE
        experts (PEFT would also adapt the fused experts by their leaf names, which no
        engine serves: MoE models get adapters on their linear layers only); itself
        otherwise."""
        if not (self.has_wildcards or is_moe(hf_model)):
            return self
        return replace(self, targets=tuple(matched_modules(hf_model, self)), excludes=())

    def sglang_config(self) -> dict:
        """The adapter config an engine receives with the tensors (SGLang's
        `config_dict`, PEFT's adapter_config.json keys)."""
        return {"peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha,
                "target_modules": list(self.target_leaves()), "lora_dropout": self.dropout,
                "bias": "none", "task_type": "CAUSAL_LM"}

    def matches(self, module_name: str) -> bool:
        """Whether the module of that full name is adapted: a target matches it (a leaf
        as its last segments, a `*` path as the whole name) and no exclude does."""
        return _any_match(self.targets, module_name) \
            and not _any_match(self.excludes, module_name)


def _any_match(entries: tuple[str, ...], module_name: str) -> bool:
    for entry in entries:
        if "*" in entry:
            if re.fullmatch(".*".join(re.escape(p) for p in entry.split("*")), module_name):
                return True
        elif module_name == entry or module_name.endswith("." + entry):
            return True
    return False


def _split(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def resolve_targets(target_modules: str, exclude_modules: str | None,
                    model_config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(targets, excludes) of --target-modules / --exclude-modules, as Miles reads them:
    "all-linear" expands (MLA projections by `model_config`), Megatron names become HF
    leaves, comma lists split; an excluded entry leaves the targets (and, being a leaf
    or a `*` path, also goes to PEFT, which keeps it out of any pattern)."""
    entries = _split(target_modules)
    if len(entries) == 1 and entries[0] in ALL_LINEAR:
        entries = list(STANDARD_TARGETS)
        if getattr(model_config, "kv_lora_rank", None):
            entries += MLA_KV_TARGETS
            if getattr(model_config, "q_lora_rank", None):
                entries += MLA_Q_TARGETS
    excludes = _unique(_hf_names(_split(exclude_modules)))
    targets = tuple(t for t in _unique(_hf_names(entries)) if t not in excludes)
    return targets, excludes


def _hf_names(entries: Iterable[str]) -> list[str]:
    return [name for entry in entries for name in MEGATRON_NAMES.get(entry, (entry,))]


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


# ---- the adapter inside a model --------------------------------------------------------
def matched_modules(hf_model: nn.Module, spec: LoraSpec) -> list[str]:
    """Full names of the linear layers of `hf_model` that `spec` adapts; a ValueError
    naming --target-modules lists the model's linear layers when there are none."""
    names = [name for name, module in hf_model.named_modules()
             if isinstance(module, nn.Linear) and spec.matches(name)]
    if not names:
        leaves = sorted({name.rsplit(".", 1)[-1] for name, module in
                         hf_model.named_modules() if isinstance(module, nn.Linear)})
        raise ValueError(f"--target-modules {','.join(spec.targets)} (less --exclude-modules "
                         f"{','.join(spec.excludes) or 'none'}) matches no linear layer of the "
                         f"model; its linear layers are {', '.join(leaves)}")
    return names


def attach(hf_model: nn.Module, spec: LoraSpec, seed: int) -> LoraSpec:
    """Wrap `spec`'s targets of `hf_model` in LoRA layers, in place: the base frozen, the
    adapters float32 and trainable, A drawn from `seed` (the same on every rank, so
    tensor-parallel ranks that hold A whole agree). Returns the spec `resolved`."""
    from peft import inject_adapter_in_model
    matched_modules(hf_model, spec)  # refuses targets that match nothing
    spec = spec.resolved(hf_model)
    config = spec.peft_config()
    devices = sorted({p.device.index or 0 for p in hf_model.parameters()
                      if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, hf_model, adapter_name=PEFT_ADAPTER)
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if is_adapter_name(name):
                param.data = param.data.float()
    return spec


def is_adapter_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def has_adapters(hf_model: nn.Module) -> bool:
    return any(is_adapter_name(name) for name, _ in hf_model.named_parameters())


def base_tensors(hf_model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model inside an adapted `hf_model`: every parameter and buffer outside the
    adapters under its plain HF name (`X.base_layer.weight` -> `X.weight`; tied names
    each listed), the objects themselves, not copies."""
    named = [*hf_model.named_parameters(remove_duplicate=False),
             *hf_model.named_buffers(remove_duplicate=False)]
    return {name.replace(".base_layer.", "."): tensor for name, tensor in named
            if not is_adapter_name(name)}


def _tuner_layers(hf_model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [module for module in hf_model.modules() if isinstance(module, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(hf_model: nn.Module):
    """Inside the block `hf_model` computes as its base model (the LoRA branches skipped);
    which parameters require gradients does not change."""
    layers = _tuner_layers(hf_model)
    flags = [(param, param.requires_grad) for param in hf_model.parameters()]
    for layer in layers:
        layer.enable_adapters(False)  # PEFT also freezes the adapters: put flags back
    for param, requires_grad in flags:
        param.requires_grad_(requires_grad)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)


def peft_name(name: str) -> str:
    """A model parameter's adapter name outside the model:
    `...q_proj.lora_A.default.weight` -> `...q_proj.lora_A.weight`."""
    return name.replace(f".{PEFT_ADAPTER}.", ".")


def adapter_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]]
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """The adapter entries of (model parameter name, tensor) pairs, under PEFT's names."""
    return ((peft_name(name), tensor) for name, tensor in named_tensors
            if is_adapter_name(name))


@torch.no_grad()
def load_adapter_tensors(hf_model: nn.Module, named: dict[str, torch.Tensor],
                         source: str) -> int:
    """Copy an adapter (PEFT names, `adapter_tensors`'s) into `hf_model`'s adapter
    parameters; every parameter must be given and every tensor used, with its shape
    (else a ValueError naming `source`). Returns how many were copied."""
    params = {peft_name(name): param for name, param in hf_model.named_parameters()
              if is_adapter_name(name)}
    missing, unused = sorted(set(params) - set(named)), sorted(set(named) - set(params))
    if missing or unused:
        raise ValueError(f"{source}: the adapter does not fit this model's LoRA layers "
                         f"(--target-modules): missing {missing[:4]}, unused {unused[:4]}")
    for name, param in params.items():
        if named[name].shape != param.shape:
            raise ValueError(f"{source}: {name} is {tuple(named[name].shape)}, this model's "
                             f"{tuple(param.shape)}: check --lora-rank")
        param.copy_(named[name])
    return len(params)


def merged(base: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
           scaling: float) -> torch.Tensor:
    """W + scaling * B @ A, computed in float32, in `base`'s dtype. base (out, in),
    lora_A (r, in), lora_B (out, r)."""
    delta = lora_B.float() @ lora_A.float()  # (out, in)
    return (base.float() + scaling * delta).to(base.dtype)


def merged_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """An adapted model's state dict as a plain HF one, each adapter merged into its base:
    `X.base_layer.weight` with `X.lora_A.default.weight` and `X.lora_B.default.weight`
    become `X.weight` (`merged`), `X.base_layer.bias` becomes `X.bias`."""
    plain: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if is_adapter_name(name):
            continue
        module, found, leaf = name.partition(".base_layer.")
        if found and leaf == "weight":
            tensor = merged(tensor, state[f"{module}.lora_A.{PEFT_ADAPTER}.weight"],
                            state[f"{module}.lora_B.{PEFT_ADAPTER}.weight"], scaling)
        plain[f"{module}.{leaf}" if found else name] = tensor
    return plain
