"""Which engine takes a request: the session's engine, the one already serving its prompt,
else the least loaded.

The rollout manager submits the samples of a group together, so they meet on one engine,
which then shares the prompt's KV cache; the `Engine` API needs no group argument for it.
A multi-turn session (engine/server/sessions.py) sends a longer prompt each turn, after
the previous turn finished, so prompt affinity cannot keep it in place: its engine calls
run inside `session_affinity(session_id)`, and the session sticks to the engine of its
first call while that engine serves, where its conversation's prefix stays cached. The
key travels as a context variable, set only for the duration of those calls, because
`Engine.generate` has no routing argument.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

from furlong.engine.router.slots import EngineSlot, EngineState

PromptKey = tuple[int, ...]  # a prompt's token ids

_session_key: ContextVar[str | None] = ContextVar("furlong_session_key", default=None)


@contextmanager
def session_affinity(session_id: str) -> Iterator[None]:
    """Engine calls made inside (and in tasks created inside) belong to `session_id`."""
    token = _session_key.set(session_id)
    try:
        yield
    finally:
        _session_key.reset(token)


class Affinity:
    """Prompt -> (the engine serving requests with it, how many); session -> its engine
    (the `max_sessions` most recently used)."""

    def __init__(self, max_sessions: int = 1 << 16):
        self._pins: dict[PromptKey, tuple[EngineSlot, int]] = {}
        self._sessions: OrderedDict[str, EngineSlot] = OrderedDict()
        self.max_sessions = max_sessions

    def choose(self, key: PromptKey, engines: list[EngineSlot]) -> EngineSlot | None:
        """The serving engine of the current session, else the serving engine that has
        this prompt already, else the serving engine with the fewest outstanding
        requests; None when no engine serves."""
        by_prompt = self._pins.get(key)
        for pinned in (self._sessions.get(_session_key.get()), by_prompt and by_prompt[0]):
            if pinned is not None and pinned.state is EngineState.SERVING:
                return pinned
        serving = [slot for slot in engines if slot.state is EngineState.SERVING]
        return min(serving, key=lambda slot: (slot.outstanding, slot.index), default=None)

    def pin(self, key: PromptKey, slot: EngineSlot) -> None:
        pinned = self._pins.get(key)
        count = pinned[1] if pinned is not None and pinned[0] is slot else 0
        self._pins[key] = (slot, count + 1)
        session = _session_key.get()
        if session is not None:
            self._sessions[session] = slot
            self._sessions.move_to_end(session)
            if len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)

    def unpin(self, key: PromptKey, slot: EngineSlot) -> None:
        pinned = self._pins.get(key)
        if pinned is None or pinned[0] is not slot:
            return  # pinned elsewhere since this engine failed
        if pinned[1] == 1:
            del self._pins[key]
        else:
            self._pins[key] = (slot, pinned[1] - 1)
