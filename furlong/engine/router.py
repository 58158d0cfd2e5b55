"""EngineRouter: one `Engine` in front of several engine servers (SGLang's or furlong's).

Routing. A request goes to the engine that is already serving a request with the same
prompt token ids, else to the engine with the fewest outstanding requests. The rollout
manager submits the samples of a group together, so they meet on one engine, which then
shares the prompt's KV cache; the `Engine` API needs no group argument for it. At most
`max_concurrency` requests per engine (--sglang-server-concurrency) are on the wire; the
others wait here, where an abort still reaches them.

Fan-out. abort_all, update_weights, release/resume_memory, flush_cache and health go to
every live engine. Weights take one of two paths (`RouterOptions.weight_sync`):
- "tensor": /update_weights_from_tensor, each bucket serialized once, sent to all: CUDA
  tensors as CUDA IPC handles in SGLang's own format (colocated engines), CPU tensors as
  a `torch.save` archive that only furlong's servers read (docs/sglang.md).
- "distributed": the trainer is rank 0 of a process group with the servers
  (/init_weights_update_group) and broadcasts buckets (/update_weights_from_distributed);
  right for SGLang and furlong servers alike. The group is rebuilt when the engines change.

Failure. An engine that refuses a connection, or fails the periodic /health_generate
check, leaves the rotation: its requests in flight are cancelled and re-sent whole (the
same SamplingParams and sampling_seed: the same tokens on furlong's engines, and on SGLang
started with --enable-deterministic-inference) to other engines, and each `generate` call
still returns exactly once. With a launcher the engine is restarted
(else, or after `max_restarts`, dropped); a restarted engine booted from the checkpoint,
so it serves again after the next weight update (at once if none was ever pushed). When
no engine can serve until then (a run with one engine), the router asks `weight_source`,
if the owner set one, to push the current weights now. A failure during a weight update
is raised, not recovered.

Keys. With `RouterOptions.api_key` (SGLang's --api-key of the servers) every request to
the servers, weight broadcasts included, carries `Authorization: Bearer KEY`.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable

import torch

from furlong.engine.base import GenerateOutput, SamplingParams
from furlong.engine.client import EngineHTTPError, HTTPEngine
from furlong.engine.launcher import ServerLauncher
from furlong.engine.weight_transfer import (CurrentGroup, WeightBroadcaster, iter_buckets,
                                            serialize_named_tensors, serialize_named_tensors_ipc)
from furlong.ports import free_port

log = logging.getLogger(__name__)


class EngineState(enum.Enum):
    SERVING = "serving"
    RECOVERING = "recovering"              # out of rotation while it restarts
    AWAITING_WEIGHTS = "awaiting weights"  # restarted; serves after the next weight update
    DROPPED = "dropped"                    # failed for good


LIVE = (EngineState.SERVING, EngineState.AWAITING_WEIGHTS)


class EngineLost(ConnectionError):
    """The engine of a request left the rotation before answering it."""


@dataclass(frozen=True)
class RouterOptions:
    max_concurrency: int = 512          # requests on the wire per engine
    weight_sync: str = "distributed"    # distributed | tensor
    weight_sync_backend: str = "gloo"   # gloo (CPU tensors) | nccl (CUDA tensors)
    master_address: str = "127.0.0.1"   # where the servers reach rank 0 (this process)
    tp_size: int = 1                    # ranks per server: --rollout-num-gpus-per-engine
    bucket_bytes: int = 512 << 20       # --update-weight-buffer-size
    health_check_interval_s: float | None = 10.0  # None: no periodic check
    health_timeout_s: float = 60.0      # a /health_generate slower than this fails
    max_restarts: int = 3               # per engine; then it is dropped
    max_attempts: int = 4               # sends of one request before its error is raised
    weights_timeout_s: float = 600.0
    api_key: str | None = None          # the servers' --api-key, sent with every request


@dataclass(eq=False)
class EngineSlot:
    """One engine server as the router sees it."""
    index: int
    client: HTTPEngine
    state: EngineState = EngineState.SERVING
    outstanding: int = 0                # requests assigned to it, queued or sent
    in_flight: set = field(default_factory=set)  # tasks of its requests on the wire
    restarts: int = 0
    semaphore: asyncio.Semaphore | None = None

    @property
    def url(self) -> str:
        return self.client.url


def address_towards(host: str) -> str:
    """This machine's address on the route to `host` (a UDP connect sends nothing)."""
    family, _, _, _, address = socket.getaddrinfo(host.strip("[]"), 9,
                                                  type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        return sock.getsockname()[0]


class EngineRouter:
    """The `Engine` protocol over the servers at `urls`; `launcher` (optional) started
    them, restarts failed ones and is stopped by `close`."""

    def __init__(self, urls: list[str], options: RouterOptions = RouterOptions(),
                 launcher: ServerLauncher | None = None):
        if not urls:
            raise ValueError("EngineRouter needs at least one engine server URL")
        if options.weight_sync not in ("distributed", "tensor"):
            raise ValueError(f"weight_sync {options.weight_sync!r}: use distributed or tensor")
        self.options = options
        self.launcher = launcher
        self.engines = [EngineSlot(index, self._client(url)) for index, url in enumerate(urls)]
        self.weight_version: int | None = None  # the last version pushed
        self._pins: dict[tuple[int, ...], tuple[EngineSlot, int]] = {}  # prompt -> (engine, n)
        self._abort_epoch = 0
        self._pauses = 0                # weights moving: no health checks
        self._released = False          # memory released: no health checks
        self._weight_group = CurrentGroup()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._background: set[asyncio.Task] = set()
        # Pushes the weights of the current version again (set by the loop where that is
        # safe: while the trainer is not changing them); None: a restarted engine waits.
        self.weight_source: Callable[[], Awaitable[None]] | None = None
        self._refresh: asyncio.Task | None = None

    def _client(self, url: str) -> HTTPEngine:
        o = self.options
        return HTTPEngine(url, o.max_concurrency, health_timeout_s=o.health_timeout_s,
                          tp_size=o.tp_size, bucket_bytes=o.bucket_bytes, api_key=o.api_key)

    def _bind(self) -> None:
        """Queues, the change event and the health monitor of the running event loop."""
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        self._loop, self._changed, self._background = loop, asyncio.Event(), set()
        for slot in self.engines:
            slot.semaphore = asyncio.Semaphore(self.options.max_concurrency)
        if self.options.health_check_interval_s is not None:
            self._spawn(self._monitor())

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- generation ----------------------------------------------------------------------

    async def generate(self, input_ids: list[int], params: SamplingParams) -> GenerateOutput:
        self._bind()
        epoch, key = self._abort_epoch, tuple(input_ids)
        attempt = 0
        while True:
            attempt += 1
            slot = await self._choose(key)
            try:
                output = await self._send(slot, key, input_ids, params, epoch)
            except (ConnectionError, TimeoutError, EngineHTTPError) as error:
                if attempt >= self.options.max_attempts or not await self._retry(slot, error):
                    raise
                log.warning("re-sending a request that engine %s did not answer (%s)",
                            slot.url, error)
                continue
            output.meta["engine_url"] = slot.url
            return output

    async def _choose(self, key: tuple[int, ...]) -> EngineSlot:
        """The engine serving this prompt already, else the least loaded one; waits while
        every engine is restarting or (through `weight_source`) getting its weights again."""
        while True:
            pinned = self._pins.get(key)
            if pinned is not None and pinned[0].state is EngineState.SERVING:
                return pinned[0]
            serving = [slot for slot in self.engines if slot.state is EngineState.SERVING]
            if serving:
                return min(serving, key=lambda slot: (slot.outstanding, slot.index))
            if self._refresh is not None and self._refresh.done():
                self._refresh.result()  # its failure is this request's
            awaiting = any(slot.state is EngineState.AWAITING_WEIGHTS for slot in self.engines)
            if awaiting and self.weight_source is not None and self._refresh is None:
                log.warning("no engine serves until it has the weights: pushing them again")
                self._refresh = asyncio.ensure_future(self.weight_source())
                self._refresh.add_done_callback(lambda _: self._changed.set())
            elif not any(slot.state is EngineState.RECOVERING for slot in self.engines) \
                    and self._refresh is None:
                raise RuntimeError(self._no_engine_message())
            self._changed.clear()
            await self._changed.wait()

    async def _send(self, slot: EngineSlot, key: tuple[int, ...], input_ids: list[int],
                    params: SamplingParams, epoch: int) -> GenerateOutput:
        """One attempt on `slot`; EngineLost if the router takes the engine out meanwhile."""
        slot.outstanding += 1
        self._pin(key, slot)
        try:
            async with slot.semaphore:
                if self._abort_epoch != epoch:  # aborted while it waited here
                    return GenerateOutput([], [], "abort", prompt_tokens=len(input_ids),
                                          weight_version=self.weight_version or 0)
                if slot.state is not EngineState.SERVING:
                    raise EngineLost(f"engine {slot.url} left the rotation")
                task = asyncio.ensure_future(slot.client.generate(input_ids, params))
                slot.in_flight.add(task)
                try:
                    await asyncio.wait([task])
                finally:
                    slot.in_flight.discard(task)
                    task.cancel()  # a no-op once done; stops it if we were cancelled
            if task.cancelled():
                raise EngineLost(f"engine {slot.url} left the rotation mid-request")
            return task.result()
        finally:
            slot.outstanding -= 1
            self._unpin(key, slot)

    def _pin(self, key: tuple[int, ...], slot: EngineSlot) -> None:
        pinned = self._pins.get(key)
        count = pinned[1] if pinned is not None and pinned[0] is slot else 0
        self._pins[key] = (slot, count + 1)

    def _unpin(self, key: tuple[int, ...], slot: EngineSlot) -> None:
        pinned = self._pins.get(key)
        if pinned is None or pinned[0] is not slot:
            return  # pinned elsewhere since this engine failed
        if pinned[1] == 1:
            del self._pins[key]
        else:
            self._pins[key] = (slot, pinned[1] - 1)

    async def _retry(self, slot: EngineSlot, error: Exception) -> bool:
        """Whether a request that failed on `slot` is sent again; takes a dead engine out.
        An engine that is healthy and answered an error status refused the request
        itself: that error is the caller's."""
        if isinstance(error, EngineLost) or slot.state is not EngineState.SERVING:
            return True
        if not await slot.client.health():
            self._take_out(slot, f"{type(error).__name__}: {error}")
            return True
        return not isinstance(error, EngineHTTPError)

    # ---- failure and recovery ------------------------------------------------------------

    def _take_out(self, slot: EngineSlot, reason: str) -> None:
        if slot.state not in LIVE:
            return
        log.warning("engine %d (%s) failed: %s; its %d requests in flight move to other "
                    "engines", slot.index, slot.url, reason, len(slot.in_flight))
        slot.state = EngineState.RECOVERING
        for task in slot.in_flight:
            task.cancel()
        self._spawn(self._recover(slot))
        self._changed.set()

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
        slot.client = self._client(url)
        waits = self.weight_version is not None
        slot.state = EngineState.AWAITING_WEIGHTS if waits else EngineState.SERVING
        log.warning("engine %d restarted at %s%s", slot.index, url,
                    "; it serves after the next weight update" if waits else "")
        self._changed.set()

    def _drop(self, slot: EngineSlot, reason: str) -> None:
        slot.state = EngineState.DROPPED
        log.error("engine %d (%s) dropped (%s); %d of %d engines left", slot.index, slot.url,
                  reason, sum(s.state in LIVE for s in self.engines), len(self.engines))
        self._changed.set()

    def _no_engine_message(self) -> str:
        states = ", ".join(f"{slot.url} {slot.state.value}" for slot in self.engines)
        return (f"no engine server can take requests ({states}). A restarted engine serves "
                "after the next weight update; see the engine logs for why they failed")

    async def _monitor(self) -> None:
        """Every `health_check_interval_s`, /health_generate on each live engine."""
        while True:
            await asyncio.sleep(self.options.health_check_interval_s)
            if self._pauses or self._released:
                continue
            live = [slot for slot in self.engines if slot.state in LIVE]
            healthy = await asyncio.gather(*(slot.client.health() for slot in live))
            for slot, ok in zip(live, healthy, strict=True):
                if not ok and not (self._pauses or self._released):
                    self._take_out(slot, f"/health_generate failed or took over "
                                         f"{self.options.health_timeout_s:.0f} s")

    @contextmanager
    def _health_checks_paused(self):
        self._pauses += 1
        try:
            yield
        finally:
            self._pauses -= 1

    # ---- fan-out -------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """The URLs of the engines in rotation (trainer ranks push weights to them)."""
        return [slot.url for slot in self._live()]

    def _live(self) -> list[EngineSlot]:
        live = [slot for slot in self.engines if slot.state in LIVE]
        if not live:
            raise RuntimeError(self._no_engine_message())
        return live

    async def abort_all(self) -> None:
        """Requests in flight finish with 'abort'; so do those waiting here and those
        whose engine fails from now on (they are not re-sent)."""
        self._bind()
        self._abort_epoch += 1
        serving = [slot for slot in self.engines if slot.state is EngineState.SERVING]
        results = await asyncio.gather(*(slot.client.abort_all() for slot in serving),
                                       return_exceptions=True)
        for slot, result in zip(serving, results, strict=True):
            if isinstance(result, Exception):  # a dead engine's requests end as aborted
                log.warning("abort on engine %s failed: %s", slot.url, result)

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                             version: int) -> None:
        """To every live engine; restarted engines serve again once this succeeds."""
        self._bind()
        targets = self._live()
        restarts = [slot.restarts for slot in targets]
        with self._health_checks_paused():
            if self.options.weight_sync == "tensor":
                await self._send_tensors(targets, named_tensors, version)
            else:
                await asyncio.to_thread(self._broadcast, targets, named_tensors, version)
        self.weight_version = version
        self._refresh = None  # a later failure may need another
        for slot, num_restarts in zip(targets, restarts, strict=True):
            if slot.state is EngineState.AWAITING_WEIGHTS and slot.restarts == num_restarts:
                slot.state = EngineState.SERVING
                log.info("engine %d (%s) serves again with weights version %d", slot.index,
                         slot.url, version)
        self._changed.set()

    async def _send_tensors(self, targets: list[EngineSlot], named_tensors,
                            version: int) -> None:
        for bucket, is_last in iter_buckets(named_tensors, self.options.bucket_bytes):
            # CUDA tensors travel as IPC handles (engines share the GPU), others as bytes.
            serialize = serialize_named_tensors_ipc if bucket[0][1].is_cuda \
                else serialize_named_tensors
            payload = await asyncio.to_thread(serialize, bucket)
            await asyncio.gather(*(slot.client.update_weights_from_serialized(
                payload, version if is_last else None) for slot in targets))

    def _broadcast(self, targets: list[EngineSlot], named_tensors, version: int) -> None:
        """Runs on a worker thread: WeightBroadcaster blocks until the servers join in."""
        def join(group_name: str) -> WeightBroadcaster:
            o = self.options
            broadcaster = WeightBroadcaster([slot.url for slot in targets], group_name,
                                            o.tp_size, o.weights_timeout_s, o.api_key)
            broadcaster.init_group(o.master_address, free_port(o.master_address),
                                   o.weight_sync_backend)
            return broadcaster

        key = [(slot.index, slot.restarts, slot.url) for slot in targets]
        self._weight_group.get(key, join).broadcast(named_tensors, self.options.bucket_bytes,
                                                    version)

    async def release_memory(self) -> None:
        self._bind()
        self._released = True
        await asyncio.gather(*(slot.client.release_memory() for slot in self._live()))

    async def resume_memory(self) -> None:
        self._bind()
        await asyncio.gather(*(slot.client.resume_memory() for slot in self._live()))
        self._released = False

    async def flush_cache(self) -> None:
        self._bind()
        await asyncio.gather(*(slot.client.flush_cache() for slot in self._live()))

    async def health(self) -> bool:
        """Whether some engine serves and every live one finishes a one-token generation."""
        live = [slot for slot in self.engines if slot.state in LIVE]
        if not any(slot.state is EngineState.SERVING for slot in live):
            return False
        return all(await asyncio.gather(*(slot.client.health() for slot in live)))

    async def close(self) -> None:
        """Stop the monitor, leave the weight group, close clients, stop launched servers."""
        for task in self._background:
            task.cancel()
        if self._loop is asyncio.get_running_loop():
            await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.to_thread(self._weight_group.close)
        for slot in self.engines:
            await slot.client.close()
        if self.launcher is not None:
            self.launcher.stop()  # here, not on a worker thread: it restores SIGTERM
