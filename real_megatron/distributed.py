"""Small collectives over the default process group, shared by the trainer and the Megatron glue.

Every helper also works without a process group (plain ``python``, a world of one): it then
returns its input unchanged. Tensors passed in live on the CPU; with NCCL they travel through the
current GPU (``compute_device``) and are copied back.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)``: from the process group, or torchrun's environment before it exists."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _multi_process() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def compute_device() -> torch.device:
    """Where the model runs: the current CUDA device, or the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def world_reduce(tensor: torch.Tensor, op, group=None) -> torch.Tensor:
    """All-reduce a CPU tensor in place over all ranks, or over ``group``'s (through the GPU when the
    backend is NCCL)."""
    if _multi_process() and (group is None or dist.get_world_size(group) > 1):
        buf = tensor.to(compute_device())
        dist.all_reduce(buf, op=op, group=group)
        tensor.copy_(buf.cpu())
    return tensor


def world_sum(tensor: torch.Tensor) -> torch.Tensor:
    return world_reduce(tensor, dist.ReduceOp.SUM)


def world_min(tensor: torch.Tensor) -> torch.Tensor:
    return world_reduce(tensor, dist.ReduceOp.MIN)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one."""
    return bool(world_reduce(torch.tensor([float(flag)]), dist.ReduceOp.MAX).item())


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (pickled; rollouts are small next to the model)."""
    if not _multi_process():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if _multi_process():
        dist.barrier()
