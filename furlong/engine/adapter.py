"""AdapterEngine: the run's engine with the run's LoRA adapter on every request.

Under --lora-rank the policy is the base model plus the adapter the trainer pushes
(`Engine.load_lora_adapter`); an engine request that names no adapter samples the base.
The rollouts, the router front and every hook therefore get the engine through this
wrapper, so that no generate path (furlong's, or a hook ported from Miles that knows
nothing of adapters) samples the base model by omission. A request that names an
adapter keeps it. Everything else (pushes, memory release, health) goes to the engine.
"""
from __future__ import annotations

from typing import Any

from furlong.engine.base import Engine, GenerateOutput, SamplingParams


class AdapterEngine:
    def __init__(self, engine: Engine, lora_path: str):
        self.engine = engine
        self.lora_path = lora_path

    async def generate(self, input_ids: list[int], params: SamplingParams,
                       **options: Any) -> GenerateOutput:
        if options.get("lora_path") is None:
            options["lora_path"] = self.lora_path
        return await self.engine.generate(input_ids, params, **options)

    async def score(self, input_ids: list[int]) -> list[float]:
        """Refused: an engine scores with its base model, and the run's policy is the base
        with the adapter."""
        raise ValueError("the run's policy is the base model with its LoRA adapter, and "
                         "prompt scoring uses the base alone")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)
