"""Megatron's optimizer for the policy: ``optimizer = build_optimizer(chunks, lr=2e-6)``.

Its state is saved and loaded, reshardable, by ``dist_state.py``.
"""
from __future__ import annotations

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
