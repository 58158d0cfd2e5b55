"""How the samples of one optimizer step are split over ranks and micro-batches.

Pure functions of sample lengths. Dynamic batching (--use-dynamic-batch-size) fills
micro-batches up to --max-tokens-per-gpu, balanced by length; every data-parallel
rank gets the same number of micro-batches so that collective calls line up.
"""
from __future__ import annotations


def fixed_micro_batches(indices: list[int], micro_batch_size: int) -> list[list[int]]:
    """Consecutive chunks of `micro_batch_size` samples."""
    return [indices[i:i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]


def balanced_bins(lengths: dict[int, int], num_bins: int) -> list[list[int]]:
    """Longest-first greedy: each sample joins the bin with the fewest tokens so far.

    `lengths` maps sample index -> tokens. Bins keep their samples in index order.
    """
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    loads = [0] * num_bins
    for index in sorted(lengths, key=lambda i: (-lengths[i], i)):
        target = loads.index(min(loads))
        bins[target].append(index)
        loads[target] += lengths[index]
    return [sorted(b) for b in bins]


def min_micro_batches(lengths: list[int], max_tokens: int) -> int:
    """Fewest balanced bins such that none exceeds `max_tokens` (a longer sample sits alone)."""
    count = max(1, -(-sum(lengths) // max_tokens))
    while True:
        bins = balanced_bins(dict(enumerate(lengths)), count)
        totals = [sum(lengths[i] for i in b) for b in bins]
        if all(total <= max_tokens or len(b) == 1 for total, b in zip(totals, bins, strict=True)):
            return count
        count += 1


def token_budget_micro_batches(indices: list[int], lengths: dict[int, int], max_tokens: int,
                               num_micro_batches: int | None = None) -> list[list[int]]:
    """Split `indices` into balanced micro-batches under `max_tokens` tokens each.

    `num_micro_batches` forces a count (the maximum over ranks); empty bins are dropped
    only when no count is forced.
    """
    count = num_micro_batches or min_micro_batches([lengths[i] for i in indices], max_tokens)
    bins = balanced_bins({i: lengths[i] for i in indices}, count)
    return bins if num_micro_batches else [b for b in bins if b]


def split_across_ranks(indices: list[int], lengths: dict[int, int], num_ranks: int,
                       balance: bool) -> list[list[int]]:
    """Each data-parallel rank's samples: contiguous equal shares, or balanced by tokens.

    Balanced shares keep equal sample counts per rank (the loss normalises by samples).
    """
    if len(indices) % num_ranks:
        raise ValueError(f"{len(indices)} samples per step do not split over {num_ranks} "
                         "data-parallel ranks: make --global-batch-size a multiple of it")
    share = len(indices) // num_ranks
    if not balance:
        return [indices[r * share:(r + 1) * share] for r in range(num_ranks)]
    ranks: list[list[int]] = [[] for _ in range(num_ranks)]
    loads = [0] * num_ranks
    for index in sorted(indices, key=lambda i: (-lengths[i], i)):
        open_ranks = [r for r in range(num_ranks) if len(ranks[r]) < share]
        target = min(open_ranks, key=lambda r: (loads[r], r))
        ranks[target].append(index)
        loads[target] += lengths[index]
    return [sorted(r) for r in ranks]
