"""Engine failure and recovery behind the router: health checks, restarts, drops.

An engine that refuses a connection, or fails the periodic /health_generate check, leaves
the rotation: its requests in flight are cancelled (the router re-sends them elsewhere).
With a launcher the engine is restarted (else, or after `max_restarts`, dropped); a
restarted engine booted from the checkpoint, so it serves again after the next weight
update (at once if none was ever pushed). No checks run while weights move or while the
engines' memory is released. Every change of state is announced on `changed`, so
requests waiting for an engine look again.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import contextmanager
from typing import Callable

from furlong.engine.client import EngineHTTPError, HTTPEngine
from furlong.engine.launcher import ServerLauncher
from furlong.engine.router.slots import (LIVE, EngineLost, EngineSlot, EngineState,
                                         RouterOptions)

log = logging.getLogger(__name__)


class Recovery:
    """Takes failed engines of `engines` out of rotation and brings them back (or not)."""

    def __init__(self, engines: list[EngineSlot], options: RouterOptions,
                 launcher: ServerLauncher | None, make_client: Callable[[str], HTTPEngine]):
        self.engines, self.options = engines, options
        self.launcher, self.make_client = launcher, make_client
        self.weights_pushed = False     # a restarted engine then waits for the next push
        self.released = False           # memory released: no health checks
        self.changed: asyncio.Event | None = None
        self._pauses = 0                # weights moving: no health checks
        self._background: set[asyncio.Task] = set()

    def bind(self) -> None:
        """The change event and the health monitor, in the running event loop."""
        self.changed, self._background = asyncio.Event(), set()
        if self.options.health_check_interval_s is not None:
            self._spawn(self._monitor())

    def announce(self) -> None:
        self.changed.set()

    async def should_resend(self, slot: EngineSlot, error: Exception) -> bool:
        """Whether a request that failed on `slot` is sent again; takes a dead engine out.
        An engine that is healthy and answered an error status refused the request
        itself: that error is the caller's."""
        if isinstance(error, EngineLost) or slot.state is not EngineState.SERVING:
            return True
        if not await slot.client.health():
            self.take_out(slot, f"{type(error).__name__}: {error}")
            return True
        return not isinstance(error, EngineHTTPError)

    def take_out(self, slot: EngineSlot, reason: str) -> None:
        if slot.state not in LIVE:
            return
        log.warning("engine %d (%s) failed: %s; its %d requests in flight move to other "
                    "engines", slot.index, slot.url, reason, len(slot.in_flight))
        slot.state = EngineState.RECOVERING
        for task in slot.in_flight:
            task.cancel()
        self._spawn(self._recover(slot))
        self.announce()

    async def _recover(self, slot: EngineSlot) -> None:
        if self.launcher is None or slot.restarts >= self.options.max_restarts:
            why = "it was not started here" if self.launcher is None else \
                f"it was restarted {slot.restarts} times already"
            self._drop(slot, f"not restarted: {why}")
            return
        slot.restarts += 1
        try:
            url = await self.launcher.restart(slot.index)
        except Exception as error:  # a restart that fails for any reason drops the engine
            self._drop(slot, f"restart failed: {error}")
            return
        await slot.client.close()
        slot.client = self.make_client(url)
        waits = self.weights_pushed
        slot.state = EngineState.AWAITING_WEIGHTS if waits else EngineState.SERVING
        # Miles restarts engines only under --use-fault-tolerance; furlong's router always
        # does (it owns the server processes), so the warning says so.
        log.warning("engine %d restarted at %s%s (furlong restarts failed engines with or "
                    "without --use-fault-tolerance)", slot.index, url,
                    "; it serves after the next weight update" if waits else "")
        self.announce()

    def _drop(self, slot: EngineSlot, reason: str) -> None:
        slot.state = EngineState.DROPPED
        log.error("engine %d (%s) dropped (%s); %d of %d engines left", slot.index, slot.url,
                  reason, sum(s.state in LIVE for s in self.engines), len(self.engines))
        self.announce()

    async def _monitor(self) -> None:
        """Every `health_check_interval_s`, /health_generate on each live engine."""
        while True:
            await asyncio.sleep(self.options.health_check_interval_s)
            if self._checks_off():
                continue
            live = [slot for slot in self.engines if slot.state in LIVE]
            healthy = await asyncio.gather(*(slot.client.health() for slot in live))
            for slot, ok in zip(live, healthy, strict=True):
                if not ok and not self._checks_off():
                    self.take_out(slot, f"/health_generate failed or took over "
                                        f"{self.options.health_timeout_s:.0f} s")

    def _checks_off(self) -> bool:
        return bool(self._pauses) or self.released

    @contextmanager
    def checks_paused(self):
        self._pauses += 1
        try:
            yield
        finally:
            self._pauses -= 1

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop(self, in_this_loop: bool) -> None:
        """Cancel the monitor and restarts (awaited when they run in this loop)."""
        for task in self._background:
            task.cancel()
        if in_this_loop:
            await asyncio.gather(*self._background, return_exceptions=True)
