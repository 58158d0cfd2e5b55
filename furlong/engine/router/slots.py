"""The engines as the router sees them: options, states, and one slot per server."""
from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from furlong.engine.client import HTTPEngine


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
    weight_sync: str = "broadcast"      # a mode of weights/send.py: broadcast | auto | ...
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
    routed_experts_top_k: int | None = None  # MoE: num_experts_per_tok, to read routed experts
    # LoRA adapters loaded from disk are written here (servers on other hosts: a shared
    # disk); None: a temporary directory of the router's process.
    adapter_dir: str | None = None


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


def no_engine_message(engines: list[EngineSlot]) -> str:
    states = ", ".join(f"{slot.url} {slot.state.value}" for slot in engines)
    return (f"no engine server can take requests ({states}). A restarted engine serves "
            "after the next weight update; see the engine logs for why they failed")
