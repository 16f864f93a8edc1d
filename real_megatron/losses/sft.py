"""The supervised warm-up's loss: token cross-entropy on reference responses, as a loss object.

``L = −(1/Σ_k |o_k|) Σ_k Σ_t log π_θ(o_t^k)`` — the mean over the mini-batch's response tokens (EOS
included), a sum of per-token terms with a fixed denominator, so any split into micro-batches, DP
and CP ranks is exact. Plain cross-entropy: log-probs at temperature 1 (the rollout temperature belongs
to the RL objective), no old log-probs, no labels (rewards and groups carry no meaning here).
"""
from __future__ import annotations

import torch

from real_megatron.losses.base import MicroBatch, PolicyLoss


class SFTLoss(PolicyLoss):
    """Token cross-entropy; takes no hyperparameters."""

    DEFAULTS: dict = {}
    needs_old_logp = False
    at_sampling_temperature = False
    diagnostics = False
    group_metrics = False

    def __init__(self, hparams: dict | None = None):
        super().__init__("sft", hparams)

    def normalizer(self, lengths, rewards, group_ids) -> float:
        return float(lengths.sum())

    def share(self, mb: MicroBatch):
        return -torch.where(mb.mask, mb.logp, torch.zeros_like(mb.logp)).sum() / mb.normalizer, {}
