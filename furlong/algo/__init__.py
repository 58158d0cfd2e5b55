"""The pure tensor math of the RL objective (docs/algorithm.md).

`advantages` turns rewards into per-token advantages (GRPO/GSPO, REINFORCE++,
REINFORCE++-baseline, whitening); `losses` holds the per-token policy loss, KL
estimators, entropy, TIS weights and the reductions that make the loss independent of
how a global batch is split into micro-batches and ranks.

Every function takes and returns tensors; nothing here does I/O or keeps state.
Response tokens of a micro-batch are flattened into 1-D tensors of shape (N,), with
`sample_ids` (N,) giving each token's sample slot 0..S-1 (a sample's tokens are
contiguous) and `mask` (N,) the 0/1 loss mask.
"""
