"""The size of one optimizer step: ‖θ_after − θ_before‖ / ‖θ_before‖ over every trainable parameter of the
whole model (``logging.update_size``, logged as ``diag/update_rel_norm``).

Why it is measured and not derived: with Adam the step's size is not the gradient's (the moments normalise
it), so two losses at one learning rate may or may not take steps of one size; a stability comparison
needs the measured size (``real-megatron compare --preset stress`` reads it).

Under model parallelism each rank holds part of the model: a tensor-parallel shard counts on its own rank, a
parameter replicated over the tensor-parallel ranks (norms, biases of row-parallel layers) only on TP rank 0,
a parameter shared between pipeline stages (tied embeddings: the last stage's copy) only once, then the two
sums are reduced over the model-parallel group (TP × PP). Data- and context-parallel ranks hold identical
copies (the distributed optimizer gathers the updated shards inside ``step()``), so every rank gets the
value of the single-process run. Cost: one copy of the rank's parameters, held during the step.
"""
from __future__ import annotations

import math

import torch

from real_megatron.distributed import world_reduce

UPDATE_SIZE_KEY = "diag/update_rel_norm"


def trainable_parameters(chunks) -> list[torch.Tensor]:
    """The rank's trainable parameters, in a fixed order (each once, also when a chunk holds it twice)."""
    seen, params = set(), []
    for chunk in chunks:
        for p in chunk.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters' values before the step (detached copies, in their own dtype)."""
    return [p.detach().clone() for p in params]


def relative_update(params: list[torch.Tensor], before: list[torch.Tensor]) -> float:
    """‖θ − θ_before‖ / ‖θ_before‖ over the whole model (float64 sums; 0.0 for an all-zero model).
    A collective over the model-parallel group: every rank of the model must call it."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    parallel = ps.model_parallel_is_initialized()  # else one process holds the whole model
    tp_group = ps.get_tensor_model_parallel_group() if parallel else None
    # summed where the parameters live, copied to the CPU once (not one device sync per parameter)
    sums = torch.zeros(2, dtype=torch.float64, device=params[0].device if params else "cpu")
    with torch.no_grad():
        for p, b in zip(params, before, strict=True):
            if parallel and not (param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p, tp_group)):
                continue  # counted on the rank that owns it
            old = b.double()
            sums[0] += (p.detach().double() - old).pow(2).sum()
            sums[1] += old.pow(2).sum()
    sums = sums.cpu()
    if parallel:
        world_reduce(sums, torch.distributed.ReduceOp.SUM, group=ps.get_model_parallel_group())
    delta_sq, norm_sq = float(sums[0]), float(sums[1])
    return math.sqrt(delta_sq / norm_sq) if norm_sq > 0 else 0.0
