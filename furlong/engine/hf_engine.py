"""The simple engine: batched sampling with HF transformers modules and their KV cache.

Runs any architecture that `AutoModelForCausalLM` knows, on CPU or GPU. Requests that
arrive while a batch is running wait for the next one (static batching): simple and
correct, the reference the fast GPU engine is tested against. Stop conditions, in
the order checked after each token: abort, stop token ids and EOS (unless
`ignore_eos`), stop strings, max new tokens, max context.

With `return_routed_experts` on an MoE model, the experts every router chose are recorded
in each forward (model/moe.py's `RoutingReplay`) and kept per request: the prefill's for
its prompt, then one row for each generated token fed back in.

LoRA adapters are applied un-merged (engine/fast/lora.py, shared with the fast engine:
why un-merged is said there): while a batch decodes, a forward hook on each adapted
nn.Linear adds every row's own adapter term, so base rows and rows of several adapters
share one batch, and the base parameters keep their HF names (weight updates by name
work as before). A request's adapter is looked up when its batch starts; one unloaded
meanwhile finishes it with 'abort'. Unloading waits for the running batch to end.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from transformers import DynamicCache

from furlong.engine.base import GenerateOutput, SamplingParams, check_lora_path
from furlong.engine.fast.lora import LoraAdapters, LoraGroup
from furlong.engine.sampling import sample_tokens
from furlong.engine.scoring import token_log_probs
from furlong.engine.stops import ended_on_stop_token, response_text, stop_string_end
from furlong.model.loading import eos_token_ids, load_named_tensors
from furlong.model.moe import RoutingReplay, is_moe


@dataclass
class _Request:
    input_ids: list[int]
    params: SamplingParams
    future: asyncio.Future
    seed: int
    return_routed_experts: bool = False
    lora_path: str | None = None  # the adapter's name (None: the base model)
    cancelled: bool = False  # the caller gave up on it: its row stops (finish "abort")


class _Row:
    """Bookkeeping of one request inside a running batch."""

    def __init__(self, request: _Request, max_new_tokens: int, lora_slot: int | None):
        self.request = request
        self.max_new_tokens = max_new_tokens
        self.lora_slot = lora_slot  # None: its adapter is gone, the row ends as aborted
        self.output_ids: list[int] = []
        self.log_probs: list[float] = []
        self.finish_reason: str | None = ("abort" if lora_slot is None else
                                          None if max_new_tokens > 0 else "length")
        self.routes: list[torch.Tensor] = []  # (tokens, num_moe_layers, k) per forward

    def accept(self, token: int, log_prob: float, eos_ids: set[int], tokenizer) -> None:
        params = self.request.params
        self.output_ids.append(token)
        self.log_probs.append(log_prob)
        if ended_on_stop_token(self.output_ids, params, eos_ids) or (params.stop and (
                stop_string_end(tokenizer, self.output_ids, params.stop,
                                len(self.output_ids) - 1) is not None)):
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.max_new_tokens:
            self.finish_reason = "length"

    def output(self, tokenizer, eos_ids: set[int], version: int) -> GenerateOutput:
        reason = self.finish_reason or "abort"
        text = response_text(tokenizer, self.output_ids, self.request.params, reason, eos_ids)
        return GenerateOutput(self.output_ids, self.log_probs, reason, text,
                              len(self.request.input_ids), version,
                              routed_experts=self.routed_experts())

    def routed_experts(self) -> torch.Tensor | None:
        """Every processed token's experts but the last token's; None unless asked, or
        when no forward ran for this request."""
        if not (self.request.return_routed_experts and self.routes):
            return None
        count = len(self.request.input_ids) + len(self.output_ids) - 1
        return torch.cat(self.routes)[:count]


def _keep_routes(rows: list[_Row], routes: torch.Tensor, step: int) -> None:
    """Hand each row the routes (B * S, num_moe_layers, k) of its tokens in this forward:
    the prefill's last len(prompt) columns (left padding), then the token fed back at
    `step`, when it is the row's own last output (a finished row's feeds are dropped)."""
    routes = routes.view(len(rows), -1, *routes.shape[1:])
    for row, row_routes in zip(rows, routes, strict=True):
        if step == 0:
            row.routes.append(row_routes[routes.shape[1] - len(row.request.input_ids):])
        elif len(row.output_ids) == step:
            row.routes.append(row_routes)


class HFEngine:
    """Engine over an HF causal LM that it owns (weights arrive by name)."""

    def __init__(self, model, tokenizer, max_context_len: int | None = None,
                 max_batch_size: int = 512, default_seed: int = 0):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._routing = RoutingReplay(model) if is_moe(model) else None
        self.eos_ids = eos_token_ids(model, tokenizer)
        # transformers renamed past_key_values to cache (5.2x); accept both.
        forward = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward else "past_key_values"
        self.max_context_len = max_context_len or model.config.max_position_embeddings
        self.max_batch_size = max_batch_size
        self.weight_version = 0
        self._pending: list[_Request] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._abort = threading.Event()
        self._model_lock = threading.Lock()
        self._next_seed = default_seed
        weight = next(model.parameters())
        self.lora = LoraAdapters(_linear_groups(model), weight.dtype, weight.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    async def generate(self, input_ids: list[int], params: SamplingParams,
                       return_routed_experts: bool = False,
                       lora_path: str | None = None) -> GenerateOutput:
        check_lora_path(lora_path, self.lora.names)
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._serve())
        seed = params.sampling_seed
        if seed is None:
            seed, self._next_seed = self._next_seed, self._next_seed + 1
        request = _Request(list(input_ids), params, loop.create_future(), seed,
                           return_routed_experts and self._routing is not None, lora_path)
        self._pending.append(request)
        self._wake.set()
        try:
            return await request.future
        except asyncio.CancelledError:  # abort this one request
            request.cancelled = True
            if request in self._pending:
                self._pending.remove(request)
            raise

    async def score(self, input_ids: list[int]) -> list[float]:
        """log p(token i | tokens before it) for i >= 1 (engine/scoring.py), the base
        model's (no adapter), between generation batches."""
        return await asyncio.to_thread(self._score, list(input_ids))

    def _score(self, input_ids: list[int]) -> list[float]:
        with self._model_lock:
            return token_log_probs(self.model, input_ids)

    async def _serve(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[:self.max_batch_size]
                del self._pending[:len(batch)]
                try:
                    outputs = await asyncio.to_thread(self._generate_batch, batch)
                except Exception as error:  # hand the failure to every waiting caller
                    for request in batch:
                        if not request.future.done():
                            request.future.set_exception(error)
                    continue
                for request, output in zip(batch, outputs, strict=True):
                    if not request.future.done():
                        request.future.set_result(output)

    @torch.no_grad()
    def _generate_batch(self, requests: list[_Request]) -> list[GenerateOutput]:
        with self._model_lock:
            rows = [_Row(r, min(r.params.max_new_tokens, self.max_context_len - len(r.input_ids)),
                         self._lora_slot(r.lora_path)) for r in requests]
            with self._adapters_applied(rows):
                self._decode(rows)
            return [row.output(self.tokenizer, self.eos_ids, self.weight_version)
                    for row in rows]

    def _lora_slot(self, lora_path: str | None) -> int | None:
        """The adapter slot of a request (-1: base); None when its adapter was unloaded."""
        if lora_path is not None and lora_path not in self.lora.names:
            return None
        return self.lora.slot(lora_path)

    @contextlib.contextmanager
    def _adapters_applied(self, rows: list[_Row]):
        """While decoding `rows`: each adapted linear layer adds each row's adapter term
        (every token of a row takes the row's adapter)."""
        slots = [row.lora_slot for row in rows if row.lora_slot is not None]
        if self.lora.slots is None or max(slots, default=-1) < 0:
            yield  # base rows only
            return
        mask = self.lora.mask(torch.tensor([[-1 if row.lora_slot is None else row.lora_slot]
                                            for row in rows], device=self.device))  # (B, 1)
        lora = self.lora.slots
        modules = dict(self.model.named_modules())
        hooks = [modules[key].register_forward_hook(
            lambda module, inputs, out, key=key: lora.apply(key, inputs[0], out, mask))
            for key in lora.keys]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def _decode(self, rows: list[_Row]) -> None:
        device = self.device
        prompt_lens = [len(row.request.input_ids) for row in rows]
        width = max(prompt_lens)
        pad = self.tokenizer.pad_token_id or 0
        # Left padding, so every row's next token sits in the last column.  (B, width)
        input_ids = torch.tensor([[pad] * (width - n) + row.request.input_ids
                                  for row, n in zip(rows, prompt_lens, strict=True)], device=device)
        attention = torch.tensor([[0] * (width - n) + [1] * n for n in prompt_lens], device=device)
        params = [row.request.params for row in rows]
        temperature = torch.tensor([p.temperature for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device)
        top_k = torch.tensor([p.top_k for p in params], device=device)
        seeds = torch.tensor([row.request.seed for row in rows], device=device)
        cache = DynamicCache()
        record = any(row.request.return_routed_experts for row in rows)
        step = 0
        while not self._abort.is_set() and any(row.finish_reason is None for row in rows):
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            if step:
                positions = positions[:, -1:]
            if record:
                self._routing.record()
            logits = self.model(input_ids=input_ids, attention_mask=attention,
                                position_ids=positions, use_cache=True,
                                **{self._cache_kwarg: cache}).logits[:, -1]
            if record:
                _keep_routes(rows, self._routing.take_recorded(), step)
            steps = torch.full_like(seeds, step)
            tokens, log_probs = sample_tokens(logits, temperature, top_k, top_p, seeds, steps)
            for row, token, log_prob in zip(rows, tokens.tolist(), log_probs.tolist(),
                                            strict=True):
                if row.finish_reason is None and row.request.cancelled:
                    row.finish_reason = "abort"
                elif row.finish_reason is None:
                    row.accept(token, log_prob, self.eos_ids, self.tokenizer)
            input_ids = tokens[:, None]
            attention = torch.cat([attention, attention.new_ones(len(rows), 1)], dim=-1)
            step += 1

    async def abort_all(self) -> None:
        """Running rows stop after their current token; queued requests return empty."""
        for request in self._pending:
            if not request.future.done():
                request.future.set_result(GenerateOutput([], [], "abort", "",
                                                         len(request.input_ids),
                                                         self.weight_version))
        self._pending.clear()
        self._abort.set()
        await asyncio.to_thread(self._wait_idle)
        self._abort.clear()

    def _wait_idle(self) -> None:
        with self._model_lock:
            pass

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                             version: int) -> None:
        await asyncio.to_thread(self._load_weights, named_tensors, version)

    def _load_weights(self, named_tensors, version: int) -> None:
        with self._model_lock:
            load_named_tensors(self.model, named_tensors)
            self.weight_version = version

    async def load_lora_adapter(self, lora_name: str, config: dict,
                                named_tensors: Iterable[tuple[str, torch.Tensor]],
                                version: int | None = None) -> None:
        """Load (or replace) adapter `lora_name` (the Engine protocol's contract)."""
        await asyncio.to_thread(self._load_lora, lora_name, config, dict(named_tensors),
                                version)

    def _load_lora(self, name: str, config: dict, tensors: dict[str, torch.Tensor],
                   version: int | None) -> None:
        with self._model_lock:
            self.lora.load(name, config, tensors)
            if version is not None:
                self.weight_version = version

    async def unload_lora_adapter(self, lora_name: str) -> None:
        check_lora_path(lora_name, self.lora.names, "lora_name")
        await asyncio.to_thread(self._unload_lora, lora_name)

    def _unload_lora(self, name: str) -> None:
        with self._model_lock:
            self.lora.unload(name)

    async def release_memory(self) -> None:
        """Nothing to release: this engine keeps no cache between batches."""

    async def resume_memory(self) -> None:
        """Nothing to resume (see release_memory)."""

    async def flush_cache(self) -> None:
        """No prefix cache survives a batch, so there is nothing to flush."""

    async def health(self) -> bool:
        return self._worker is None or not self._worker.done()

    async def close(self) -> None:
        await self.abort_all()
        if self._worker is not None:
            self._worker.cancel()


def _linear_groups(model: nn.Module) -> dict[str, LoraGroup]:
    """Every nn.Linear but the output projection, by module path: what adapters may adapt."""
    head = model.get_output_embeddings()
    return {path: LoraGroup((path,), module.in_features, (module.out_features,))
            for path, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not head}
