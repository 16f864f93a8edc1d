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

import math

import torch

from real_megatron.losses.base import MicroBatch, PolicyLoss
from real_megatron.losses.behaviour import BEHAVIOUR_DEFAULTS
from real_megatron.losses.common import (
    Groups,
    check_denominator,
    check_rollout_tensors,
    check_sequence_lengths,
    check_token_tensors,
    group_metrics,
    masked_token_sum,
    score_inputs,
)
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


def gspo_from_scores(scores: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float,
                     weights: torch.Tensor | None = None):
    """GSPO's summed loss from the sequence log-ratios s̄ (its ratio is exp(s̄)), and its metrics; ``weights`` ``[N]``:
    each rollout's behaviour weight (``behaviour.py``), None for 1."""
    ratio = torch.exp(scores)
    seq_loss, zeroed = _clipped_objective(ratio, adv, clip_low, clip_high)
    if weights is not None:
        seq_loss = seq_loss * weights
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
    token_weights: torch.Tensor | None = None,
):
    """Return ``(summed loss, default denominator, metrics)`` for a PPO-family loss.

    ``kl_logp``: GRPO's KL target log-probs ``[N, T]`` (``kl.KLPenalty.target_of``), None for no KL term.
    ``token_weights`` ``[N, T]``: each token's behaviour weight (``behaviour.py``; decoupled PPO: the clipped
    term times π_old/μ, the KL term unweighted), None for 1."""
    lengths = mask.sum(dim=1).to(logp.dtype) if lengths is None else lengths.to(logp.dtype)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    metrics: dict[str, float] = {}
    adv = advantages.to(logp.dtype)
    if name in ("grpo", "dapo"):
        log_ratio = torch.where(mask, logp - old_logp, zero)
        ratio = torch.exp(log_ratio)
        token_loss, zeroed = _clipped_objective(ratio, adv[:, None], clip_low, clip_high)
        if token_weights is not None:
            token_loss = token_loss * token_weights
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


class ClippedRatioLoss(PolicyLoss):
    """The family's shared parts: group advantages, their zero-gradient rollouts, the clip metrics.

    ``PER_CALL``: ``advantages`` (a part of a bigger batch passes the whole batch's, ``group_advantages``)
    and ``normalizer`` (the whole batch's denominator)."""

    COMMON = {"adv_eps": 1e-6, "positive_threshold": 1.0, **BEHAVIOUR_DEFAULTS}
    PER_CALL = {
        "advantages": "the trainer computes each mini-batch's group advantages from its rewards",
        "normalizer": "the trainer sets the loss denominator from the whole mini-batch (loss_normalizer)",
    }
    token_metric_keys = ("clip_fraction", "clip_fraction_low", "clip_fraction_high", "ratio_mean")

    def _check(self) -> None:
        for key in ("clip_low", "clip_high"):
            value = self.hp[key]
            if not (isinstance(value, (int, float)) and 0 <= value and math.isfinite(value)):
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")

    def advantages(self, rewards, group_ids):
        return group_advantages(rewards, group_ids, self.hp["adv_eps"])

    def _advantages_for(self, advantages, rewards: torch.Tensor, group_ids: torch.Tensor, like: torch.Tensor):
        """The caller's whole-batch ``advantages``, checked, or this call's own (a whole batch)."""
        if advantages is None:
            return group_advantages(rewards.to(like.device).to(like.dtype), group_ids.to(like.device),
                                    self.hp["adv_eps"])
        if not isinstance(advantages, torch.Tensor) or advantages.shape != rewards.shape:
            raise ValueError(f"advantages must be a tensor of shape {tuple(rewards.shape)}")
        return advantages

    def _without_gradient(self, rewards, group_ids, advantages) -> torch.Tensor:
        # rollouts whose group advantage is exactly 0 (equal rewards in the group)
        if advantages is None:
            advantages = group_advantages(rewards.to(torch.float64), group_ids, self.hp["adv_eps"])
        return advantages == 0

    def batch_metrics(self, scores, rewards, group_ids, ran, token_means, behaviour_log_ratio=None) -> dict:
        # token-level metrics: the mean over micro-batches (and CP ranks) of each micro-batch's value
        metrics = {f"loss/{key}": token_means[key] for key in self.token_metric_keys if key in token_means}
        if ran.any():
            metrics["loss/score_mean"] = scores[ran].mean().item()
        return metrics


class TokenRatioLoss(ClippedRatioLoss):
    """GRPO and DAPO: a clipped token ratio; the share of a micro-batch is its tokens' terms."""

    def loss(self, *, logp, old_logp, mask, rewards, group_ids, ref_logp=None, sequence_lengths=None,
             normalizer=None, advantages=None, behaviour_logp=None):
        """``[N, T]`` rows; ``sequence_lengths`` ([N]): the full response lengths when the rows hold only part
        of each response (context parallelism; default ``mask.sum(1)``); ``behaviour_logp`` ``[N, T]``: the
        engine's log-probs (used when the loss corrects for the behaviour policy)."""
        token_log_ratio = None
        if behaviour_logp is not None:
            token_log_ratio = torch.where(mask.bool(), old_logp.detach() - behaviour_logp.to(old_logp),
                                          torch.zeros_like(old_logp))
        return self._token_loss(logp, old_logp, mask, rewards, group_ids, ref_logp, sequence_lengths, normalizer,
                                advantages, token_log_ratio)

    def _token_loss(self, logp, old_logp, mask, rewards, group_ids, ref_logp, sequence_lengths, normalizer,
                    advantages, token_log_ratio):
        check_denominator(normalizer, "normalizer")
        partial = sequence_lengths is not None
        bool_mask = check_token_tensors(logp, old_logp, mask, ref_logp, allow_empty_rows=partial)
        check_rollout_tensors(logp.shape[0], rewards, group_ids)
        check_sequence_lengths(sequence_lengths, rewards)
        groups = Groups.from_ids(group_ids.to(logp.device))
        positive = self.positive(rewards.to(logp.device))
        kl_logp = self.kl.target_of(old_logp, ref_logp, strict=False, loss=self.name) if self.kl else None
        advantages = self._advantages_for(advantages, rewards, group_ids, logp)
        token_weights = None
        if token_log_ratio is not None and self.corrects_behaviour:
            token_weights = self.behaviour.weights(token_log_ratio).to(logp)
        total, denominator, metrics = ppo_family_terms(
            self.name, logp=logp, old_logp=old_logp, mask=bool_mask, advantages=advantages.to(logp.device),
            kl_logp=kl_logp, clip_low=self.hp["clip_low"], clip_high=self.hp["clip_high"],
            kl_coef=self.hp.get("kl_coef", 0.0), lengths=sequence_lengths, token_weights=token_weights,
        )
        if normalizer is not None:
            denominator = float(normalizer)
        with torch.no_grad():
            scores = masked_token_sum(logp - old_logp, bool_mask) / (
                sequence_lengths.to(logp.dtype) if partial else bool_mask.sum(1).to(logp.dtype))
        metrics.update(group_metrics(scores, positive, groups))
        metrics["loss_denominator"] = denominator
        return total / denominator, metrics

    def share(self, mb: MicroBatch):
        return self._token_loss(mb.logp, mb.old_logp, mb.mask, mb.rewards, mb.group_ids, mb.ref_logp, mb.lengths,
                                mb.normalizer, mb.advantages, mb.behaviour_token_log_ratio)


class GRPOLoss(TokenRatioLoss):
    """GRPO: ε = 0.2 both ways (``clip_eps``, or ``clip_low`` / ``clip_high``), KL β = 0.001 to the
    reference model inside each token's term; mean over each rollout's tokens, then over rollouts."""

    DEFAULTS = {**ClippedRatioLoss.COMMON, "clip_eps": 0.2, "clip_low": None, "clip_high": None, "kl_coef": 0.001,
                "kl_target": "ref"}
    kl_inside_loss = True

    def _check(self) -> None:
        self.hp["clip_low"] = self.hp["clip_eps"] if self.hp["clip_low"] is None else self.hp["clip_low"]
        self.hp["clip_high"] = self.hp["clip_eps"] if self.hp["clip_high"] is None else self.hp["clip_high"]
        super()._check()

    def normalizer(self, lengths, rewards, group_ids) -> float:
        check_rollout_tensors(lengths.shape[0], rewards, group_ids)
        return float(lengths.shape[0])


class DAPOLoss(TokenRatioLoss):
    """DAPO: clip-higher (0.2 / 0.28), no KL, token mean over the whole mini-batch."""

    DEFAULTS = {**ClippedRatioLoss.COMMON, "clip_low": 0.2, "clip_high": 0.28}

    def normalizer(self, lengths, rewards, group_ids) -> float:
        check_rollout_tensors(lengths.shape[0], rewards, group_ids)
        return float(lengths.sum())


class GSPOLoss(ClippedRatioLoss):
    """GSPO: the sequence ratio exp(s̄) clipped to [1 − 3e-4, 1 + 4e-4]; mean over rollouts."""

    DEFAULTS = {**ClippedRatioLoss.COMMON, "clip_low": 3e-4, "clip_high": 4e-4}
    sequence_level = True

    def normalizer(self, lengths, rewards, group_ids) -> float:
        check_rollout_tensors(lengths.shape[0], rewards, group_ids)
        return float(lengths.shape[0])

    def loss_from_scores(self, scores, rewards, group_ids, *, normalizer=None, advantages=None,
                         behaviour_log_ratio=None):
        """The loss from per-rollout scores s̄ ``[N]`` (differentiable in them) and its metrics;
        ``behaviour_log_ratio`` ``[N]``: each rollout's length-normalised log π_old − log μ."""
        check_denominator(normalizer, "normalizer")
        groups, positive = score_inputs(scores, rewards, group_ids, self)
        if advantages is None:
            advantages = group_advantages(rewards.to(scores.dtype), group_ids, self.hp["adv_eps"])
        weights = None
        if behaviour_log_ratio is not None and self.corrects_behaviour:
            weights = self.behaviour.weights(behaviour_log_ratio).to(scores)
        total, metrics = gspo_from_scores(scores, advantages.to(scores), self.hp["clip_low"], self.hp["clip_high"],
                                          weights)
        denominator = float(normalizer) if normalizer is not None else float(scores.shape[0])
        metrics.update(group_metrics(scores, positive, groups))
        metrics["loss_denominator"] = denominator
        return total / denominator, metrics

    def loss(self, *, logp, old_logp, mask, rewards, group_ids, ref_logp=None, sequence_lengths=None,
             normalizer=None, advantages=None, behaviour_logp=None):
        """``[N, T]`` rows of whole rollouts (with partial rows, assemble s̄ and use ``loss_from_scores``)."""
        if sequence_lengths is not None:
            raise ValueError("gspo is sequence-level: with partial sequences use policy_loss_from_scores")
        bool_mask = check_token_tensors(logp, old_logp, mask, ref_logp)
        check_rollout_tensors(logp.shape[0], rewards, group_ids)
        advantages = self._advantages_for(advantages, rewards, group_ids, logp)
        lengths = bool_mask.sum(dim=1).to(logp.dtype)
        scores = masked_token_sum(logp - old_logp, bool_mask) / lengths
        behaviour = None if behaviour_logp is None else masked_token_sum(
            old_logp.detach() - behaviour_logp.to(old_logp), bool_mask) / lengths
        return self.loss_from_scores(scores, rewards.to(logp.device), group_ids.to(logp.device),
                                     normalizer=normalizer, advantages=advantages.to(logp.device),
                                     behaviour_log_ratio=behaviour)

    def share(self, mb: MicroBatch):
        return self.loss_from_scores(mb.scores, mb.rewards, mb.group_ids, normalizer=mb.normalizer,
                                     advantages=mb.advantages, behaviour_log_ratio=mb.behaviour_log_ratio)
