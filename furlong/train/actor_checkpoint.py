"""A trainer's part of a checkpoint (the layout is checkpoint.py's): the HF model, AdamW's
state by HF name (train/optimizer_state.py) with the LR schedule, and each rank's RNG.

Under LoRA the model is the adapter alone, in PEFT's format (`adapter/`, float32, what
`PeftModel.from_pretrained` and SGLang's --lora-paths load); the base is
--hf-checkpoint. The optimizer state is the adapter's, by its parameter names. An HF
export (--save-hf) is the base with the adapter merged in, in the base's dtype.

`actor` is a TrainActor; every function is collective over its ranks when it has several.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from furlong import checkpoint
from furlong.model import lora
from furlong.model.lora_files import save_adapter
from furlong.train import distributed_state, optimizer_state, parallel, pipeline_parallel
from furlong.train.lora_adapter import ADAPTER_DIR


def save(actor, directory: Path, save_optimizer: bool) -> None:
    """This rank's part of a checkpoint: the HF model (rank 0 writes, all gather; under
    LoRA the adapter), the optimizer state and schedule (whole tensors by HF name: each
    pipeline stage's first rank writes its stage's), RNG."""
    rank = actor.rank
    if actor.lora is None:
        export_hf(actor, directory / "model")
    else:
        named = list(actor.named_adapter_weights())  # collective
        if rank.rank == 0:
            save_adapter(directory / ADAPTER_DIR, named, actor.lora,
                         actor.config.ckpt.hf_checkpoint)
    if save_optimizer:
        optimizer_state.save(
            directory / "optimizer", _named_optimized_parameters(actor), actor.optimizer,
            actor.scheduler.state_dict(), part=rank.pp_rank,
            writer=rank.rank == rank.pp_rank * (rank.world_size // rank.pp_size))
    torch.save({**checkpoint.rng_state(), "world_size": rank.world_size,
                "tp_size": rank.tp_size, "ep_size": _ep_size(actor), "pp_size": rank.pp_size},
               directory / f"rng_rank{rank.rank}.pt")
    if actor.mesh is not None:
        dist.barrier()


def restore(actor, directory: Path) -> None:
    """Optimizer, schedule and RNG of a checkpoint saved under any layout of ranks (the
    weights were loaded at construction); a rank the saving run did not have keeps its
    RNG. Checkpoints of earlier versions (trainer_rank*.pt) need their own layout."""
    rank = actor.rank.rank
    rng_file = directory / f"rng_rank{rank}.pt"
    rng = checkpoint.load_state(rng_file) if rng_file.is_file() else {}
    if (directory / "optimizer").is_dir():
        actor.scheduler.load_state_dict(optimizer_state.restore(
            directory / "optimizer", _named_optimized_parameters(actor), actor.optimizer))
    elif any(directory.glob("trainer_rank*.pt")):
        _restore_rank_shards(actor, directory, rng)
    if rng:
        checkpoint.set_rng_state(rng)


def _named_optimized_parameters(actor) -> list[tuple[str, torch.nn.Parameter]]:
    """(HF name in the whole model, parameter the optimizer steps) of every trained
    parameter; a tied output weight goes by the embedding's name, as in the HF
    checkpoint (a pipeline's last stage holds it as `lm_head.weight`)."""
    hf_model, role = actor.policy.hf_model, actor.policy.pipeline
    trained = [(role.global_name(name) if role else name, param)
               for name, param in hf_model.named_parameters() if param.requires_grad]
    if actor.masters is not None:  # the optimizer steps the masters, in the same order
        trained = [(name, master) for (name, _), master
                   in zip(trained, actor.masters.parameters(), strict=True)]
    tied = f"{hf_model.base_model_prefix}.embed_tokens.weight"
    return [(tied if hf_model.config.tie_word_embeddings and name == "lm_head.weight"
             else name, param) for name, param in trained]


def _restore_rank_shards(actor, directory: Path, rng: dict) -> None:
    """An earlier version's checkpoint: each rank's optimizer shards, same layout only."""
    saved_world = len(list(directory.glob("rng_rank*.pt")))
    _check_saved_layout(actor, directory, saved_world, rng.get("tp_size", 1),
                        rng.get("ep_size", 1), rng.get("pp_size", 1))
    state = checkpoint.load_state(directory / f"trainer_rank{actor.rank.rank}.pt")
    distributed_state.load_local_optimizer_state(actor.optimizer, state["optimizer"])
    actor.scheduler.load_state_dict(state["scheduler"])


def _check_saved_layout(actor, directory: Path, saved_world: int, saved_tp: int,
                        saved_ep: int, saved_pp: int) -> None:
    world, tp, ep, pp = (actor.rank.world_size, actor.rank.tp_size, _ep_size(actor),
                         actor.rank.pp_size)
    if (saved_world, saved_tp, saved_ep, saved_pp) != (world, tp, ep, pp):
        raise ValueError(
            f"{directory} holds the optimizer and RNG state of {saved_world} trainer ranks "
            f"(tensor parallel {saved_tp}, expert parallel {saved_ep}, pipeline "
            f"{saved_pp}); this run has {world} (tensor parallel {tp}, expert parallel "
            f"{ep}, pipeline {pp}). Resume with the same layout (world size, --tensor-, "
            "--expert- and --pipeline-model-parallel-size), or start from its model/ "
            "directory with --ref-load (weights only).")


def export_hf(actor, path: str | Path) -> None:
    """An HF directory of the current weights (float32; under LoRA the base's dtype, the
    adapter merged in). Collective with several ranks: all gather, rank 0 writes."""
    hf_model = actor.policy.hf_model
    if actor.mesh is None:
        state = hf_model.state_dict() if actor.masters is None else actor.masters.state_dict()
    else:
        parallel.reshard(actor.policy)
        keep = actor.rank.rank == 0
        state = distributed_state.full_state_dict(hf_model, keep) \
            if actor.rank.pp_size == 1 else pipeline_parallel.full_state_dict(
                hf_model, actor.policy.pipeline, actor.rank.device, keep)
    if state is not None:
        if actor.lora is not None:
            state = lora.merged_state(state, actor.lora.scaling)
        hf_model.save_pretrained(path, state_dict=state)
    if actor.mesh is not None:
        dist.barrier()


def _ep_size(actor) -> int:
    return actor.config.perf.expert_model_parallel_size
