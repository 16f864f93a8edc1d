"""The frozen reference model of a KL penalty (``losses/kl.py``, ``kl_target="ref"``): forward only.

A second copy of the model in the run's parallel layout (Megatron ``build_model``, no DDP wrapper, no
optimizer, no gradients), holding the run's *initial* weights for the whole run — a resumed run loads
them again, never the checkpoint. Its log-probs come from ``MegatronPolicy.compute_logprobs``, so the
micro-batch plan, the packed rows and the temperature are exactly those of the old log-probs.

Cost: one more forward pass over every rollout per rollout step (``time/ref_logprob_s``) and the
parameters once more on each rank (``memory/ref_model_mb``: this rank's parameter bytes, its shard
under TP/PP); no gradient buffers or optimizer state.

    ref = build_reference_policy(hf, load_weights=lambda chunks: load_initial_weights(cfg, chunks), ...)
    ref_logps, _ = ref.compute_logprobs(samples)
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def build_reference_policy(hf_config, *, load_weights: Callable, dtype=torch.float32, transformer_impl: str = "auto",
                           sequence_parallel: bool = False, temperature: float = 1.0,
                           max_tokens_per_micro_batch: int = 16384, max_rollouts_per_micro_batch: int | None = None,
                           pad_id: int = 0, fused_output: bool = True):
    """A forward-only ``MegatronPolicy`` over a frozen copy of the model; ``load_weights(chunks)`` fills it.

    Call after ``initialize_parallel`` (same layout as the trained model). A forward-only policy: no loss,
    no optimizer; ``fused_output`` as the trained policy's (``MegatronPolicy``)."""
    from real_megatron.megatron.model import build_model
    from real_megatron.megatron.policy import MegatronPolicy

    chunks = build_model(hf_config, dtype=dtype, transformer_impl=transformer_impl, wrap_ddp=False,
                         sequence_parallel=sequence_parallel)
    load_weights(chunks)
    for chunk in chunks:
        chunk.requires_grad_(False)
        chunk.eval()
    return MegatronPolicy(chunks, None, loss=None, temperature=temperature,
                          max_tokens_per_micro_batch=max_tokens_per_micro_batch,
                          max_rollouts_per_micro_batch=max_rollouts_per_micro_batch, pad_id=pad_id,
                          skip_zero_gradient=False, fused_output=fused_output)


def parameter_bytes(chunks) -> int:
    """This rank's parameter bytes over the chunks (shared tensors once)."""
    seen = {id(p): p for chunk in chunks for p in chunk.parameters()}
    return sum(p.numel() * p.element_size() for p in seen.values())
