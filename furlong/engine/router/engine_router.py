"""EngineRouter: the `Engine` protocol over several engine servers (SGLang's or furlong's).

A request goes to the engine `routing.Affinity` chooses; at most `max_concurrency`
requests per engine (--sglang-server-concurrency) are on the wire, the others wait here,
where an abort still reaches them. A request whose engine fails is re-sent whole (the
same SamplingParams and sampling_seed: the same tokens on furlong's engines, and on
SGLang started with --enable-deterministic-inference) to another engine, and each
`generate` call still returns exactly once; `health.Recovery` takes the engine out and
restarts or drops it. When no engine can serve until the next weight update (a run with
one engine), the router asks `weight_source`, if the owner set one, to push the current
weights now.

abort_all, update_weights, release/resume_memory, flush_cache and health go to every live
engine. Weights go through the sender `make_sender(RouterOptions.weight_sync)` of
weights/send.py: "auto" (/update_weights_from_tensor: CUDA tensors as IPC handles in
SGLang's format for colocated engines, CPU tensors as bytes that only furlong's servers
read) or "broadcast" (a broadcast group with the servers, rebuilt when the engines change).
A failure during a weight update is raised, not recovered.

LoRA adapters go to every live engine too, whole (weights/lora_send.py: unloaded and
loaded again under their name, serialized or written once for all): CUDA tensors as IPC
handles in SGLang's format to servers this router launched on the trainer's GPU
(weight_sync "auto"), and otherwise as PEFT files in `RouterOptions.adapter_dir` (a
temporary directory of this process when None), which SGLang's and furlong's servers
both load; a caller that knows the servers are furlong's may ask for "value" instead
(no shared disk needed). With a version it is a weight push, so an engine restarted
meanwhile serves again after it; under LoRA the loop's `weight_source` pushes the
adapter, which is how a restarted engine gets the last one back. A request's
`lora_path` travels with it.
"""
from __future__ import annotations

import asyncio
import logging
import tempfile
from typing import Awaitable, Callable, Iterable

import torch

from furlong.engine.base import GenerateOutput, SamplingParams
from furlong.engine.client import EngineHTTPError, HTTPEngine
from furlong.engine.launcher import ServerLauncher
from furlong.engine.router.health import Recovery
from furlong.engine.router.routing import Affinity, PromptKey
from furlong.engine.router.slots import (LIVE, EngineLost, EngineSlot, EngineState,
                                         RouterOptions, no_engine_message)
from furlong.engine.weights.lora_send import send_adapter
from furlong.engine.weights.send import Servers, WeightSender, make_sender
from furlong.ports import free_port

log = logging.getLogger(__name__)


def weight_sender(options: RouterOptions) -> WeightSender:
    """The sender of `options.weight_sync`; rank 0 of a broadcast group is this process."""
    o = options
    return make_sender(o.weight_sync, o.bucket_bytes, o.weights_timeout_s, o.weight_sync_backend,
                       lambda: (o.master_address, free_port(o.master_address)))


class EngineRouter:
    """The `Engine` protocol over the servers at `urls`; `launcher` (optional) started
    them, restarts failed ones and is stopped by `close`. With `RouterOptions.api_key`
    every request to the servers, weight pushes included, carries it."""

    def __init__(self, urls: list[str], options: RouterOptions = RouterOptions(),
                 launcher: ServerLauncher | None = None):
        if not urls:
            raise ValueError("EngineRouter needs at least one engine server URL")
        self.options = options
        self._sender = weight_sender(options)  # first: an unknown mode is a ValueError
        self.launcher = launcher
        self.engines = [EngineSlot(index, self._client(url)) for index, url in enumerate(urls)]
        self.weight_version: int | None = None  # the last version pushed
        self.recovery = Recovery(self.engines, options, launcher, self._client)
        self._affinity = Affinity()
        self._abort_epoch = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        # Pushes the weights of the current version again (set by the loop where that is
        # safe: while the trainer is not changing them); None: a restarted engine waits.
        self.weight_source: Callable[[], Awaitable[None]] | None = None
        self._refresh: asyncio.Task | None = None
        self._temporary_adapter_dir: tempfile.TemporaryDirectory | None = None

    def _client(self, url: str) -> HTTPEngine:
        o = self.options
        return HTTPEngine(url, o.max_concurrency, health_timeout_s=o.health_timeout_s,
                          tp_size=o.tp_size, bucket_bytes=o.bucket_bytes, api_key=o.api_key,
                          routed_experts_top_k=o.routed_experts_top_k)

    def _bind(self) -> None:
        """Queues, the change event and the health monitor of the running event loop."""
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        self._loop = loop
        for slot in self.engines:
            slot.semaphore = asyncio.Semaphore(self.options.max_concurrency)
        self.recovery.bind()

    # ---- generation ----------------------------------------------------------------------

    async def generate(self, input_ids: list[int], params: SamplingParams,
                       return_routed_experts: bool = False,
                       lora_path: str | None = None) -> GenerateOutput:
        self._bind()
        epoch, key = self._abort_epoch, tuple(input_ids)
        options = {"return_routed_experts": True} if return_routed_experts else {}
        if lora_path is not None:
            options["lora_path"] = lora_path
        attempt = 0
        while True:
            attempt += 1
            slot = await self._choose(key)
            try:
                output = await self._send(slot, key, input_ids, params, epoch, options)
            except (ConnectionError, TimeoutError, EngineHTTPError) as error:
                if attempt >= self.options.max_attempts or \
                        not await self.recovery.should_resend(slot, error):
                    raise
                log.warning("re-sending a request that engine %s did not answer (%s)",
                            slot.url, error)
                continue
            output.meta["engine_url"] = slot.url
            return output

    async def _choose(self, key: PromptKey) -> EngineSlot:
        """The engine routing chooses; waits while every engine is restarting or (through
        `weight_source`) getting its weights again."""
        while True:
            slot = self._affinity.choose(key, self.engines)
            if slot is not None:
                return slot
            if self._refresh is not None and self._refresh.done():
                self._refresh.result()  # its failure is this request's
            awaiting = any(slot.state is EngineState.AWAITING_WEIGHTS for slot in self.engines)
            if awaiting and self.weight_source is not None and self._refresh is None:
                log.warning("no engine serves until it has the weights: pushing them again")
                self._refresh = asyncio.ensure_future(self.weight_source())
                self._refresh.add_done_callback(lambda _: self.recovery.announce())
            elif not any(slot.state is EngineState.RECOVERING for slot in self.engines) \
                    and self._refresh is None:
                raise RuntimeError(no_engine_message(self.engines))
            self.recovery.changed.clear()
            await self.recovery.changed.wait()

    async def _send(self, slot: EngineSlot, key: PromptKey, input_ids: list[int],
                    params: SamplingParams, epoch: int, options: dict) -> GenerateOutput:
        """One attempt on `slot` (`options`: generate's keyword arguments); EngineLost if
        the router takes the engine out meanwhile."""
        slot.outstanding += 1
        self._affinity.pin(key, slot)
        try:
            async with slot.semaphore:
                if self._abort_epoch != epoch:  # aborted while it waited here
                    return GenerateOutput([], [], "abort", prompt_tokens=len(input_ids),
                                          weight_version=self.weight_version or 0)
                if slot.state is not EngineState.SERVING:
                    raise EngineLost(f"engine {slot.url} left the rotation")
                task = asyncio.ensure_future(slot.client.generate(input_ids, params, **options))
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
            self._affinity.unpin(key, slot)

    # ---- fan-out -------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """The URLs of the engines in rotation (trainer ranks push weights to them)."""
        return [slot.url for slot in self._live()]

    def _live(self) -> list[EngineSlot]:
        live = [slot for slot in self.engines if slot.state in LIVE]
        if not live:
            raise RuntimeError(no_engine_message(self.engines))
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

    def push_targets(self) -> Servers:
        """The engines a push goes to now: those in rotation. Equal only while the same
        server processes (a restart makes a new one)."""
        targets = self._live()
        return Servers(tuple(slot.url for slot in targets), self.options.api_key,
                       self.options.tp_size, tuple(slot.restarts for slot in targets))

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                             version: int) -> None:
        """To every live engine; restarted engines serve again once this succeeds."""
        self._bind()
        servers = self.push_targets()
        with self.recovery.checks_paused():
            await asyncio.to_thread(self._sender.send, named_tensors, servers, version)
        self.weights_pushed(version, servers)

    def weights_pushed(self, version: int, servers: Servers) -> None:
        """`version` reached `servers` (`push_targets()` before the push), sent by this
        router or by trainer ranks directly (Ray): it is the version now, and engines that
        waited for weights (and did not restart again meanwhile) serve. In the event loop."""
        self._bind()
        self.weight_version = version
        self.recovery.weights_pushed = True
        self._refresh = None  # a later failure may need another
        restarts_at = dict(zip(servers.urls, servers.restarts, strict=True))
        for slot in self.engines:
            if slot.state is EngineState.AWAITING_WEIGHTS and \
                    restarts_at.get(slot.url) == slot.restarts:
                slot.state = EngineState.SERVING
                log.info("engine %d (%s) serves again with weights version %d", slot.index,
                         slot.url, version)
        self.recovery.announce()

    async def load_lora_adapter(self, lora_name: str, config: dict,
                                named_tensors: Iterable[tuple[str, torch.Tensor]],
                                version: int | None = None,
                                transport: str | None = None) -> None:
        """To every live engine, by `transport` (None: `adapter_transport`); with a
        `version`, a weight push: restarted engines serve again once this succeeds."""
        self._bind()
        servers = self.push_targets()
        named = list(named_tensors)
        transport = transport or self.adapter_transport(named)
        adapter_dir = self._adapter_dir() if transport == "disk" else None
        with self.recovery.checks_paused():
            await asyncio.to_thread(send_adapter, lora_name, config, named, servers, version,
                                    transport, adapter_dir, self.options.weights_timeout_s)
        if version is not None:
            self.weights_pushed(version, servers)

    def adapter_transport(self, named: list[tuple[str, torch.Tensor]]) -> str:
        """How an adapter travels: as IPC handles ("ipc") for CUDA tensors to servers this
        router launched on their GPU; from disk ("disk") otherwise, the one transport that
        SGLang's and furlong's servers both take from anywhere (servers started elsewhere
        may be either)."""
        colocated = self.launcher is not None and self.options.weight_sync == "auto"
        return "ipc" if colocated and named and named[0][1].is_cuda else "disk"

    def _adapter_dir(self) -> str:
        """Where adapters are written for the servers: `RouterOptions.adapter_dir`, or a
        temporary directory of this process (removed by `close`)."""
        if self.options.adapter_dir is not None:
            return self.options.adapter_dir
        if self._temporary_adapter_dir is None:
            self._temporary_adapter_dir = tempfile.TemporaryDirectory(prefix="furlong-lora-")
        return self._temporary_adapter_dir.name

    async def unload_lora_adapter(self, lora_name: str) -> None:
        self._bind()
        await asyncio.gather(*(slot.client.unload_lora_adapter(lora_name)
                               for slot in self._live()))

    async def release_memory(self) -> None:
        self._bind()
        self.recovery.released = True
        await asyncio.gather(*(slot.client.release_memory() for slot in self._live()))

    async def resume_memory(self) -> None:
        self._bind()
        await asyncio.gather(*(slot.client.resume_memory() for slot in self._live()))
        self.recovery.released = False

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
        """Stop the monitor, leave the weight group, close clients, stop launched servers,
        remove the temporary adapter directory."""
        await self.recovery.stop(in_this_loop=self._loop is asyncio.get_running_loop())
        await asyncio.to_thread(self._sender.close)
        for slot in self.engines:
            await slot.client.close()
        if self.launcher is not None:
            self.launcher.stop()  # here, not on a worker thread: it restores SIGTERM
        if self._temporary_adapter_dir is not None:
            self._temporary_adapter_dir.cleanup()
            self._temporary_adapter_dir = None
