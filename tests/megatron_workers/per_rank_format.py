"""Writes a checkpoint in the per-rank format real-megatron used before checkpoints were reshardable
(``real-megatron/per-rank-v1``): one ``rank_NNNNN.pt`` per rank with the model chunks' state dicts,
the optimizer's per-rank state and the RNG streams, and a ``meta.json`` without a ``format`` entry
whose layout has only tp/pp/cp/world_size. The tests use it to prove such checkpoints still load."""
from __future__ import annotations

import json

import torch
import torch.distributed as dist


def write_per_rank_checkpoint(mgr, chunks, optimizer, step: int, meta: dict, rng: dict) -> None:
    """Every rank calls; ``mgr`` is the run's CheckpointManager, ``meta`` what the trainer records."""
    from real_megatron.checkpoint import atomic_write_text, step_dir_name
    from real_megatron.megatron.optimizer import optimizer_state

    final = mgr.root / step_dir_name(step)
    final.mkdir(parents=True, exist_ok=True)
    state = {"model": [c.state_dict() for c in chunks], "optimizer": optimizer_state(optimizer), "rng": rng}
    torch.save(state, final / f"rank_{mgr.rank:05d}.pt")
    if dist.is_initialized():
        dist.barrier()
    if mgr.rank == 0:
        old_layout = {k: meta["layout"][k] for k in ("tp", "pp", "cp", "world_size")}
        atomic_write_text(final / "meta.json", json.dumps({**meta, "layout": old_layout, "step": step,
                                                           "world_size": mgr.world_size}, default=str))
        atomic_write_text(mgr.root / "latest", final.name)
    if dist.is_initialized():
        dist.barrier()
