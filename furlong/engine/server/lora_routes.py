"""The server's LoRA endpoints, SGLang's: load an adapter from a directory or from tensors,
unload it. Requests then name it with `lora_path` (/generate) or `model` (/v1 routes).

- /load_lora_adapter {lora_name, lora_path, pinned}: a PEFT adapter directory the server
  can read (model/lora_files.py: adapter_config.json + adapter_model.safetensors).
- /load_lora_adapter_from_tensors {lora_name, config_dict, serialized_named_tensors,
  pinned, upsert, load_format}: the whole adapter, one payload per tensor-parallel rank
  (this server loads entry 0; SGLang since July 2026), or one `serialized_tensors` (SGLang
  before); given both, the per-rank field is read, as SGLang now does. A payload is
  furlong's by-value format or CUDA IPC handles in SGLang's (a dict name -> tensor, or
  pairs; for a server started next to its trainer): engine/weights/wire.py. A loaded name
  is replaced only with `upsert` (Miles' SGLang); the trainer unloads it first.
- /unload_lora_adapter {lora_name}.
Each answers SGLang's `{"success", "error_message", "loaded_adapters"}`; a refused load
(a bad field, an adapter the engine cannot apply) is a 400 naming it. `pinned` is
accepted: furlong's engines never evict an adapter. The weight version moves with
/update_weight_version, as after SGLang's loads.
"""
from __future__ import annotations

import asyncio

from aiohttp import web

from furlong.engine.base import Engine
from furlong.engine.server.request_fields import bad_request, check_load_format, field, json_body
from furlong.engine.weights.wire import (deserialize_ipc_tensors, deserialize_named_tensors,
                                         is_ipc_payload)
from furlong.model.lora_files import read_adapter

LOAD_FIELDS = {"lora_name", "lora_path", "pinned"}
TENSOR_FIELDS = {"lora_name", "config_dict", "serialized_tensors", "serialized_named_tensors",
                 "pinned", "upsert", "load_format", "added_tokens_config"}


class LoraRoutes:
    """The LoRA endpoints over `engine`. `loaded`: adapter name -> where it came from (a
    directory, or 'tensors'), what /v1/models lists and the /v1 routes' `model` selects.
    `accept_ipc_weights`: take CUDA IPC payloads; `tp_size`: payloads per request in
    `serialized_named_tensors`."""

    def __init__(self, engine: Engine, accept_ipc_weights: bool = False, tp_size: int = 1):
        self.engine = engine
        self.accept_ipc_weights = accept_ipc_weights
        self.tp_size = tp_size
        self.loaded: dict[str, str] = {}
        self._lock = asyncio.Lock()  # one load or unload at a time

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/load_lora_adapter", self.load_lora_adapter),
                web.post("/load_lora_adapter_from_tensors", self.load_from_tensors),
                web.post("/unload_lora_adapter", self.unload_lora_adapter)]

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        body = _checked(await json_body(request), LOAD_FIELDS)
        name, path = field(body, "lora_name", str), field(body, "lora_path", str)
        field(body, "pinned", bool, False)
        try:
            config, tensors = await asyncio.to_thread(read_adapter, path)
        except ValueError as error:
            bad_request(f"lora_path: {error}")
        return await self._load(name, config, tensors, path, upsert=False)

    async def load_from_tensors(self, request: web.Request) -> web.Response:
        body = _checked(await json_body(request), TENSOR_FIELDS)
        name, config = field(body, "lora_name", str), field(body, "config_dict", dict)
        field(body, "pinned", bool, False)
        check_load_format(body)
        if body.get("added_tokens_config") is not None:
            bad_request("added_tokens_config: adapters that add tokens are not supported")
        upsert = field(body, "upsert", bool, False)
        payload = self._payload(body)
        try:
            pairs = await asyncio.to_thread(
                deserialize_ipc_tensors if is_ipc_payload(payload) else deserialize_named_tensors,
                payload)
        except ValueError as error:  # wire.py's messages name the field
            bad_request(str(error))
        return await self._load(name, config, dict(pairs), "tensors", upsert)

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        name = field(_checked(await json_body(request), {"lora_name"}), "lora_name", str)
        async with self._lock:
            try:
                await self.engine.unload_lora_adapter(name)
            except ValueError as error:  # names lora_name
                bad_request(str(error))
            self.loaded.pop(name, None)
        return self._answer()

    def _payload(self, body: dict) -> str:
        """The one payload this server loads, checked to be allowed here."""
        if "serialized_named_tensors" in body:
            payloads = field(body, "serialized_named_tensors", list)
            if len(payloads) != self.tp_size or not all(isinstance(p, str) for p in payloads):
                bad_request(f"serialized_named_tensors must hold {self.tp_size} payload "
                            "string(s), one per tensor-parallel rank of this engine")
            payload = payloads[0]
        elif "serialized_tensors" in body:
            payload = field(body, "serialized_tensors", str)
        else:
            bad_request("give serialized_named_tensors (one payload per tensor-parallel "
                        "rank) or serialized_tensors (one payload)")
        if is_ipc_payload(payload) and not self.accept_ipc_weights:
            bad_request("serialized_tensors: CUDA IPC payloads are accepted only by a server "
                        "started next to its trainer (accept_ipc_weights)")
        return payload

    async def _load(self, name: str, config: dict, tensors: dict, source: str,
                    upsert: bool) -> web.Response:
        async with self._lock:
            if name in self.loaded and not upsert:
                bad_request(f"lora_name {name!r} is loaded already; unload it first "
                            "(/unload_lora_adapter) or send upsert: true to replace it")
            try:
                await self.engine.load_lora_adapter(name, config, tensors.items())
            except ValueError as error:  # the engine's messages name the adapter
                bad_request(str(error))
            self.loaded[name] = source
        return self._answer()

    def _answer(self) -> web.Response:
        return web.json_response({"success": True, "error_message": "",
                                  "loaded_adapters": dict(self.loaded)})


def _checked(body: dict, known: set[str]) -> dict:
    unknown = set(body) - known
    if unknown:
        bad_request(f"unknown fields {sorted(unknown)}; known: {sorted(known)}")
    return body
