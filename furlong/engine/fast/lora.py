"""LoraSlots: LoRA adapters applied un-merged, several in one batch, from fixed tensors.

Both furlong engines keep the base weights as they are and add each token's adapter
term `scaling * B @ (A @ x)` to the GEMMs it targets. Un-merged, not merged into the
engine's copy, because: merging into bf16 weights loses every update below half an ulp of
W (a first step's delta ~1e-5 against an ulp of ~1e-4 at |W| ~ 0.02), so the engine would
sample the base while the trainer has moved; re-merging the next push needs the base kept
(or drifts); un-merged the engine computes what the trainer computes (the base GEMM, then
the A and B GEMMs), so the engine/trainer log-prob gap stays that of full fine-tuning;
and base requests and several adapters can share a batch.

The GEMMs adapters add to are *groups*: one projection (the HF engine: each nn.Linear)
or several fused along the output (the fast engine: q/k/v, gate/up). Per targeted group,
S slots of rank r:
    A  (S, g, r, in)    A[s, p, :rank] = lora_A of projection p (rank < r zero-padded)
    B  (out, S, g, r)   B[rows of p, s, p, :rank] = lora_B of p; zero elsewhere
`apply`, with each token's `LoraMask` (once per forward): h = x @ A.view(S*g*r, in).T;
with several slots, h times the token's one-hot slot row (exact: other slots' columns
become 0); y = h @ B.view(out, S*g*r).T; out += y * the token's scaling (0 for a base
token). Zero padding and zero blocks add exact zeros, so a token gets exactly its own
adapter's term; with B = 0 (a fresh adapter) or for a base token `out` is bit-unchanged.
The roundings are PEFT's (the trainer's): A's product, B's product, then the scaled sum
in one step, so for a power-of-two scaling (alpha = r or 2r) a bf16 engine rounds as a
bf16 trainer does, and the engine/trainer gap stays that of full fine-tuning. The scaling
multiplies in the model's dtype while every loaded one is exact in it (bf16 arithmetic
is faster: measured 19 vs 27 us for a 1.7B gate/up at 256 tokens), else in float32.

The tensors are allocated once per (groups, slots, rank) and adapters are copied into
them in place, so CUDA graphs captured over them stay valid. An adapter of a higher
rank, more targets or one more name than they hold makes `fitted` build larger ones
(holding the old slots' contents); the engine then drops its graphs. `LoraAdapters` is
an engine's table of adapters by name over its slots (both engines use it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, NamedTuple

import torch

from furlong.engine.base import check_lora_path
from furlong.model.lora_files import check_adapter_config

# `<module path>.lora_A.weight` / `.lora_B.weight` (PEFT's and SGLang's names).
_LORA_NAME = re.compile(r"(?P<path>.+)\.lora_(?P<matrix>[AB])\.weight")
# adapter_config.json keys furlong's engines do not implement (off: absent, empty, "none").
@dataclass(frozen=True)
class LoraGroup:
    """One GEMM adapters add to: its projections (HF module paths, in output order),
    input width and each projection's output width."""
    projections: tuple[str, ...]
    in_features: int
    out_features: tuple[int, ...]


def adapter_scaling(config: dict, source: str) -> float:
    """alpha / r of an adapter config (SGLang's `config_dict`, PEFT's adapter_config.json);
    a ValueError naming `source` for what the engines do not implement."""
    check_adapter_config(config, source)
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not (isinstance(rank, int) and rank > 0 and isinstance(alpha, (int, float))):
        raise ValueError(f"{source}: needs r (a positive integer) and lora_alpha, got r={rank!r}, "
                         f"lora_alpha={alpha!r}")
    return alpha / rank


def split_lora_name(name: str) -> tuple[str, str]:
    """'model.layers.0.self_attn.q_proj.lora_A.weight' -> ('model.layers.0.self_attn.q_proj',
    'A'); a ValueError for any other name."""
    match = _LORA_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not an adapter tensor name (<module>.lora_A.weight or "
                         "<module>.lora_B.weight)")
    return match["path"], match["matrix"]


def adapter_targets(named_tensors: dict[str, torch.Tensor]) -> tuple[set[str], int]:
    """(module paths, rank) of an adapter's tensors."""
    paths = {split_lora_name(name)[0] for name in named_tensors}
    ranks = {tensor.shape[0] for name, tensor in named_tensors.items()
             if split_lora_name(name)[1] == "A"}
    return paths, max(ranks, default=0)


class LoraMask(NamedTuple):
    """Which adapter each token (or row) takes: `select` (..., S) its one-hot slot (in the
    model's dtype), `scale` (..., 1) its adapter's alpha / r (0: the base model), in
    LoraSlots.scale_dtype."""
    select: torch.Tensor
    scale: torch.Tensor


class LoraSlots:
    """`num_slots` adapters of rank <= `rank` over the groups named by `keys` (of
    `groups`, which say every group an engine offers)."""

    def __init__(self, groups: dict[str, LoraGroup], keys: Iterable[str], num_slots: int,
                 rank: int, dtype: torch.dtype, device: torch.device | str):
        self.groups, self.keys = groups, frozenset(keys)
        self.num_slots, self.rank, self.dtype = num_slots, rank, dtype
        self.A = {key: torch.zeros(num_slots, len(groups[key].projections), rank,
                                   groups[key].in_features, dtype=dtype, device=device)
                  for key in self.keys}
        self.B = {key: torch.zeros(sum(groups[key].out_features), num_slots,
                                   len(groups[key].projections), rank, dtype=dtype, device=device)
                  for key in self.keys}
        self.scaling = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self._scalings = [0.0] * num_slots  # the same, on the host
        # The scaling multiplies in the model's dtype while it holds every one exactly.
        self.scale_dtype = dtype
        self._columns = torch.arange(num_slots, device=device)
        # module path -> (group key, projection index, its output rows)
        self.where: dict[str, tuple[str, int, slice]] = {}
        for key, group in groups.items():
            start = 0
            for index, (path, width) in enumerate(zip(group.projections, group.out_features,
                                                      strict=True)):
                self.where[path] = (key, index, slice(start, start + width))
                start += width

    @property
    def device(self) -> torch.device:
        return self.scaling.device

    def _set_scaling(self, slot: int, scaling: float) -> None:
        self.scaling[slot] = scaling
        self._scalings[slot] = scaling
        exact = all(torch.tensor(s).to(self.dtype).item() == s for s in self._scalings)
        self.scale_dtype = self.dtype if exact else torch.float32

    def group_keys(self, paths: Iterable[str]) -> set[str]:
        """The groups of these module paths; a ValueError for a module no group holds."""
        unknown = sorted(path for path in paths if path not in self.where)
        if unknown:
            offered = sorted({path.rsplit(".", 1)[-1] for path in self.where})
            raise ValueError(f"the engine cannot apply an adapter to {unknown[:3]}: it adapts "
                             f"the modules {', '.join(offered)} of its model (MoE experts and "
                             "other layers are not supported)")
        return {self.where[path][0] for path in paths}

    def fits(self, keys: set[str], num_slots: int, rank: int) -> bool:
        return keys <= self.keys and num_slots <= self.num_slots and rank <= self.rank

    def fitted(self, keys: set[str], num_slots: int, rank: int) -> "LoraSlots":
        """Self if it holds these, else larger slots with this one's contents."""
        if self.fits(keys, num_slots, rank):
            return self
        bigger = LoraSlots(self.groups, self.keys | keys, max(num_slots, self.num_slots),
                           max(rank, self.rank), self.dtype, self.device)
        with torch.no_grad():
            for key in self.keys:
                bigger.A[key][:self.num_slots, :, :self.rank] = self.A[key]
                bigger.B[key][:, :self.num_slots, :, :self.rank] = self.B[key]
        for slot, scaling in enumerate(self._scalings):
            bigger._set_scaling(slot, scaling)
        return bigger

    def to(self, device: torch.device | str) -> None:
        """Move every tensor (release_memory / resume_memory)."""
        for tensors in (self.A, self.B):
            for key in tensors:
                tensors[key] = tensors[key].to(device)
        self.scaling, self._columns = self.scaling.to(device), self._columns.to(device)

    @torch.no_grad()
    def load(self, slot: int, named_tensors: dict[str, torch.Tensor], scaling: float,
             source: str) -> None:
        """Copy one adapter into `slot` (everything it does not name becomes zero); the
        whole adapter is checked first (a ValueError naming `source`), so a refused one
        leaves the slot as it was."""
        placed = self._placements(named_tensors, source)
        for key in self.keys:
            self.A[key][slot].zero_()
            self.B[key][:, slot].zero_()
        for (key, index, rows, matrix), tensor in placed:
            if matrix == "A":
                self.A[key][slot, index, :tensor.shape[0]] = tensor
            else:
                self.B[key][rows, slot, index, :tensor.shape[1]] = tensor
        self._set_scaling(slot, scaling)

    def _placements(self, named_tensors: dict[str, torch.Tensor], source: str) -> list:
        """((group, projection, rows, 'A' or 'B'), tensor) of every tensor, all checked."""
        assert self.group_keys(adapter_targets(named_tensors)[0]) <= self.keys, "fit first"
        placed, ranks = [], {}
        for name, tensor in named_tensors.items():
            path, matrix = split_lora_name(name)
            key, index, rows = self.where[path]
            out_rows, in_features = rows.stop - rows.start, self.groups[key].in_features
            rank, other, expected = ((tensor.shape[0], tensor.shape[-1], in_features)
                                     if matrix == "A" else
                                     (tensor.shape[-1], tensor.shape[0], out_rows))
            if tensor.dim() != 2 or other != expected or rank > self.rank:
                raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}; the module "
                                 f"is ({out_rows}, {in_features}) and the slots' rank "
                                 f"{self.rank}")
            ranks.setdefault(path, {})[matrix] = rank
            placed.append(((key, index, rows, matrix), tensor))
        unpaired = sorted(path for path, pair in ranks.items()
                          if set(pair) != {"A", "B"} or pair["A"] != pair["B"])
        if unpaired:
            raise ValueError(f"{source}: {unpaired[:3]} need lora_A (r, in) and lora_B (out, r) "
                             "of one rank r")
        return placed

    def unload(self, slot: int) -> None:
        """Zero a slot (no token uses it until another adapter is loaded there)."""
        with torch.no_grad():
            for key in self.keys:
                self.A[key][slot].zero_()
                self.B[key][:, slot].zero_()
        self._set_scaling(slot, 0.0)

    def token_mask(self, slot_ids: torch.Tensor) -> LoraMask:
        """slot_ids (...,) of each token or row (-1: the base model) -> its LoraMask."""
        select = slot_ids[..., None] == self._columns                          # (..., S)
        scale = torch.where(select, self.scaling, 0.0).sum(-1, keepdim=True)  # (..., 1)
        return LoraMask(select.to(self.dtype), scale.to(self.scale_dtype))

    def apply(self, key: str, x: torch.Tensor, out: torch.Tensor,
              mask: LoraMask) -> torch.Tensor:
        """out (..., out) += each token's adapter term of x (..., in), in place; the mask's
        leading dimensions broadcast over x's. Returns out. A group no adapter targets is
        left alone."""
        if key not in self.keys:
            return out
        A, B = self.A[key], self.B[key]
        h = x @ A.flatten(0, 2).T                                         # (..., S*g*r)
        if self.num_slots > 1:  # one slot: the scale alone zeroes base tokens' terms
            h.unflatten(-1, (self.num_slots, -1)).mul_(mask.select[..., None])
        return out.addcmul_(h @ B.flatten(1).T, mask.scale)              # (..., out)


class LoraAdapters:
    """An engine's adapters: name -> slot, over LoraSlots built (and grown) on demand for
    the `groups` its model offers. A request's adapter slot is `slot(name)` (-1: base)."""

    def __init__(self, groups: dict[str, LoraGroup], dtype: torch.dtype,
                 device: torch.device | str):
        self.groups, self.dtype, self.device = groups, dtype, torch.device(device)
        self.slots: LoraSlots | None = None
        self.names: dict[str, int] = {}

    def load(self, name: str, config: dict, named_tensors: dict[str, torch.Tensor]) -> bool:
        """Load (or replace in place) adapter `name`; returns whether captured graphs must
        go (the slots were rebuilt, or the scaling's dtype changed). A ValueError naming
        the adapter for what does not fit."""
        source = f"adapter {name!r}"
        scaling = adapter_scaling(config, source)
        used = set(self.names.values())
        slot = self.names.get(name, next(i for i in range(len(used) + 1) if i not in used))
        slots = self.slots or LoraSlots(self.groups, (), 0, 0, self.dtype, self.device)
        paths, rank = adapter_targets(named_tensors)
        fitted = slots.fitted(slots.group_keys(paths), slot + 1, rank)
        scale_dtype = slots.scale_dtype
        fitted.load(slot, named_tensors, scaling, source)
        rebuilt = fitted is not self.slots or fitted.scale_dtype != scale_dtype
        self.slots = fitted
        self.names[name] = slot
        return rebuilt

    def unload(self, name: str) -> tuple[int, bool]:
        """Forget adapter `name` (its slot zeroed); returns the slot it had and whether
        captured graphs must go (the scaling's dtype changed: the others' scalings are
        now all exact in the model's dtype)."""
        check_lora_path(name, self.names, "lora_name")
        slot = self.names.pop(name)
        scale_dtype = self.slots.scale_dtype
        self.slots.unload(slot)
        return slot, self.slots.scale_dtype != scale_dtype

    def slot(self, name: str | None) -> int:
        """The adapter slot of `name` (-1 for None, the base model); KeyError if unloaded."""
        return -1 if name is None else self.names[name]

    def mask(self, slot_ids: torch.Tensor) -> LoraMask | None:
        """LoraSlots.token_mask, or None while no adapter was ever loaded."""
        return None if self.slots is None else self.slots.token_mask(slot_ids)

    def to(self, device: torch.device | str) -> None:
        """Move the slots (release_memory / resume_memory); later ones are made there."""
        self.device = torch.device(device)
        if self.slots is not None:
            self.slots.to(device)
