"""The rollout engine interface: what the rollout manager needs from any engine.

Every engine (the simple HF one, the fast GPU one, an HTTP client in front of an
SGLang or furlong server) implements `Engine`. Sampling parameters use SGLang's
names so that a request body means the same thing to every engine.

LoRA (--lora-rank > 0): the base weights stay as the engine booted them and adapters are
loaded by name (`load_lora_adapter`, SGLang's config_dict and PEFT's tensor names); a
request names its adapter with `lora_path`, SGLang's field (the adapter's name; None: the
base model). A weight push under LoRA sends only the adapter.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable, Protocol

import torch


# SGLang sampling params that only shape how the response is detokenised (Miles' default
# generate sends them): accepted and ignored, furlong decodes with the tokenizer's own
# spacing; they change no sampled token.
DETOKENIZE_ONLY = ("spaces_between_special_tokens",)


@dataclass(frozen=True)
class SamplingParams:
    """SGLang's `sampling_params` (the subset in docs/sglang.md, plus the seed).

    `sampling_seed` makes one request reproducible whatever else is in the batch.
    """
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    ignore_eos: bool = False
    sampling_seed: int | None = None

    @classmethod
    def from_dict(cls, params: dict) -> "SamplingParams":
        """From an SGLang request dict; unknown keys are an error naming them (SGLang's
        detokenisation options, which change no token, are accepted and ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        params = {k: v for k, v in params.items() if k not in DETOKENIZE_ONLY}
        unknown = set(params) - names
        if unknown:
            raise ValueError(f"unknown sampling params {sorted(unknown)}; known: {sorted(names)}")
        values = {k: v for k, v in params.items() if v is not None}
        for key in ("stop", "stop_token_ids"):
            if key in values:
                value = values[key]
                values[key] = (value,) if isinstance(value, (str, int)) else tuple(value)
        return cls(**values)

    def validate(self) -> "SamplingParams":
        """Self, or a ValueError naming the first field outside SGLang's range."""
        for name, valid, requirement in _SAMPLING_RULES:
            value = getattr(self, name)
            if not valid(value):
                raise ValueError(f"{name} must be {requirement}, got {value!r}")
        return self

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["stop"], data["stop_token_ids"] = list(self.stop), list(self.stop_token_ids)
        return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_SAMPLING_RULES = (
    ("temperature", lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0"),
    ("top_p", lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "a number in (0, 1]"),
    ("top_k", lambda v: _is_int(v) and (v == -1 or v >= 1), "-1 (off) or an integer >= 1"),
    ("max_new_tokens", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("stop", lambda v: all(isinstance(s, str) and s for s in v), "a list of non-empty strings"),
    ("stop_token_ids", lambda v: all(_is_int(t) for t in v), "a list of token ids"),
    ("skip_special_tokens", lambda v: isinstance(v, bool), "true or false"),
    ("no_stop_trim", lambda v: isinstance(v, bool), "true or false"),
    ("ignore_eos", lambda v: isinstance(v, bool), "true or false"),
    ("sampling_seed", lambda v: v is None or _is_int(v), "an integer or null"),
)


@dataclass
class GenerateOutput:
    """One finished request: the SGLang response fields the framework reads."""
    output_ids: list[int]
    output_log_probs: list[float]
    finish_reason: str  # "stop" | "length" | "abort"
    text: str = ""
    prompt_tokens: int = 0
    weight_version: int = 0
    meta: dict = field(default_factory=dict)
    # With return_routed_experts: the experts every MoE router chose for every token the
    # model processed (the prompt and each generated token but the last), in token order;
    # int32 (len(input_ids) + len(output_ids) - 1, num_moe_layers, top_k). SGLang's
    # meta_info.routed_experts.
    routed_experts: torch.Tensor | None = None


def check_lora_path(lora_path: str | None, loaded, field: str = "lora_path") -> None:
    """A ValueError naming `field` unless `lora_path` is None (the base model) or one of
    the `loaded` adapter names."""
    if lora_path is not None and lora_path not in loaded:
        raise ValueError(f"{field} {lora_path!r}: no LoRA adapter of that name is loaded "
                         f"(loaded: {sorted(loaded) or 'none'}); load it first "
                         "(load_lora_adapter)")


class Engine(Protocol):
    """What the loop and the rollout manager call; in-process and HTTP engines alike."""

    async def generate(self, input_ids: list[int], params: SamplingParams,
                       return_routed_experts: bool = False,
                       lora_path: str | None = None) -> GenerateOutput:
        """One response. Cancelling the call aborts that one request: the engine stops
        working on it and frees what it held. `return_routed_experts` fills the output's
        `routed_experts` (MoE models; for routing replay in training). `lora_path`: the
        name of a loaded adapter to sample with (a ValueError naming it if none is)."""

    async def abort_all(self) -> None:
        """Finish every request in flight now, with finish reason 'abort'."""

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                             version: int) -> None:
        """Load weights by HF parameter name; `version` is reported with later outputs."""

    async def load_lora_adapter(self, lora_name: str, config: dict,
                                named_tensors: Iterable[tuple[str, torch.Tensor]],
                                version: int | None = None) -> None:
        """Load adapter `lora_name`, or replace the one of that name (requests in flight on
        it go on with the new tensors). `config`: SGLang's config_dict (PEFT's
        adapter_config keys: peft_type, r, lora_alpha, target_modules, ...); tensors by
        `<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r); `version` is
        reported with later outputs."""

    async def unload_lora_adapter(self, lora_name: str) -> None:
        """Forget adapter `lora_name` (a ValueError naming it if it is not loaded)."""

    async def release_memory(self) -> None: ...

    async def resume_memory(self) -> None: ...

    async def flush_cache(self) -> None: ...

    async def health(self) -> bool: ...

    async def close(self) -> None: ...
