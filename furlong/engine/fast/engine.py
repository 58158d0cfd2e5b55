"""FastEngine: continuous batching over the paged-KV runner, behind the Engine protocol.

A background thread runs the loop: admit waiting requests (one prefill per group of
identical prompts), reserve KV blocks for a decode window, run the window on the
device, finish what stopped. Callers await asyncio futures; results cross threads
with `call_soon_threadsafe`. Weight updates, aborts and memory release take the same
lock as a loop iteration, so they never land in the middle of one.

LoRA adapters are loaded by name into the runner's adapter slots (lora.py: un-merged,
several per batch; loading a name again replaces it in place, and requests in flight on
it continue with the new tensors, as with a weight update). A request names its adapter
with `lora_path` (SGLang's field); its slot is looked up when the loop takes it in.
Unloading a name finishes the requests in flight on it with 'abort'.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import queue
import threading
from typing import Callable, Iterable

import torch

from furlong.engine.base import GenerateOutput, SamplingParams, check_lora_path
from furlong.engine.fast.block_manager import BlockManager
from furlong.engine.fast.runner import ModelRunner
from furlong.engine.fast.scheduler import Scheduler
from furlong.engine.fast.sequence import Sequence
from furlong.engine.scoring import token_log_probs
from furlong.engine.stops import ended_on_stop_token, response_text, stop_string_end
from furlong.model.loading import eos_token_ids, load_named_tensors

log = logging.getLogger(__name__)


def kv_blocks_for_memory(hf_model, block_size: int, mem_fraction: float, max_num_seqs: int,
                         max_prefill_tokens: int, max_model_len: int) -> int:
    """KV blocks that fit in `mem_fraction` of the GPU after weights and working memory."""
    config = hf_model.config
    itemsize = next(hf_model.parameters()).element_size()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    # Working memory, estimated: prefill activations, decode logits, output buffers.
    prefill = max_prefill_tokens * activation_width(config) * itemsize
    logits = 3 * max_num_seqs * config.vocab_size * 4
    outputs = 2 * (max_num_seqs + 1) * max_model_len * 8
    budget = total * mem_fraction - (total - free) - prefill - logits - outputs
    blocks = int(budget // ModelRunner.block_bytes(hf_model, block_size))
    if blocks < 2:
        raise RuntimeError(f"no room for a KV cache: {free / 2**30:.1f} GiB free of "
                           f"{total / 2**30:.1f} GiB; raise --mem-fraction-static or free "
                           "GPU memory")
    return blocks


def activation_width(config) -> int:
    """Elements of prefill activations per token: the residual stream and norms, and the
    MLP's (or each routed expert's) gate/up, activation and output."""
    dense = 6 * config.hidden_size + 3 * config.intermediate_size
    top_k = getattr(config, "num_experts_per_tok", 0) or 0
    moe_width = getattr(config, "moe_intermediate_size", 0) or 0
    return max(dense, 6 * config.hidden_size + top_k * (3 * moe_width + config.hidden_size))


class FastEngine:
    def __init__(self, hf_model, tokenizer, *, max_context_len: int | None = None,
                 mem_fraction_static: float = 0.85, block_size: int = 16,
                 max_num_seqs: int = 256, max_prefill_tokens: int = 16384, window: int = 8,
                 kv_cache_tokens: int | None = None, cuda_graphs: bool = True,
                 default_seed: int = 0, shared_weights: bool = False):
        """`shared_weights`: `hf_model`'s parameters are a trainer's in this process too
        (a LoRA run's frozen base): releasing memory leaves them, fused, on the device."""
        device = next(hf_model.parameters()).device
        if device.type == "cuda" and block_size % 16:
            raise ValueError(f"block size {block_size}: the GPU attention kernel needs a "
                             "multiple of 16")
        self.model = hf_model.eval()
        self.shared_weights = shared_weights
        self.tokenizer = tokenizer
        self.window = window
        self.max_context_len = max_context_len or hf_model.config.max_position_embeddings
        if kv_cache_tokens is not None or device.type != "cuda":
            num_blocks = -(-(kv_cache_tokens or 65536) // block_size) + 1
        else:
            num_blocks = kv_blocks_for_memory(hf_model, block_size, mem_fraction_static,
                                              max_num_seqs, max_prefill_tokens,
                                              self.max_context_len)
        self.eos_ids = eos_token_ids(hf_model, tokenizer)
        self.runner = ModelRunner(hf_model, self.eos_ids, block_size=block_size,
                                  num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                                  max_model_len=self.max_context_len, cuda_graphs=cuda_graphs)
        self.scheduler = Scheduler(BlockManager(num_blocks, block_size), max_num_seqs,
                                   max_prefill_tokens)
        self.weight_version = 0
        self.lora = self.runner.model.lora  # the adapters by name
        self._seeds = itertools.count(default_seed)
        self._inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        # score requests: (input ids, a callable that takes the answer), run by the loop
        self._scores: queue.SimpleQueue[tuple[list[int], Callable]] = queue.SimpleQueue()
        self._cancelled: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._abort_requested = False
        self._closed = False
        self._released = False  # release_memory until resume_memory
        self._died: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="fast-engine", daemon=True)
        self._thread.start()
        log.info("fast engine: %d KV blocks of %d tokens, %d sequences at most",
                 num_blocks, block_size, max_num_seqs)

    # ---- the Engine protocol ------------------------------------------------------------
    async def generate(self, input_ids: list[int], params: SamplingParams,
                       return_routed_experts: bool = False,
                       lora_path: str | None = None) -> GenerateOutput:
        check_lora_path(lora_path, self.lora.names)
        max_new = min(params.max_new_tokens, self.max_context_len - len(input_ids))
        if max_new <= 0:
            return GenerateOutput([], [], "length", "", len(input_ids), self.weight_version)
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def on_finish(seq: Sequence) -> None:
            output = self._output(seq)
            loop.call_soon_threadsafe(_resolve, future, output)

        seed = params.sampling_seed if params.sampling_seed is not None else next(self._seeds)
        seq = Sequence(list(input_ids), params, seed, max_new, on_finish,
                       return_routed_experts=return_routed_experts, lora_name=lora_path)
        self._inbox.put(seq)
        self._wake.set()
        self._check_alive()  # a dead loop would never take `seq`
        try:
            return await future
        except asyncio.CancelledError:  # the caller gave up on it: abort this one request
            self._cancelled.put(seq)
            self._wake.set()
            raise

    async def score(self, input_ids: list[int]) -> list[float]:
        """log p(token i | tokens before it) for i >= 1 (engine/scoring.py): a forward of
        the HF modules whose parameters the engine computes with, the base model's (no
        adapter), run by the loop between two of its steps."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._scores.put((list(input_ids),
                          lambda answer: loop.call_soon_threadsafe(_resolve, future, answer)))
        self._wake.set()
        self._check_alive()
        return await future

    def _check_alive(self) -> None:
        """A request the loop will never take is an error now, not a wait forever."""
        if self._died is not None or (not self._thread.is_alive() and not self._closed):
            raise RuntimeError(f"the fast engine's loop died ({self._died!r}): restart the "
                               "engine")
        if self._closed:
            raise RuntimeError("the fast engine is closed")

    async def abort_all(self) -> None:
        with self._lock:
            self._abort_requested = True
        self._wake.set()
        await asyncio.to_thread(self._wait_abort)

    def _wait_abort(self) -> None:
        """Until the loop has aborted everything, or has died (nothing is left to abort
        then, and waiting would never end: a run that failed must still shut down)."""
        while self._thread.is_alive():
            with self._lock:
                if not self._abort_requested:
                    return
            self._wake.set()
            threading.Event().wait(0.001)

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                             version: int) -> None:
        await asyncio.to_thread(self._load_weights, named_tensors, version)

    def _load_weights(self, named_tensors, version: int) -> None:
        with self._lock:
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
        with self._lock:
            self.runner.load_lora(name, config, tensors)
            if version is not None:
                self.weight_version = version

    async def unload_lora_adapter(self, lora_name: str) -> None:
        check_lora_path(lora_name, self.lora.names, "lora_name")
        await asyncio.to_thread(self._unload_lora, lora_name)

    def _unload_lora(self, name: str) -> None:
        with self._lock:
            self._take_requests()
            slot = self.runner.unload_lora(name)
            self._abort([seq for seq in list(self.scheduler.running) + list(self.scheduler.waiting)
                         if seq.lora_slot == slot])

    async def release_memory(self) -> None:
        """Finish requests in flight (abort), free the KV cache and move the weights to the
        CPU (shared ones stay)."""
        await self.abort_all()
        with self._lock:
            self._released = True
            self.runner.release(keep_weights=self.shared_weights)
            if not self.shared_weights:
                self.model.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    async def resume_memory(self) -> None:
        with self._lock:
            if not self.shared_weights:
                self.model.to(self.runner.device)
            self.runner.resume()
            self._released = False

    async def flush_cache(self) -> None:
        """No prefix cache outlives a request, so there is nothing to flush."""

    async def health(self) -> bool:
        return self._thread.is_alive()

    async def close(self) -> None:
        await self.abort_all()
        self._closed = True
        self._wake.set()

    # ---- the loop -----------------------------------------------------------------------
    def _loop(self) -> None:
        """Serve until closed; then, or when the loop dies, nothing will answer again: every
        request still held or queued is told so."""
        try:
            self._serve()
        except BaseException as error:
            self._died = error
            self._answer_everything(RuntimeError(f"the fast engine's loop died: {error!r}"))
            raise
        self._answer_everything(RuntimeError("the fast engine is closed"))

    def _answer_everything(self, error: RuntimeError) -> None:
        """Finish every request held or queued with `error`."""
        held = list(self.scheduler.running) + list(self.scheduler.waiting) + _drain(self._inbox)
        for seq in held:
            seq.finish_reason = error
        answers = [functools.partial(seq.on_finish, seq) for seq in held]
        answers += [functools.partial(answer, error) for _, answer in _drain(self._scores)]
        for answer in answers:
            _hand_back(answer)

    def _serve(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            while not self._closed:
                with self._lock:
                    try:
                        self._take_requests()
                        self._score_waiting()
                        if self._abort_requested:
                            self._abort_everything()
                            self._abort_requested = False
                        if self.scheduler.idle:
                            break
                        self._step()
                    except Exception as error:  # every waiting caller gets the failure
                        log.exception("fast engine step failed")
                        self._fail_everything(error)

    def _score_waiting(self) -> None:
        """Answer the score requests that came in (a failure goes to its caller alone);
        while the engine's memory is released, each is refused."""
        for input_ids, answer in _drain(self._scores):
            try:
                if self._released:
                    raise ValueError("the engine's memory is released (--offload-rollout); "
                                     "score after it resumes")
                result = token_log_probs(self.model, input_ids)
            except Exception as error:  # noqa: BLE001 - the caller gets it
                result = error
            _hand_back(functools.partial(answer, result))

    def _take_requests(self) -> None:
        """New requests join the scheduler; cancelled ones that have not finished are
        aborted. Cancellations are read first: each comes after its request, so the
        inbox drained next holds every request a cancellation names."""
        cancelled = _drain(self._cancelled)
        for seq in _drain(self._inbox):
            if seq.lora_name is not None and seq.lora_name not in self.lora.names:
                self._finish(seq, [], [], "abort")  # its adapter was unloaded meanwhile
                continue
            seq.lora_slot = self.lora.slot(seq.lora_name)
            self.scheduler.add(seq)
        self._abort([seq for seq in cancelled if seq.finish_reason is None])

    def _step(self) -> None:
        groups = self.scheduler.admit()
        if groups:
            done = self.runner.admit(groups)
            self._after_tokens([seq for group in groups for seq in group], done, 1)
        if self.scheduler.running:
            copies = self.scheduler.reserve_window(self.window, self._preempt)
            self.runner.copy_blocks(copies)
            self.runner.sync_tables(self.scheduler.running)
            running = list(self.scheduler.running)
            done = self.runner.decode_window(running, self.window)
            self._after_tokens(running, done, self.window)

    def _after_tokens(self, seqs: list[Sequence], done: list[bool], count: int) -> None:
        """Book the `count` tokens each unfinished sequence made; finish the rest."""
        for seq, finished in zip(seqs, done, strict=True):
            if not finished:
                seq.num_generated += count
        # One read-back: the finished sequences, and those whose stop strings the host
        # checks (one may also have completed in the window where the device stopped).
        fetched = [(seq, finished) for seq, finished in zip(seqs, done, strict=True)
                   if finished or seq.needs_host_tokens]
        outputs = self.runner.fetch([seq for seq, _ in fetched])
        for (seq, finished), (tokens, log_probs) in zip(fetched, outputs, strict=True):
            keep = self._stop_string_keep(seq, tokens) if seq.needs_host_tokens else None
            if keep is not None:
                self._finish(seq, tokens[:keep], log_probs[:keep], "stop")
            elif finished:
                self._finish(seq, tokens, log_probs)

    def _stop_string_keep(self, seq: Sequence, tokens: list[int]) -> int | None:
        """How many of the new `tokens` to keep if they complete one of `seq`'s stop
        strings (searching only the tokens not searched before); None if none does."""
        ids = seq.output_ids + tokens
        end = stop_string_end(self.tokenizer, ids, seq.params.stop,
                              max(seq.stop_checked, len(seq.output_ids)))
        seq.stop_checked = len(ids)
        return None if end is None else end - len(seq.output_ids)

    def _finish(self, seq: Sequence, tokens: list[int], log_probs: list[float],
                reason: str | None = None) -> None:
        seq.output_ids += tokens
        seq.output_log_probs += log_probs
        seq.num_generated = len(seq.output_ids)
        if reason is None:
            stopped = ended_on_stop_token(seq.output_ids, seq.params, self.eos_ids)
            reason = "stop" if stopped else "length"
        if seq.slot is not None:
            if seq.return_routed_experts:  # every processed token: all but the last one
                seq.routed_experts = self.runner.fetch_routes(seq, seq.num_tokens - 1)
            self.runner.free(seq)
        self.scheduler.finish(seq, reason)
        seq.on_finish(seq)

    def _preempt(self, seq: Sequence) -> None:
        ((tokens, log_probs),) = self.runner.fetch([seq])
        seq.output_ids += tokens
        seq.output_log_probs += log_probs
        seq.num_generated = len(seq.output_ids)
        self.runner.free(seq)

    def _abort_everything(self) -> None:
        self._abort(list(self.scheduler.running) + list(self.scheduler.waiting))

    def _abort(self, seqs: list[Sequence]) -> None:
        """Finish `seqs` (running or waiting) with 'abort' and the tokens made so far."""
        running = [seq for seq in seqs if seq.slot is not None]
        waiting = [seq for seq in seqs if seq.slot is None]
        for seq, (tokens, log_probs) in zip(running, self.runner.fetch(running), strict=True):
            self._finish(seq, tokens, log_probs, "abort")
        for seq in waiting:
            self._finish(seq, [], [], "abort")

    def _fail_everything(self, error: Exception) -> None:
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            if seq.slot is not None:
                self.runner.free(seq)
            self.scheduler.finish(seq, "abort")
            seq.finish_reason = error
            seq.on_finish(seq)

    def _output(self, seq: Sequence) -> GenerateOutput | Exception:
        if isinstance(seq.finish_reason, Exception):
            return seq.finish_reason
        text = response_text(self.tokenizer, seq.output_ids, seq.params, seq.finish_reason,
                             self.eos_ids)
        return GenerateOutput(seq.output_ids, seq.output_log_probs, seq.finish_reason, text,
                              len(seq.prompt_ids), self.weight_version,
                              routed_experts=seq.routed_experts)


def _drain(inbox: queue.SimpleQueue) -> list:
    items = []
    while True:
        try:
            items.append(inbox.get_nowait())
        except queue.Empty:
            return items


def _hand_back(answer: Callable[[], None]) -> None:
    """Call `answer`, which hands a result to a caller's event loop; best effort: the
    device or the caller's loop may be gone, and nobody is waiting then."""
    try:
        answer()
    except Exception:  # noqa: BLE001
        pass


def _resolve(future: asyncio.Future, output) -> None:
    if future.done():
        return
    if isinstance(output, Exception):
        future.set_exception(output)
    else:
        future.set_result(output)
