"""The clipped-ratio baselines the paper compares REAL with: GRPO, DAPO, GSPO.

All three use the group-normalised advantage ``A_k = (r_k − mean_g r) / (std_g r + eps)``
(unbiased std, as verl; a group of one rollout or with equal rewards gets A = 0), computed from
the whole group — pass ``advantages`` explicitly when a call sees only part of a group.

``grpo`` (paper's baseline, Eq. 1): token ratio ρ_t = exp(logp_t − old_logp_t), per-token
    ``−min(ρ_t A, clip(ρ_t, 1−ε, 1+ε) A)`` with ε = 0.2, plus ``kl_coef`` (β = 0.001 in the paper)
    × the k3 estimator of ``kl.py`` toward ``kl_target`` (the reference model's ``ref_logp`` when
    given, or π_old).
    Normalisation: mean over each rollout's tokens, then mean over rollouts (the
    (1/G) Σ_i (1/|o_i|) Σ_t of the GRPO objective). Denominator = number of rollouts.
``dapo``: clip-higher ε_low = 0.2, ε_high = 0.28, no KL; token-mean over the whole batch.
    Denominator = number of response tokens. (DAPO's dynamic sampling — dropping uniform
    groups — is a data-side filter, not part of the loss.)
``gspo``: sequence ratio r_k = exp(s̄_k) (s̄ as in REAL), per-rollout ``−min(r A, clip(r, 1−3e-4,
    1+4e-4) A)``, no KL; mean over rollouts. Denominator = number of rollouts.

Every loss here is a sum of per-token / per-rollout terms divided by a denominator that does not
depend on the parameters, so a batch split into micro-batches is exact when each micro-batch
passes the full batch's ``advantages`` and ``normalizer``.
"""
from __future__ import annotations

import torch

from real_megatron.losses.common import Groups, masked_token_sum
from real_megatron.losses.kl import k3_tokens

PPO_FAMILY = ("grpo", "dapo", "gspo")


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's group-normalised advantage ``(r − mean_g) / (std_g + eps)`` per rollout ``[N]``."""
    groups = Groups.from_ids(group_ids)
    r = rewards.to(torch.float64)
    n = groups.sizes.to(torch.float64)
    mean = groups.sum(r) / n
    centred = r - mean[groups.index]
    # unbiased variance; groups of one rollout get std 0 -> advantage 0 (their centred reward is 0)
    var = groups.sum(centred**2) / (n - 1).clamp_min(1)
    std = var.sqrt()
    return (centred / (std[groups.index] + eps)).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def _clipped_objective(ratio: torch.Tensor, adv: torch.Tensor, low: float, high: float):
    """Per-element ``−min(ρA, clip(ρ)A)`` and the mask of elements whose gradient the clip zeroes."""
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - low, 1.0 + high) * adv
    loss = -torch.minimum(unclipped, clipped)
    ratio_d = ratio.detach()
    # the clipped branch is the active (smaller) one and is constant in ρ
    zeroed = ((adv > 0) & (ratio_d > 1.0 + high)) | ((adv < 0) & (ratio_d < 1.0 - low))
    return loss, zeroed


def gspo_from_scores(scores: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float):
    """GSPO's summed loss from the sequence log-ratios s̄ (its ratio is exp(s̄)), and its metrics."""
    ratio = torch.exp(scores)
    seq_loss, zeroed = _clipped_objective(ratio, adv, clip_low, clip_high)
    return seq_loss.sum(), {"clip_fraction": float(zeroed.float().mean()), "ratio_mean": float(ratio.detach().mean())}


def ppo_family_terms(
    name: str,
    *,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    kl_logp: torch.Tensor | None,
    clip_low: float,
    clip_high: float,
    kl_coef: float,
    lengths: torch.Tensor | None = None,
):
    """Return ``(summed loss, default denominator, metrics)`` for a PPO-family loss.

    ``kl_logp``: GRPO's KL target log-probs ``[N, T]`` (``kl.kl_target_of``), None for no KL term."""
    lengths = mask.sum(dim=1).to(logp.dtype) if lengths is None else lengths.to(logp.dtype)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    metrics: dict[str, float] = {}
    adv = advantages.to(logp.dtype)
    if name in ("grpo", "dapo"):
        log_ratio = torch.where(mask, logp - old_logp, zero)
        ratio = torch.exp(log_ratio)
        token_loss, zeroed = _clipped_objective(ratio, adv[:, None], clip_low, clip_high)
        if name == "grpo" and kl_logp is not None and kl_coef != 0.0:
            kl = k3_tokens(logp, kl_logp, mask)
            token_loss = token_loss + kl_coef * kl
            metrics["kl"] = float((masked_token_sum(kl.detach(), mask) / lengths).mean())
        zeroed = zeroed & mask
        n_tokens = mask.sum().clamp_min(1)
        metrics["clip_fraction"] = float(zeroed.sum() / n_tokens)
        metrics["clip_fraction_low"] = float((zeroed & (adv[:, None] < 0)).sum() / n_tokens)
        metrics["clip_fraction_high"] = float((zeroed & (adv[:, None] > 0)).sum() / n_tokens)
        metrics["ratio_mean"] = float(masked_token_sum(ratio.detach(), mask).sum() / n_tokens)
        if name == "grpo":
            total = (masked_token_sum(token_loss, mask) / lengths).sum()
            denominator = float(logp.shape[0])
        else:
            total = masked_token_sum(token_loss, mask).sum()
            denominator = float(mask.sum())
    elif name == "gspo":
        total, metrics = gspo_from_scores(masked_token_sum(logp - old_logp, mask) / lengths, adv, clip_low, clip_high)
        denominator = float(logp.shape[0])
    else:  # pragma: no cover - the dispatcher validates names
        raise ValueError(f"not a PPO-family loss: {name!r}")
    return total, denominator, metrics
