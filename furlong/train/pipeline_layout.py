"""Which decoder layers each pipeline rank holds: Megatron's layouts, as pure arithmetic.

The model is cut into consecutive chunks of layers, chunk c running before chunk c + 1.
  - Equal stages: P chunks of num_layers / P layers, chunk s on pipeline rank s.
  - Uneven first/last stages (--decoder-first-pipeline-num-layers F,
    --decoder-last-pipeline-num-layers L): the first chunk has F layers, the last L, and
    the layers left split equally over the other stages (they must divide equally).
  - Virtual stages (--num-layers-per-virtual-pipeline-stage n): P x V chunks of n layers,
    V = num_layers / (P n); chunk c is held by rank c % P (Megatron's and torch's
    interleaved layout), so rank r holds chunks r, r + P, r + 2P, ...
Uneven stages with virtual ones are refused. Every refusal names the flag and the fix
(config/validate.py refuses the flags without stages, or below 1).
"""
from __future__ import annotations

from dataclasses import dataclass

FIRST_FLAG = "--decoder-first-pipeline-num-layers"
LAST_FLAG = "--decoder-last-pipeline-num-layers"
VIRTUAL_FLAG = "--num-layers-per-virtual-pipeline-stage"


@dataclass(frozen=True)
class PipelineLayout:
    """The layout flags: stages, uneven first/last stage sizes, layers per virtual stage."""
    num_stages: int
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    layers_per_virtual_stage: int | None = None

    @classmethod
    def from_perf(cls, perf) -> PipelineLayout:
        """The layout of a PerfArgs."""
        return cls(perf.pipeline_model_parallel_size, perf.decoder_first_pipeline_num_layers,
                   perf.decoder_last_pipeline_num_layers,
                   perf.num_layers_per_virtual_pipeline_stage)


def chunk_layer_ranges(num_layers: int, layout: PipelineLayout) -> list[range]:
    """The consecutive layers of each model chunk, in model order (one chunk per stage
    without virtual stages)."""
    check_pipeline_layout(num_layers, layout)
    if layout.layers_per_virtual_stage is not None:
        sizes = [layout.layers_per_virtual_stage] * (num_layers
                                                     // layout.layers_per_virtual_stage)
    else:
        sizes = _stage_sizes(num_layers, layout)
    starts = [sum(sizes[:c]) for c in range(len(sizes))]
    return [range(start, start + size) for start, size in zip(starts, sizes, strict=True)]


def rank_chunks(num_layers: int, layout: PipelineLayout, stage_index: int) -> list[range]:
    """The chunks pipeline rank `stage_index` holds: chunks stage_index, + P, + 2P, ..."""
    return chunk_layer_ranges(num_layers, layout)[stage_index::layout.num_stages]


def _stage_sizes(num_layers: int, layout: PipelineLayout) -> list[int]:
    first, last = layout.first_stage_layers, layout.last_stage_layers
    ends = [size for size in (first, last) if size is not None]
    middle = layout.num_stages - len(ends)
    per_middle = (num_layers - sum(ends)) // middle if middle else 0
    return ([first] if first is not None else []) + [per_middle] * middle \
        + ([last] if last is not None else [])


def check_pipeline_layout(num_layers: int, layout: PipelineLayout) -> None:
    """Refuse a layout that cannot split the model's `num_layers` decoder layers."""
    pp = layout.num_stages
    if pp < 1:
        raise ValueError(f"--pipeline-model-parallel-size {pp}: must be > 0")
    uneven = {flag: size for flag, size in ((FIRST_FLAG, layout.first_stage_layers),
                                            (LAST_FLAG, layout.last_stage_layers))
              if size is not None}
    if layout.layers_per_virtual_stage is not None:
        _check_virtual(num_layers, pp, layout.layers_per_virtual_stage, uneven)
    elif uneven:
        _check_uneven(num_layers, pp, uneven)
    elif num_layers % pp:
        raise ValueError(f"--pipeline-model-parallel-size {pp} does not divide the model's "
                         f"{num_layers} decoder layers: choose a divisor of {num_layers}, or "
                         f"give the first/last stage other sizes ({FIRST_FLAG} / {LAST_FLAG})")


def _check_virtual(num_layers: int, pp: int, per_chunk: int, uneven: dict) -> None:
    if uneven:
        raise ValueError(f"{VIRTUAL_FLAG} with {' / '.join(uneven)}: uneven stages with "
                         "virtual stages are not supported in this build; give one or the other")
    if per_chunk < 1 or num_layers % (pp * per_chunk):
        raise ValueError(f"{VIRTUAL_FLAG} {per_chunk} with --pipeline-model-parallel-size {pp} "
                         f"does not split the model's {num_layers} decoder layers: each rank "
                         "holds num_layers / (pp x n) chunks of n layers; choose n so that "
                         f"pp x n divides {num_layers}")


def _check_uneven(num_layers: int, pp: int, uneven: dict[str, int]) -> None:
    given = " and ".join(f"{flag} {size}" for flag, size in uneven.items())
    where = f"{given} with --pipeline-model-parallel-size {pp}"
    left, middle = num_layers - sum(uneven.values()), pp - len(uneven)
    if middle == 0 and left:
        raise ValueError(f"{where}: two stages hold all the model's {num_layers} decoder "
                         f"layers, so the first and last stage sizes must sum to {num_layers}")
    if left < middle:
        raise ValueError(f"{where}: the model has {num_layers} decoder layers, which leaves "
                         f"{max(left, 0)} for the other {middle} stage(s), fewer than one each; "
                         "make the first/last stages smaller or use fewer stages")
    if middle and left % middle:
        raise ValueError(f"{where}: the {left} decoder layers left (of {num_layers}) do not "
                         f"split equally over the other {middle} stage(s); change the "
                         f"first/last stage sizes so that {middle} divides the rest")


def describe_layout(num_layers: int, layout: PipelineLayout) -> str:
    """The layout as --dry-run prints it: each rank's chunks and their layers."""
    chunks = chunk_layer_ranges(num_layers, layout)
    pp = layout.num_stages
    ranks = []
    for rank in range(pp):
        held = ", ".join(_span(chunk) for chunk in chunks[rank::pp])
        ranks.append(f"stage {rank}: layers {held}")
    virtual = f", {len(chunks) // pp} virtual stages per rank (interleaved)" \
        if len(chunks) > pp else ""
    return f"pipeline: {num_layers} decoder layers over {pp} stages{virtual}: " \
        + "; ".join(ranks)


def _span(layers: range) -> str:
    return f"{layers.start}-{layers.stop - 1}" if len(layers) > 1 else str(layers.start)
