"""Model + optimizer training state as a layout-independent Megatron-Core ``dist_checkpointing`` directory.

    save_training_state(chunks, optimizer, directory)      # every rank calls; collective
    load_training_state(chunks, optimizer, directory)      # at any TP/PP/DP the model's shapes allow

Each tensor is stored once under its global Megatron name and global shape (the model's
``sharded_state_dict``: TP shards, PP stages' layer numbers and DP replicas mapped to one global
tensor), so a run loads the pieces its own layout needs. The optimizer state (Adam ``exp_avg`` /
``exp_avg_sq`` and, with fp32 masters, ``fp32_param``) is stored per model parameter in the same
global layout: Megatron's ``fully_reshardable`` format for the distributed optimizer (gathered over
DP on save, sliced by each rank on load), the model-space format for the plain optimizers (bf16:
fp32 masters as ``fp32_param``). The Adam step count lives in the common (replicated) part.

Vocabulary padding depends on TP (``padded_vocab_size``); Megatron marks the embedding and output
layer ``allow_shape_mismatch``, so a different padding loads the real rows and zero-fills the rest
(padded rows never receive probability; their Adam moments are zero either way).
"""
from __future__ import annotations

import contextlib
import queue
from pathlib import Path

import torch

from real_megatron.megatron.model import unwrap

# the optimizer metadata Megatron-LM passes for a fully reshardable checkpoint
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
# the writer's threads per rank; each is a forked process on save (fewer files, less start-up on 2 cores)
WRITE_THREADS = 1


def _model_key(index: int, count: int) -> str:
    return "model" if count == 1 else f"model{index}"


def sharded_training_state(chunks, optimizer, *, is_loading: bool) -> dict:
    """The sharded state dict of the model chunks and the optimizer (the request on load)."""
    models = {_model_key(i, len(chunks)): unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}
    merged = {}
    for sd in models.values():
        merged.update(sd)
    state = dict(models)
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    if len(parts) == 1 and _is_mixed_precision(parts[0]):
        state["optimizer"] = _mixed_precision_sharded_state(parts[0], merged, is_loading)
    else:
        state["optimizer"] = optimizer.sharded_state_dict(merged, is_loading=is_loading,
                                                          metadata=dict(OPTIMIZER_METADATA))
    return state


def _is_mixed_precision(part) -> bool:
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    return isinstance(part, Float16OptimizerWithFloat16Params)


def _mixed_precision_sharded_state(part, model_state: dict, is_loading: bool) -> dict:
    """Megatron's ``Float16OptimizerWithFloat16Params.sharded_state_dict``, for a model that also has
    fp32 parameters. Megatron numbers the optimizer's parameters by the bf16/fp16 ones alone, so
    with any fp32 parameter in a group (the local spec's RMSNorm weights are fp32 in a bf16 model)
    Adam states land on the wrong tensors (a shape assertion). Here the numbering follows the inner
    optimizer's own parameter order; the stored layout is Megatron's."""
    from itertools import chain

    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )

    if is_loading:
        part.init_state_fn(part.optimizer, part.config)
    state = part.state_dict()
    model_param_of = {id(p.main_param): p for p in chain.from_iterable(part.float16_groups)}
    order = [model_param_of.get(id(p), p) for group in part.optimizer.param_groups for p in group["params"]]
    sharded = get_param_id_to_sharded_param_map(model_state, order)
    index = {id(p): i for i, p in enumerate(order)}
    state["fp32_from_fp16_params"] = [
        [make_sharded_optimizer_tensor(sharded[index[id(model_p)]], main_p, prefix="optimizer.state.fp32_param")
         for model_p, main_p in zip(model_group, main_group, strict=True)]
        for model_group, main_group in zip(part.float16_groups, part.fp32_from_float16_groups, strict=True)]
    step = part._extract_common_per_param_step(state["optimizer"])
    optim_state_to_sharding_state(state["optimizer"], sharded, exclude_keys="step")  # the step is shared
    if step:
        state["optimizer"]["state"]["common_step"] = step
    return state


def save_training_state(chunks, optimizer, directory: str | Path) -> None:
    """Write model + optimizer into ``directory`` (must exist and be empty); collective, synchronous."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    _results_queue_in_this_process()
    state = sharded_training_state(chunks, optimizer, is_loading=False)
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=WRITE_THREADS)
    dist_checkpointing.save(state, str(directory), sharded_strategy=strategy)


def _results_queue_in_this_process() -> None:
    """Megatron collects its shard writers' results through a queue in a spawned multiprocessing
    manager, which outlives a SIGKILLed trainer (an orphan process of ~260 MB per ``kill -9``, seen
    in the kill -9 resume test) and is why a launched script needed a ``__main__`` guard. Saves here
    are synchronous, so the results never leave this process: a plain in-process queue does."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def load_training_state(chunks, optimizer, directory: str | Path) -> None:
    """Load model + optimizer from ``directory`` into this rank's shards, whatever layout wrote it."""
    from megatron.core import dist_checkpointing

    _allocate_adam_state(optimizer)
    request = sharded_training_state(chunks, optimizer, is_loading=True)
    loaded = dist_checkpointing.load(request, str(directory), strict="raise_all")
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded[_model_key(i, len(chunks))], strict=False)
    with _step_kept_by_state_setter(optimizer):
        optimizer.load_state_dict(loaded["optimizer"])
    own_step_tensors(optimizer)


@contextlib.contextmanager
def _step_kept_by_state_setter(optimizer):
    """Megatron 0.16.1's distributed optimizer, without Apex/TE, keeps a ``step`` in each parameter's
    state, which its fully-reshardable loader leaves out (the step travels in ``param_groups``) and
    its state setter then requires (KeyError 'step'). Feed the setter the step it already has."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = [p for p in (getattr(optimizer, "chained_optimizers", None) or [optimizer])
             if isinstance(p, DistributedOptimizer)]
    for part in parts:
        def setter(model_param, tensors, _part=part, _set=part._set_main_param_and_optimizer_states):
            current = _part._get_main_param_and_optimizer_states(model_param)
            _set(model_param, {**{k: v for k, v in current.items() if k not in tensors}, **tensors})

        part._set_main_param_and_optimizer_states = setter
    try:
        yield
    finally:
        for part in parts:
            del part._set_main_param_and_optimizer_states


def inner_optimizers(optimizer) -> list:
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [part.optimizer for part in parts if getattr(part, "optimizer", None) is not None]


def _allocate_adam_state(optimizer) -> None:
    """Give a fresh optimizer Adam's state (zeros, step 0), as its first step would.

    Megatron's distributed optimizer reads the step count from the existing state to build the
    load request; without Apex/TE (the CPU) a never-stepped optimizer has none and it fails.
    """
    for inner in inner_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param.data),
                                              exp_avg_sq=torch.zeros_like(param.data))


def own_step_tensors(optimizer) -> None:
    """Give every parameter its own Adam ``step`` tensor.

    Megatron's load paths (distributed optimizer without Apex/TE) hand every parameter the SAME
    ``step`` tensor; torch's Adam increments each parameter's step in place, so a shared one would
    advance once per parameter per update and corrupt the bias correction after a resume.
    """
    for inner in inner_optimizers(optimizer):
        for param_state in inner.state.values():
            step = param_state.get("step")
            if isinstance(step, torch.Tensor):
                param_state["step"] = step.clone()
