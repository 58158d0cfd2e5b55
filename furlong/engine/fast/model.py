"""FastDecoder: the forward pass of Qwen2/Qwen3/Llama and Qwen3-MoE models over flat
token batches.

It computes with the HF model's own parameters, so they keep their HF names and weight
sync is by name, but runs its own fused layer: one GEMM for q/k/v and one for
gate/up (the HF parameters become views into the fused weights), add+RMSNorm,
q/k-norm + rotary + KV-cache store in one kernel, SiLU-mul, and the runner's
attention. Ten kernels a layer instead of HF's fifty, with HF's rounding order.
A layer whose mlp is a routed-experts block runs `moe.SparseMoE` instead (router,
top-k, fused-MoE kernels) and writes the experts it chose into the `routes` buffer at
each token's cache slot. LoRA adapters (`self.lora`, lora.py's LoraAdapters) add their
terms un-merged after the q/k/v, o, gate/up and down GEMMs, for the tokens a `lora_mask`
gives an adapter (attention projections only on MoE layers).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from furlong.engine.fast.fused import add_rms_norm, qk_norm_rope_store, silu_mul
from furlong.engine.fast.lora import LoraAdapters, LoraGroup, LoraMask
from furlong.engine.fast.moe import SparseMoE
from furlong.model.logits import output_logits
from furlong.model.moe import is_moe_block

SUPPORTED_FAMILIES = ("qwen2", "qwen3", "llama", "qwen3_moe")


def supports(config) -> bool:
    """These families with full attention only (others run on the HF engine)."""
    sliding = getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window",
                                                                        None)
    return (config.model_type in SUPPORTED_FAMILIES and not sliding
            and getattr(config, "hidden_act", "silu") == "silu")


def fuse_parameters(parameters: list[nn.Parameter]) -> torch.Tensor:
    """Concatenate parameters along dim 0 and make each a view of the result."""
    fused = torch.cat([p.data for p in parameters], dim=0)
    offset = 0
    for param in parameters:
        param.data = fused[offset:offset + param.shape[0]]
        offset += param.shape[0]
    return fused


class FastDecoder(nn.Module):
    def __init__(self, hf_model: nn.Module):
        super().__init__()
        config = hf_model.config
        if not supports(config):
            raise ValueError(f"the fast engine runs {', '.join(SUPPORTED_FAMILIES)} models "
                             f"(full attention, SiLU), not {config.model_type}")
        self.hf_model = hf_model
        self.decoder = hf_model.base_model
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.num_layers = config.num_hidden_layers
        # Routed-experts layers, in order: their index in the `routes` buffer.
        self.moe_layers = [i for i, layer in enumerate(self.decoder.layers)
                           if is_moe_block(layer.mlp)]
        self.top_k = getattr(config, "num_experts_per_tok", 0) if self.moe_layers else 0
        self.scale = self.head_dim ** -0.5
        self.eps = config.rms_norm_eps
        self.fuse()
        weight = self.decoder.embed_tokens.weight
        self.lora = LoraAdapters(self.lora_groups(), weight.dtype, weight.device)

    def fuse(self) -> None:
        """(Re)build the fused weights; call again after the parameters moved devices."""
        self.fused = []
        for layer in self.decoder.layers:
            attention, mlp = layer.self_attn, layer.mlp
            projections = [attention.q_proj, attention.k_proj, attention.v_proj]
            bias = (fuse_parameters([p.bias for p in projections])
                    if projections[0].bias is not None else None)
            fused = {"qkv": fuse_parameters([p.weight for p in projections]), "qkv_bias": bias}
            if is_moe_block(mlp):
                fused["moe"] = SparseMoE(mlp, self.hf_model.config)
            else:
                fused["gate_up"] = fuse_parameters([mlp.gate_proj.weight, mlp.up_proj.weight])
            self.fused.append(fused)
        self._rotary_tables()

    def lora_groups(self) -> dict[str, LoraGroup]:
        """The GEMMs adapters may add to, '<layer>.<qkv|o|gate_up|down>' -> its projections'
        HF module paths (MoE layers: the attention ones)."""
        paths = {module: name for name, module in self.hf_model.named_modules()}
        groups = {}
        for index, layer in enumerate(self.decoder.layers):
            attention, mlp = layer.self_attn, layer.mlp
            members = {"qkv": [attention.q_proj, attention.k_proj, attention.v_proj],
                       "o": [attention.o_proj]}
            if not is_moe_block(mlp):
                members.update(gate_up=[mlp.gate_proj, mlp.up_proj], down=[mlp.down_proj])
            for group, modules in members.items():
                groups[f"{index}.{group}"] = LoraGroup(
                    tuple(paths[m] for m in modules), modules[0].in_features,
                    tuple(m.out_features for m in modules))
        return groups

    def _rotary_tables(self) -> None:
        """cos/sin of every position, (max_positions, D), computed by HF's rotary module."""
        weight = self.decoder.embed_tokens.weight
        positions = torch.arange(self.hf_model.config.max_position_embeddings,
                                 device=weight.device)
        dummy = torch.zeros(1, 1, dtype=weight.dtype, device=weight.device)
        cos, sin = self.decoder.rotary_emb(dummy, positions[None])
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()

    def release(self) -> None:
        self.fused, self.cos, self.sin = [], None, None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                k_caches: torch.Tensor, v_caches: torch.Tensor, slot_mapping: torch.Tensor,
                attend: Callable[..., torch.Tensor], return_kv: bool,
                routes: torch.Tensor | None = None,
                lora_mask: LoraMask | None = None) -> torch.Tensor:
        """input_ids/positions (T,) -> final hidden states (T, H).

        Each layer stores its K/V at `slot_mapping` in `k_caches[layer]`/`v_caches[layer]`,
        then calls attend(layer, q, k, v) (k, v given only when `return_kv`). MoE layers
        write their expert ids to `routes` (cache slots, MoE layers, k) at `slot_mapping`.
        `lora_mask`: each token's adapter (`self.lora.mask`); None: no adapter terms."""
        hidden = self.decoder.embed_tokens(input_ids)
        residual = None
        for index, layer in enumerate(self.decoder.layers):
            attention, fused = layer.self_attn, self.fused[index]
            normed, residual = add_rms_norm(hidden, residual, layer.input_layernorm.weight,
                                            self.eps)
            qkv = self._adapt(index, "qkv", normed, nn.functional.linear(
                normed, fused["qkv"], fused["qkv_bias"]), lora_mask)
            q_norm = getattr(attention, "q_norm", None)
            k_norm = getattr(attention, "k_norm", None)
            query, key, value = qk_norm_rope_store(
                qkv, positions, self.cos, self.sin,
                None if q_norm is None else q_norm.weight,
                None if k_norm is None else k_norm.weight, self.eps, self.num_heads,
                self.num_kv_heads, k_caches[index], v_caches[index], slot_mapping, return_kv)
            out = attend(index, query, key, value).flatten(1)  # (T, heads * D)
            hidden = self._adapt(index, "o", out, attention.o_proj(out), lora_mask)
            normed, residual = add_rms_norm(hidden, residual,
                                            layer.post_attention_layernorm.weight, self.eps)
            hidden = self._mlp(index, normed, slot_mapping, routes, lora_mask)
        normed, _ = add_rms_norm(hidden, residual, self.decoder.norm.weight, self.eps)
        return normed

    def _adapt(self, index: int, group: str, x: torch.Tensor, out: torch.Tensor,
               lora_mask: LoraMask | None) -> torch.Tensor:
        """`out` of a GEMM with the adapters' terms added (in place), if any."""
        if lora_mask is None:
            return out
        return self.lora.slots.apply(f"{index}.{group}", x, out, lora_mask)

    def _mlp(self, index: int, normed: torch.Tensor, slot_mapping: torch.Tensor,
             routes: torch.Tensor | None, lora_mask: LoraMask | None) -> torch.Tensor:
        fused = self.fused[index]
        if "moe" not in fused:
            gate_up = self._adapt(index, "gate_up", normed,
                                  nn.functional.linear(normed, fused["gate_up"]), lora_mask)
            activated = silu_mul(gate_up)
            return self._adapt(index, "down", activated,
                               self.decoder.layers[index].mlp.down_proj(activated), lora_mask)
        hidden, expert_ids = fused["moe"](normed)
        if routes is not None:
            routes[slot_mapping, self.moe_layers.index(index)] = expert_ids.to(routes.dtype)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N, V) float32 (the GEMM's output is not rounded to bf16)."""
        return output_logits(hidden, self.hf_model.get_output_embeddings().weight)
