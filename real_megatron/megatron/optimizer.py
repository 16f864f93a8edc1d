"""Megatron's optimizer for the policy, and its state in the per-rank checkpoint format.

    optimizer = build_optimizer(chunks, lr=2e-6)
    state = optimizer_state(optimizer)          # this rank's part (per-rank format)
    load_optimizer_state(optimizer, state)      # same layout only

Checkpoints are written reshardable now (``dist_state.py``); these two read and (for tests) write
the per-rank format of older checkpoints, which ``Trainer.restore`` still loads.
"""
from __future__ import annotations

import torch

from real_megatron.megatron.model import unwrap


def build_optimizer(chunks, *, lr: float, weight_decay: float = 0.01, clip_grad: float = 1.0,
                    adam_beta1: float = 0.9, adam_beta2: float = 0.999, adam_eps: float = 1e-8,
                    use_distributed_optimizer: bool = False):
    """Megatron's optimizer: AdamW (decoupled weight decay), global-norm gradient clipping, constant LR."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    gpt = unwrap(chunks[0])
    config = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=lr, weight_decay=weight_decay, clip_grad=clip_grad,
        adam_beta1=adam_beta1, adam_beta2=adam_beta2, adam_eps=adam_eps,
        bf16=gpt.config.bf16, params_dtype=gpt.config.params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, chunks)


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [o for o in parts if isinstance(o, DistributedOptimizer)]


def optimizer_state(optimizer) -> dict:
    """What a resume needs from the optimizer, for this rank.

    Megatron's ``state_dict()`` is complete for the plain optimizer. The distributed optimizer's
    leaves out each rank's parameter-shard state (fp32 master weights, Adam moments), which
    Megatron saves through separate gather/dist-checkpointing paths; here each rank keeps its own
    shards, per parameter in the optimizer's order (a resume uses the same layout, so the shards
    line up).
    """
    state = {"megatron": optimizer.state_dict()}
    shards = []
    for opt in _distributed_optimizers(optimizer):
        shards.append([{k: v.detach().clone() for k, v in opt._get_main_param_and_optimizer_states(param).items()}
                       for param in opt.model_param_group_index_map])
    if shards:
        state["param_shards"] = shards
    return state


def load_optimizer_state(optimizer, state: dict) -> None:
    """Inverse of ``optimizer_state`` (also takes a bare Megatron state dict, as older checkpoints hold)."""
    if "megatron" not in state:
        optimizer.load_state_dict(state)
        return
    optimizer.load_state_dict(state["megatron"])  # allocates the shard state the copies below fill
    opts = _distributed_optimizers(optimizer)
    for opt in opts:
        # Megatron's load_state_dict (torch-optimizer path, no Apex/TE) hands every parameter the SAME
        # ``step`` tensor; torch's Adam increments each parameter's step in place, so a shared one
        # would advance once per parameter per update and corrupt the bias correction after a resume
        for param_state in opt.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = param_state["step"].clone()
    shards = state.get("param_shards", [])
    if len(shards) != len(opts):
        raise RuntimeError(f"the checkpoint holds parameter-shard state for {len(shards)} distributed optimizer(s), "
                           f"this run has {len(opts)}: resume with the same optim.use_distributed_optimizer")
    for opt, saved in zip(opts, shards):
        params = list(opt.model_param_group_index_map)
        if len(saved) != len(params):
            raise RuntimeError(f"the checkpoint holds {len(saved)} parameter shards, this rank has {len(params)}: "
                               "resume with the same parallel layout")
        with torch.no_grad():  # the fp32 master shards are leaves that require grad
            for param, tensors in zip(params, saved):
                opt._set_main_param_and_optimizer_states(param, tensors)
