"""The KL penalty shared by GRPO and the REAL family: the k3 estimator, its target, its normalisation.

Estimator (k3, as GRPO's paper and verl use): per response token,
``kl_t = exp(target_t − logp_t) − (target_t − logp_t) − 1`` (≥ 0, 0 iff logp = target; an unbiased
estimate of KL(π_θ‖π_target) under samples of π_θ, with a gradient that pulls logp toward target).

Target (``kl_target``): ``"ref"`` — the frozen reference model (the run's initial weights; the trainer
computes ``Sample.ref_logp``); ``"old"`` — π_old, the sample's ``old_logp`` (no reference model).

Normalisation (the same for every loss): the term added to the loss is
``kl_coef · (1/N) Σ_k (1/|o_k|) Σ_t kl_{k,t}`` — each rollout's token mean, averaged over the N rollouts
of the mini-batch. It is a sum over rollouts with a fixed denominator N, so a mini-batch split over
micro-batches, data-parallel ranks (pass the whole mini-batch's N) and context-parallel ranks (per-token
terms local, |o_k| the full CP-reduced length) adds up exactly. For GRPO this is the β·KL inside its
per-rollout token mean; for REAL it is added to L_REAL: ``L = L_REAL + kl_coef · KL``.
"""
from __future__ import annotations

import math

import torch

from real_megatron.losses.common import masked_token_sum

KL_TARGETS = ("ref", "old")


def k3_tokens(logp: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate ``[N, T]`` (0 at padded positions, whatever they hold); differentiable in ``logp``."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    delta = torch.where(mask, target.to(logp.dtype) - logp, zero)
    return torch.exp(delta) - delta - 1.0


def kl_per_rollout(logp: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                   lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Each rollout's token-mean k3 ``[N]``: Σ_t kl_t / |o_k| over the tokens present.

    ``lengths``: full response lengths when the rows hold only part of each response (context
    parallelism); the parts then add up to the whole rollout's mean. Default: ``mask.sum(1)``."""
    lengths = mask.sum(dim=1) if lengths is None else lengths
    return masked_token_sum(k3_tokens(logp, target, mask), mask) / lengths.to(logp.dtype)


class KLPenalty:
    """A loss's KL term: ``coef`` (0: off) toward ``target`` ("ref" | "old"), checked on construction."""

    def __init__(self, coef, target: str):
        if isinstance(coef, bool) or not (isinstance(coef, (int, float)) and math.isfinite(coef) and coef >= 0):
            raise ValueError(f"kl_coef must be a finite number >= 0 (0: no KL term), got {coef!r}")
        if target not in KL_TARGETS:
            raise ValueError(f"kl_target must be one of {KL_TARGETS} ('ref': the frozen initial model, "
                             f"'old': π_old), got {target!r}")
        self.coef = coef
        self.target = target

    @property
    def needs_reference(self) -> bool:
        """Training needs the frozen reference model's log-probs."""
        return self.coef != 0.0 and self.target == "ref"

    def applies(self, has_ref: bool) -> bool:
        """The term is on for samples with (``has_ref``) or without reference log-probs (a ``"ref"`` term
        without them is off, or an error where the loss insists on it: ``target_of``)."""
        return self.coef != 0.0 and (self.target == "old" or has_ref)

    def target_of(self, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, *, strict: bool, loss: str):
        """The target log-probs, or None when the term is off.

        A ``strict`` loss (the REAL family) insists on ``ref_logp`` when asked for KL to the reference:
        silently dropping the term would be a different loss. GRPO (not strict) has no KL term then."""
        if self.coef == 0.0:
            return None
        if self.target == "old":
            return old_logp
        if ref_logp is None and strict:
            raise ValueError(f"{loss} with kl_coef={self.coef} and kl_target='ref' needs ref_logp (the "
                             "reference model's log-probs); pass ref_logp or use kl_target='old'")
        return ref_logp
