"""HTTPEngine: the `Engine` protocol over SGLang's HTTP API, for a furlong or an SGLang server.

Requests carry only SGLang's documented fields, so one client drives `python -m
furlong.engine.serve` and `python -m sglang.launch_server` alike. The aiohttp session is made
on first use in the running event loop. At most `max_concurrency` generate calls are in
flight; control calls (abort, weights, health) never queue behind them, since an abort must
reach the server while generations wait for it. Every failure names the URL it came from.
With an `api_key`, every request carries `Authorization: Bearer KEY` (SGLang's `--api-key`).
Routed experts (MoE routing replay) come back as SGLang sends them, base64 of an int32
array without its shape: the number of tokens follows from the answer, the top-k from the
model (`routed_experts_top_k`), and the layers from the two.
Weight updates go through the one sender module (furlong/engine/weights/send.py), LoRA
adapters through weights/lora_send.py: unloaded and loaded again whole under their name,
by value (furlong's servers) unless another transport is asked for, then the version.
Requests name their adapter with `lora_path` (SGLang's field: the adapter's name).
"""
from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Iterable

import aiohttp
import numpy as np
import torch

from furlong.engine.api_key import auth_headers
from furlong.engine.base import GenerateOutput, SamplingParams
from furlong.engine.http_error import EngineHTTPError
from furlong.engine.weights.lora_send import send_adapter
from furlong.engine.weights.send import Servers, make_sender, send_from_disk


class HTTPEngine:
    """An engine server at `url` (e.g. http://127.0.0.1:30000), as an `Engine`.

    `tp_size`: the server's tensor-parallel size (SGLang wants one serialized copy of the
    weights per rank). `bucket_bytes`: the most bytes of weights per update request.
    `timeout_s`: the limit of each request (None: none), `health_timeout_s` that of `health`.
    `api_key`: the server's --api-key, sent with every request. `routed_experts_top_k`:
    the model's experts per token (num_experts_per_tok), to read routed experts.
    """

    def __init__(self, url: str, max_concurrency: int = 512, timeout_s: float | None = None,
                 health_timeout_s: float = 30.0, tp_size: int = 1,
                 bucket_bytes: int = 512 << 20, api_key: str | None = None,
                 routed_experts_top_k: int | None = None):
        self.url = url.rstrip("/")
        self.routed_experts_top_k = routed_experts_top_k
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.health_timeout_s = health_timeout_s
        self.tp_size = tp_size
        self.bucket_bytes = bucket_bytes
        self._session: aiohttp.ClientSession | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def generate(self, input_ids: list[int], params: SamplingParams,
                       return_routed_experts: bool = False,
                       lora_path: str | None = None) -> GenerateOutput:
        body = {"input_ids": list(input_ids),
                "sampling_params": {k: v for k, v in params.to_dict().items() if v is not None},
                "return_logprob": True}
        if lora_path is not None:
            body["lora_path"] = lora_path
        if return_routed_experts:
            if self.routed_experts_top_k is None:
                raise ValueError(f"{self.url}: reading routed experts needs the model's top-k "
                                 "(HTTPEngine(routed_experts_top_k=...))")
            body["return_routed_experts"] = True
        async with self._client()[1]:
            result = await self._request("POST", "/generate", body)
        output = _generate_output(result)
        encoded = output.meta.pop("routed_experts", None)
        if return_routed_experts and encoded:  # none: aborted before the prefill
            tokens = len(input_ids) + len(output.output_ids) - 1
            output.routed_experts = decode_routed_experts(encoded, tokens,
                                                          self.routed_experts_top_k)
        return output

    async def abort_all(self) -> None:
        await self._request("POST", "/abort_request", {"abort_all": True})

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                             version: int) -> None:
        """By value (weights/send.py), in requests of at most `bucket_bytes`; the last one
        sets `version`. Only furlong's servers read this format."""
        sender = make_sender("value", self.bucket_bytes, self.timeout_s)
        await asyncio.to_thread(sender.send, named_tensors, self._servers(), version)

    async def update_weights_from_disk(self, model_path: str | Path, version: int) -> None:
        """Load an HF directory that the server can read."""
        await asyncio.to_thread(send_from_disk, model_path, self._servers(), version,
                                self.timeout_s)

    async def load_lora_adapter(self, lora_name: str, config: dict,
                                named_tensors: Iterable[tuple[str, torch.Tensor]],
                                version: int | None = None, transport: str = "value",
                                adapter_dir: str | Path | None = None) -> None:
        """The whole adapter by `transport` (weights/lora_send.py: "value", "ipc", or
        "disk" under `adapter_dir`), replacing the one of that name; then `version`."""
        await asyncio.to_thread(send_adapter, lora_name, config, named_tensors,
                                self._servers(), version, transport, adapter_dir,
                                self.timeout_s)

    async def unload_lora_adapter(self, lora_name: str) -> None:
        await self._request("POST", "/unload_lora_adapter", {"lora_name": lora_name})

    def _servers(self) -> Servers:
        return Servers((self.url,), self.api_key, self.tp_size)

    async def release_memory(self) -> None:
        await self._request("POST", "/release_memory_occupation", {})

    async def resume_memory(self) -> None:
        await self._request("POST", "/resume_memory_occupation", {})

    async def flush_cache(self) -> None:
        await self._request("POST", "/flush_cache")

    async def get_model_info(self) -> dict:
        return await self._request("GET", "/get_model_info")

    async def health(self) -> bool:
        """Whether the server finishes a one-token generation within `health_timeout_s`."""
        try:
            await self._request("GET", "/health_generate", timeout_s=self.health_timeout_s)
        except Exception:  # unreachable, unhealthy or slow: all mean False
            return False
        return True

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
        """The session and the generate semaphore of the running event loop."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop:
            # No connection limit: the semaphore bounds generate calls alone.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                                  headers=auth_headers(self.api_key))
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
            self._loop = loop
        return self._session, self._semaphore

    async def _request(self, method: str, path: str, body: dict | None = None,
                       timeout_s: float | None = None):
        """The JSON (or text) of a successful answer; ConnectionError, TimeoutError or
        EngineHTTPError otherwise, naming the URL."""
        url = self.url + path
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
        try:
            async with self._client()[0].request(method, url, json=body,
                                                 timeout=timeout) as response:
                text = await response.text()
                status, is_json = response.status, response.content_type == "application/json"
        except aiohttp.ClientError as error:
            raise ConnectionError(f"{method} {url} failed: {error} (is the engine server "
                                  "running?)") from error
        except asyncio.TimeoutError as error:
            raise TimeoutError(f"{method} {url} did not answer within {timeout.total} s") from error
        if status >= 400:
            raise EngineHTTPError(f"{method} {url} answered HTTP {status}: {text[:1000]}", status)
        return json.loads(text) if is_json and text else text


def _generate_output(result: dict) -> GenerateOutput:
    """SGLang's /generate answer as a GenerateOutput. A request aborted before its
    prefill comes back from SGLang releases of 2025 without `output_ids`: no tokens."""
    meta = dict(result["meta_info"])
    entries = meta.pop("output_token_logprobs", None) or []
    log_probs = [entry[0] for entry in entries]
    output_ids = result.get("output_ids", [entry[1] for entry in entries])
    return GenerateOutput(output_ids, log_probs, meta["finish_reason"]["type"],
                          result.get("text", ""), meta.get("prompt_tokens", 0),
                          _weight_version(meta.get("weight_version")), meta)


def decode_routed_experts(encoded: str, num_tokens: int, top_k: int) -> torch.Tensor:
    """meta_info.routed_experts -> int32 (num_tokens, num_moe_layers, top_k)."""
    values = np.frombuffer(base64.b64decode(encoded), dtype=np.int32)
    if num_tokens <= 0 or values.size % (num_tokens * top_k):
        raise ValueError(f"routed_experts holds {values.size} ids, not a whole number of "
                         f"layers for {num_tokens} tokens of top-{top_k}")
    return torch.from_numpy(values.copy()).view(num_tokens, -1, top_k)


def _weight_version(value) -> int:
    """SGLang reports a string ('default' until the first update); furlong numbers versions."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
