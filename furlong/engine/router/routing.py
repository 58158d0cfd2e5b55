"""Which engine takes a request: the one already serving its prompt, else the least loaded.

The rollout manager submits the samples of a group together, so they meet on one engine,
which then shares the prompt's KV cache; the `Engine` API needs no group argument for it.
"""
from __future__ import annotations

from furlong.engine.router.slots import EngineSlot, EngineState

PromptKey = tuple[int, ...]  # a prompt's token ids


class Affinity:
    """Prompt -> (the engine serving requests with it, how many)."""

    def __init__(self):
        self._pins: dict[PromptKey, tuple[EngineSlot, int]] = {}

    def choose(self, key: PromptKey, engines: list[EngineSlot]) -> EngineSlot | None:
        """The serving engine that has this prompt already, else the serving engine with
        the fewest outstanding requests; None when no engine serves."""
        pinned = self._pins.get(key)
        if pinned is not None and pinned[0].state is EngineState.SERVING:
            return pinned[0]
        serving = [slot for slot in engines if slot.state is EngineState.SERVING]
        return min(serving, key=lambda slot: (slot.outstanding, slot.index), default=None)

    def pin(self, key: PromptKey, slot: EngineSlot) -> None:
        pinned = self._pins.get(key)
        count = pinned[1] if pinned is not None and pinned[0] is slot else 0
        self._pins[key] = (slot, count + 1)

    def unpin(self, key: PromptKey, slot: EngineSlot) -> None:
        pinned = self._pins.get(key)
        if pinned is None or pinned[0] is not slot:
            return  # pinned elsewhere since this engine failed
        if pinned[1] == 1:
            del self._pins[key]
        else:
            self._pins[key] = (slot, pinned[1] - 1)
