"""ModelRunner: the device side of the fast engine.

It owns the paged KV cache and a per-slot state for every running sequence (last
token, position, tokens generated since admission, stop conditions, sampling
settings, output buffers). A decode window is `window` steps that read and update
only that state: positions, cache slots, sampling, stop checks and output writes all
happen on the device, so nothing reaches the host between steps. Each step is
captured in a CUDA graph per batch-size bucket. The host reads back, once per window,
which slots finished, and fetches the tokens of those.

Slot `max_num_seqs` is scratch (always done): padded rows of a captured batch use it,
and writes of finished rows go to block 0, which the block manager never hands out.

For MoE models a routes buffer lies beside the KV cache, paged the same way: the
experts each MoE layer chose for the token in that cache slot (int32), written by
prefill and by every decode step, copied with the KV on copy-on-write, and read out
along a sequence's block table (`fetch_routes`) when it finishes.

LoRA: each slot's adapter slot (`lora_slot`, -1: the base model) is slot state too; a
forward with adapter rows turns its tokens' adapter slots into the model's `lora_mask`, so
one captured graph serves any mix of adapters, and one without adapter rows skips their
GEMMs (graphs are keyed by it). Larger adapter tensors (`load_lora`) drop the graphs.
"""
from __future__ import annotations

import torch

from furlong.engine.fast.kernels import decode_splits, fused_sample, paged_decode_attention
from furlong.engine.fast.model import FastDecoder
from furlong.engine.fast.sequence import Sequence
from furlong.engine.sampling import sample_tokens
from furlong.model.moe import is_moe_block
from furlong.model.varlen import varlen_causal_attention

STOP_IDS_WIDTH = 8  # per-slot stop ids; grows (dropping captured graphs) when needed
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448,
                 512, 640, 768, 896, 1024)


class ModelRunner:
    def __init__(self, hf_model, eos_ids: set[int], *, block_size: int, num_blocks: int,
                 max_num_seqs: int, max_model_len: int, cuda_graphs: bool):
        self.model = FastDecoder(hf_model)
        self.device = next(hf_model.parameters()).device
        self.dtype = next(hf_model.parameters()).dtype
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.scratch = max_num_seqs
        self.eos_ids = torch.tensor(sorted(eos_ids), device=self.device)
        self.buckets = [b for b in GRAPH_BUCKETS if b < max_num_seqs] + [max_num_seqs]
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        # (bucket, top-k/top-p filtered, with adapter rows) -> the captured decode step
        self.graphs: dict[tuple[int, bool, bool], torch.cuda.CUDAGraph] = {}
        self.free_slots = list(range(max_num_seqs))
        self.num_blocks = num_blocks
        self._allocate()

    # ---- memory -------------------------------------------------------------------------
    def _allocate(self) -> None:
        m, device, slots = self.model, self.device, self.max_num_seqs + 1
        shape = (m.num_layers, self.num_blocks, self.block_size, m.num_kv_heads, m.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=device)
        self.routes = (torch.zeros(self.num_blocks, self.block_size, len(m.moe_layers),
                                   m.top_k, dtype=torch.int32, device=device)
                       if m.moe_layers else None)
        zeros = lambda *s, dtype: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        self.block_tables = zeros(slots, self.max_blocks, dtype=torch.int32)
        self.last_token = zeros(slots, dtype=torch.int64)
        self.position = zeros(slots, dtype=torch.int64)
        self.num_new = zeros(slots, dtype=torch.int64)
        self.max_new = zeros(slots, dtype=torch.int64)
        self.step_base = zeros(slots, dtype=torch.int64)
        self.done = torch.ones(slots, dtype=torch.bool, device=device)
        self.seeds = zeros(slots, dtype=torch.int64)
        self.temperature = zeros(slots, dtype=torch.float32)
        self.top_k = zeros(slots, dtype=torch.int64)
        self.top_p = zeros(slots, dtype=torch.float32)
        self.ignore_eos = zeros(slots, dtype=torch.bool)
        self.lora_slot = torch.full((slots,), -1, dtype=torch.int64, device=device)
        self.stop_ids = torch.full((slots, STOP_IDS_WIDTH), -1, dtype=torch.int64,
                                   device=device)
        self.out_tokens = zeros(slots, self.max_model_len, dtype=torch.int64)
        self.out_log_probs = zeros(slots, self.max_model_len, dtype=torch.float32)
        self.batch_slots = torch.full((self.max_num_seqs,), self.scratch, dtype=torch.int64,
                                      device=device)

    def release(self, keep_weights: bool = False) -> None:
        """Free the KV cache, slot state, graphs and, unless `keep_weights`, the fused
        weights (the HF parameters stay; adapters move to the CPU)."""
        self.graphs.clear()
        if not keep_weights:
            self.model.release()
        self.model.lora.to("cpu")
        for name in ("k_cache", "v_cache", "routes", "out_tokens", "out_log_probs",
                     "block_tables"):
            setattr(self, name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def resume(self) -> None:
        """Rebuild what `release` freed (after the parameters are back on the device)."""
        if not self.model.fused:
            self.model.fuse()
        self.model.lora.to(self.device)
        self._allocate()

    def load_lora(self, name: str, config: dict, named_tensors: dict) -> None:
        """Load adapter `name` into the model's slots (graphs dropped when they grow)."""
        if self.model.lora.load(name, config, named_tensors):
            self.graphs.clear()

    def unload_lora(self, name: str) -> int:
        """Forget adapter `name`; returns its slot (graphs dropped when the scaling's
        dtype changes)."""
        slot, stale = self.model.lora.unload(name)
        if stale:
            self.graphs.clear()
        return slot

    @staticmethod
    def block_bytes(hf_model, block_size: int) -> int:
        """Bytes of one KV block, with its routes (int32 ids per MoE layer and top-k)."""
        config = hf_model.config
        head_dim = getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
        itemsize = next(hf_model.parameters()).element_size()
        num_moe = sum(is_moe_block(layer.mlp) for layer in hf_model.base_model.layers)
        routes = block_size * num_moe * getattr(config, "num_experts_per_tok", 0) * 4
        return (2 * config.num_hidden_layers * block_size * config.num_key_value_heads
                * head_dim * itemsize) + routes

    @property
    def route_slots(self) -> torch.Tensor | None:
        """The routes buffer by cache slot: (num_blocks * block_size, MoE layers, k)."""
        return None if self.routes is None else self.routes.flatten(0, 1)

    # ---- admission and prefill ----------------------------------------------------------
    @torch.no_grad()
    def admit(self, groups: list[list[Sequence]]) -> list[bool]:
        """Give every member a slot, load its settings, prefill each group's prompt once
        and sample every member's first token from the shared last position. Returns
        which members finished already (one token was all they could have)."""
        members = [seq for group in groups for seq in group]
        for seq in members:
            seq.slot = self.free_slots.pop()
        self._load_settings(members)
        self.sync_tables(members)
        leaders = [group[0] for group in groups]
        hidden = self._prefill([seq.token_ids for seq in leaders],
                               [seq.block_table for seq in leaders],
                               [seq.lora_slot for seq in leaders])
        rows = torch.tensor([g for g, group in enumerate(groups) for _ in group],
                            device=self.device)
        slots = self._slot_tensor(members)
        logits = self.model.logits(hidden[rows])
        tokens, log_probs = self._sample(logits, slots)
        self._record(slots, tokens, log_probs)
        return self.done[slots].tolist()

    def _load_settings(self, seqs: list[Sequence]) -> None:
        slots = self._slot_tensor(seqs)
        values = lambda attr, dtype: torch.tensor(  # noqa: E731
            [attr(s) for s in seqs], dtype=dtype, device=self.device)
        self.position[slots] = values(lambda s: s.num_tokens - 1, torch.int64)
        self.last_token[slots] = values(lambda s: s.token_ids[-1], torch.int64)
        self.num_new[slots] = 0
        self.max_new[slots] = values(lambda s: s.remaining, torch.int64)
        self.step_base[slots] = values(lambda s: s.num_generated, torch.int64)
        self.seeds[slots] = values(lambda s: s.seed, torch.int64)
        self.temperature[slots] = values(lambda s: s.params.temperature, torch.float32)
        self.top_k[slots] = values(lambda s: s.params.top_k, torch.int64)
        self.top_p[slots] = values(lambda s: s.params.top_p, torch.float32)
        self.ignore_eos[slots] = values(lambda s: s.params.ignore_eos, torch.bool)
        self.lora_slot[slots] = values(lambda s: s.lora_slot, torch.int64)
        stop = [list(s.params.stop_token_ids) for s in seqs]
        self._fit_stop_ids(max(len(ids) for ids in stop))
        width = self.stop_ids.shape[1]
        self.stop_ids[slots] = torch.tensor(
            [ids + [-1] * (width - len(ids)) for ids in stop], device=self.device)
        self.done[slots] = False

    def _fit_stop_ids(self, width: int) -> None:
        """Widen the stop-id table to `width` columns; graphs captured on it are dropped."""
        if width <= self.stop_ids.shape[1]:
            return
        wider = torch.full((self.stop_ids.shape[0], width), -1, dtype=torch.int64,
                           device=self.device)
        wider[:, :self.stop_ids.shape[1]] = self.stop_ids
        self.stop_ids = wider
        self.graphs.clear()

    def _prefill(self, prompts: list[list[int]], tables: list[list[int]],
                 lora_slots: list[int]) -> torch.Tensor:
        """Run the prompts as one packed batch (each with its adapter slot); returns each
        prompt's last hidden state."""
        lengths = [len(p) for p in prompts]
        ids = torch.tensor([t for p in prompts for t in p], device=self.device)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(self.device)
        slot_mapping = torch.tensor(
            [table[p // self.block_size] * self.block_size + p % self.block_size
             for table, n in zip(tables, lengths, strict=True) for p in range(n)],
            device=self.device)
        cu = torch.tensor([0] + lengths, device=self.device).cumsum(0)

        def attend(layer, query, key, value):
            return varlen_causal_attention(query, key, value, cu, max(lengths), self.model.scale)

        adapters = torch.tensor(lora_slots, device=self.device).repeat_interleave(
            torch.tensor(lengths, device=self.device))
        lora_mask = self.model.lora.mask(adapters) if max(lora_slots) >= 0 else None
        with torch.no_grad():
            hidden = self.model(ids, positions, self.k_cache, self.v_cache, slot_mapping, attend,
                                return_kv=True, routes=self.route_slots, lora_mask=lora_mask)
        return hidden[cu[1:] - 1]

    # ---- decode -------------------------------------------------------------------------
    def decode_window(self, seqs: list[Sequence], window: int) -> list[bool]:
        """`window` decode steps for `seqs`; returns which of them finished."""
        bucket = next(b for b in self.buckets if b >= len(seqs))
        slots = self._slot_tensor(seqs)
        self.batch_slots.fill_(self.scratch)
        self.batch_slots[:len(seqs)] = slots
        step = (bucket, any(s.params.top_k > 0 or s.params.top_p < 1 for s in seqs),
                any(s.lora_slot >= 0 for s in seqs))
        for _ in range(window):
            if self.use_graphs:
                self._graph(*step).replay()
            else:
                self._decode_step(*step)
        return self.done[slots].tolist()

    def _graph(self, bucket: int, filtered: bool, adapted: bool) -> torch.cuda.CUDAGraph:
        """The decode step of `bucket` rows, with top-k/top-p filtering or without, with
        the adapters' terms or without."""
        key = (bucket, filtered, adapted)
        if key not in self.graphs:
            saved = self.batch_slots.clone()
            self.batch_slots.fill_(self.scratch)  # capture on scratch rows: no state change
            self._decode_step(*key)   # warm up (compiles kernels)
            graph = torch.cuda.CUDAGraph()
            pool = next(iter(self.graphs.values())).pool() if self.graphs else None
            with torch.cuda.graph(graph, pool=pool):
                self._decode_step(*key)
            self.graphs[key] = graph
            self.batch_slots.copy_(saved)
        return self.graphs[key]

    def capture_graphs(self) -> None:
        """Capture every bucket without filtering, largest first (later ones reuse its
        memory pool); filtered steps are captured when first needed."""
        if self.use_graphs:
            for bucket in reversed(self.buckets):
                self._graph(bucket, False, False)

    @torch.no_grad()
    def _decode_step(self, bucket: int, filtered: bool, adapted: bool) -> None:
        slots = self.batch_slots[:bucket]
        active = ~self.done[slots]
        positions = self.position[slots]
        tables = self.block_tables[slots]
        blocks = tables.gather(1, (positions // self.block_size)[:, None]).squeeze(1).long()
        # Finished and padded rows write their KV to scratch block 0.
        slot_mapping = torch.where(active, blocks * self.block_size
                                   + positions % self.block_size, 0)
        context = (positions + 1).to(torch.int32)
        splits = decode_splits(bucket, self.model.num_kv_heads)

        def attend(layer, query, key, value):
            return paged_decode_attention(query, self.k_cache[layer], self.v_cache[layer],
                                          tables, context, self.model.scale, splits)

        hidden = self.model(self.last_token[slots], positions, self.k_cache, self.v_cache,
                            slot_mapping, attend, return_kv=False, routes=self.route_slots,
                            lora_mask=self.model.lora.mask(self.lora_slot[slots])
                            if adapted else None)
        tokens, log_probs = self._sample(self.model.logits(hidden), slots, filtered)
        self._record(slots, tokens, log_probs)

    def _sample(self, logits, slots, filtered: bool | None = None):
        steps = self.step_base[slots] + self.num_new[slots]
        if filtered is None:
            filtered = bool(((self.top_k[slots] > 0) | (self.top_p[slots] < 1)).any())
        if filtered:  # no filter test inside: it would read back to the host every step
            return sample_tokens(logits, self.temperature[slots], self.top_k[slots],
                                 self.top_p[slots], self.seeds[slots], steps, filtered=True)
        return fused_sample(logits, self.temperature[slots], self.seeds[slots], steps)

    def _record(self, slots, tokens, log_probs) -> None:
        """Append each active row's token, then mark rows that hit a stop condition."""
        active = ~self.done[slots]
        count = self.num_new[slots]
        column = count.clamp(max=self.max_model_len - 1)
        self.out_tokens[slots, column] = torch.where(active, tokens,
                                                     self.out_tokens[slots, column])
        self.out_log_probs[slots, column] = torch.where(active, log_probs,
                                                        self.out_log_probs[slots, column])
        count = count + active.long()
        eos = (tokens[:, None] == self.eos_ids[None]).any(1) & ~self.ignore_eos[slots]
        stop = eos | (tokens[:, None] == self.stop_ids[slots]).any(1)
        self.done[slots] = self.done[slots] | (active & (stop | (count >= self.max_new[slots])))
        self.num_new[slots] = count
        self.last_token[slots] = torch.where(active, tokens, self.last_token[slots])
        self.position[slots] = self.position[slots] + active.long()

    # ---- host side ----------------------------------------------------------------------
    def _slot_tensor(self, seqs: list[Sequence]) -> torch.Tensor:
        return torch.tensor([s.slot for s in seqs], dtype=torch.int64, device=self.device)

    def sync_tables(self, seqs: list[Sequence]) -> None:
        """Copy block-table entries that changed on the host to the device, in one write."""
        rows, columns, values = [], [], []
        for seq in seqs:
            start = seq.table_synced
            rows += [seq.slot] * (len(seq.block_table) - start)
            columns += range(start, len(seq.block_table))
            values += seq.block_table[start:]
            seq.table_synced = len(seq.block_table)
        if rows:
            self.block_tables[torch.tensor(rows, device=self.device),
                              torch.tensor(columns, device=self.device)] = torch.tensor(
                values, dtype=torch.int32, device=self.device)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (every layer, K and V)."""
        if copies:
            source = torch.tensor([s for s, _ in copies], device=self.device)
            target = torch.tensor([t for _, t in copies], device=self.device)
            self.k_cache[:, target] = self.k_cache[:, source]
            self.v_cache[:, target] = self.v_cache[:, source]
            if self.routes is not None:
                self.routes[target] = self.routes[source]

    def fetch(self, seqs: list[Sequence]) -> list[tuple[list[int], list[float]]]:
        """Tokens and log-probs each sequence generated since its admission."""
        if not seqs:
            return []
        slots = self._slot_tensor(seqs)
        counts = self.num_new[slots].tolist()
        width = max(max(counts), 1)
        tokens = self.out_tokens[slots, :width].tolist()
        log_probs = self.out_log_probs[slots, :width].tolist()
        return [(t[:n], lp[:n]) for t, lp, n in zip(tokens, log_probs, counts, strict=True)]

    def fetch_routes(self, seq: Sequence, num_tokens: int) -> torch.Tensor | None:
        """(num_tokens, MoE layers, k) int32 on the CPU: the experts chosen for the first
        `num_tokens` tokens of `seq` (read along its block table); None for dense models."""
        if self.routes is None:
            return None
        positions = torch.arange(num_tokens)
        table = torch.tensor(seq.block_table, dtype=torch.int64)
        slots = table[positions // self.block_size] * self.block_size \
            + positions % self.block_size
        return self.route_slots[slots.to(self.device)].cpu()

    def free(self, seq: Sequence) -> None:
        self.done[seq.slot] = True
        self.free_slots.append(seq.slot)
        seq.slot = None
