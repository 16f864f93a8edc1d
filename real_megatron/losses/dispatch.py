"""The losses' entry points: check the inputs, resolve the hyperparameters, dispatch to the formulas.

``policy_loss`` (token tensors), ``policy_loss_from_scores`` (per-rollout scores s̄),
``score_weights`` (∂L/∂s̄ for exact split batches) and ``loss_normalizer`` (the whole batch's
denominator). The formulas are in ``real.py`` and ``ppo.py``; names and hyperparameters in ``hparams.py``.
"""
from __future__ import annotations

import torch

from real_megatron.losses.common import (
    Groups,
    check_rollout_tensors,
    check_token_tensors,
    masked_token_sum,
    sequence_scores,
)
from real_megatron.losses.diagnostics import score_weight_stats
from real_megatron.losses.hparams import SEQUENCE_LEVEL, resolve_hparams
from real_megatron.losses.kl import kl_per_rollout, kl_target_of
from real_megatron.losses.ppo import group_advantages, gspo_from_scores, ppo_family_terms
from real_megatron.losses.real import REAL_FAMILY, real_group_losses


def _group_metrics(scores: torch.Tensor, positive: torch.Tensor, groups: Groups) -> dict[str, float]:
    num_pos = groups.sum(positive.to(torch.long))
    solved_all = int((num_pos == groups.sizes).sum())
    solved_none = int((num_pos == 0).sum())
    metrics = {
        "num_groups": float(groups.count),
        "num_rollouts": float(scores.numel()),
        "solved_all_groups": float(solved_all),
        "solved_none_groups": float(solved_none),
        "mixed_group_fraction": float(groups.count - solved_all - solved_none) / groups.count,
    }
    s = scores.detach()
    if positive.any():
        metrics["score_mean_pos"] = float(s[positive].mean())
    if (~positive).any():
        metrics["score_mean_neg"] = float(s[~positive].mean())
    return metrics


def _real_loss_from_scores(name: str, scores: torch.Tensor, positive: torch.Tensor, groups: Groups, hp: dict):
    """REAL-family loss (differentiable in ``scores``) and its metrics."""
    per_group, contributing, _, _ = real_group_losses(
        name, scores, positive, groups, hp["tau"], hp["include_uniform_groups"]
    )
    n_contributing = int(contributing.sum())
    denominator = loss_denominator_real(hp, groups.count, n_contributing)
    loss = per_group.sum() / denominator

    # Per-rollout gradient weight of its own group's loss, |∂L_g/∂s̄_k| (Prop. 5.1: ≤ 1/τ for
    # `real`), on a detached copy so metrics never touch the caller's graph.
    leaf = scores.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        detached_groups, _, _, _ = real_group_losses(
            name, leaf, positive, groups, hp["tau"], hp["include_uniform_groups"]
        )
        (weights,) = torch.autograd.grad(detached_groups.sum(), leaf)
    metrics = _group_metrics(scores, positive, groups)
    metrics["contributing_group_fraction"] = n_contributing / groups.count
    metrics["max_score_weight"] = float(weights.abs().max())
    metrics.update(score_weight_stats(weights, contributing[groups.index], hp["tau"]))  # the diag/ view
    metrics["loss_denominator"] = float(denominator)
    return loss, metrics


def loss_denominator_real(hp: dict, num_groups: int, num_contributing: int) -> float:
    if hp["normalizer"] is not None:
        return float(hp["normalizer"])
    if hp["group_norm"] == "all_groups":
        return float(hp["num_groups"] if hp["num_groups"] is not None else num_groups)
    return float(max(num_contributing, 1))


def policy_loss(
    name: str,
    *,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    sequence_lengths: torch.Tensor | None = None,
    **hparams,
):
    """Compute policy loss ``name`` for a batch of rollouts.

    Returns ``(loss, metrics)``: a scalar tensor with autograd to ``logp`` and a dict of floats.
    ``hparams`` are checked against ``LOSSES[name]``; anything unknown is a ``ValueError``.
    ``ref_logp``: the reference model's log-probs ``[N, T]``, the KL target of ``grpo`` and the REAL
    family when ``kl_coef`` ≠ 0 and ``kl_target="ref"`` (``kl.py``; the REAL family then requires it).
    REAL family with ``kl_coef`` ≠ 0: ``L_REAL + kl_coef · (1/N) Σ_k mean_t kl_{k,t}`` over the N rollouts.
    ``sequence_lengths`` ([N], token-level losses only): each rollout's full response length when
    ``logp`` holds only part of its tokens (context parallelism); default: ``mask.sum(1)``.
    """
    hp = resolve_hparams(name, hparams)
    partial = sequence_lengths is not None and name not in REAL_FAMILY
    bool_mask = check_token_tensors(logp, old_logp, mask, ref_logp, allow_empty_rows=partial)
    check_rollout_tensors(logp.shape[0], rewards, group_ids)
    if sequence_lengths is not None and (sequence_lengths.shape != rewards.shape or (sequence_lengths <= 0).any()):
        raise ValueError(f"sequence_lengths must be positive, one per rollout ({rewards.shape[0]})")
    groups = Groups.from_ids(group_ids.to(logp.device))
    positive = rewards.to(logp.device) >= hp["positive_threshold"]

    kl_logp = kl_target_of(hp, old_logp, ref_logp, name)
    if name in REAL_FAMILY:
        scores = sequence_scores(logp, old_logp, bool_mask)
        loss, metrics = _real_loss_from_scores(name, scores, positive, groups, hp)
        if kl_logp is not None:
            kl = kl_per_rollout(logp, kl_logp, bool_mask)
            loss = loss + hp["kl_coef"] * kl.sum() / logp.shape[0]
            metrics["kl"] = float(kl.detach().mean())
        return loss, metrics

    advantages = hp["advantages"]
    if advantages is None:
        advantages = group_advantages(rewards.to(logp.device).to(logp.dtype), group_ids.to(logp.device), hp["adv_eps"])
    elif not isinstance(advantages, torch.Tensor) or advantages.shape != rewards.shape:
        raise ValueError(f"advantages must be a tensor of shape {tuple(rewards.shape)}")
    if sequence_lengths is not None and name == "gspo":
        raise ValueError("gspo is sequence-level: with partial sequences use policy_loss_from_scores")
    total, denominator, metrics = ppo_family_terms(
        name, logp=logp, old_logp=old_logp, mask=bool_mask, advantages=advantages.to(logp.device),
        kl_logp=kl_logp, clip_low=hp["clip_low"], clip_high=hp["clip_high"], kl_coef=hp.get("kl_coef", 0.0),
        lengths=sequence_lengths,
    )
    if hp["normalizer"] is not None:
        denominator = float(hp["normalizer"])
    with torch.no_grad():
        scores = masked_token_sum(logp - old_logp, bool_mask) / (
            sequence_lengths.to(logp.dtype) if partial else bool_mask.sum(1).to(logp.dtype))
    metrics.update(_group_metrics(scores, positive, groups))
    metrics["loss_denominator"] = denominator
    return total / denominator, metrics


def _score_inputs(scores, rewards: torch.Tensor, group_ids: torch.Tensor, hp: dict) -> tuple[Groups, torch.Tensor]:
    """Check per-rollout scores s̄ ``[N]`` (finite) with their rewards and groups; return the groups and positives."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D tensor [N], got {getattr(scores, 'shape', type(scores).__name__)}")
    finite = torch.isfinite(scores.detach())
    if not finite.all():
        raise ValueError(f"scores[{int((~finite).nonzero()[0])}] is not finite")
    check_rollout_tensors(scores.shape[0], rewards, group_ids)
    return Groups.from_ids(group_ids.to(scores.device)), rewards.to(scores.device) >= hp["positive_threshold"]


def policy_loss_from_scores(name: str, *, scores: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor,
                            **hparams):
    """A sequence-level loss (``SEQUENCE_LEVEL``) from per-rollout scores s̄ ``[N]``, differentiable in them.

    Used where s̄ is assembled from pieces (context parallelism: per-rank partial sums reduced
    over the CP group). Same hyperparameters, normalisation and metrics as ``policy_loss``, except the
    REAL family's KL term: it is per token, so the caller adds ``kl_coef · Σ_k kl.kl_per_rollout(...) / N``.
    """
    if name not in SEQUENCE_LEVEL:
        raise ValueError(f"{name!r} is token-level; policy_loss_from_scores takes {SEQUENCE_LEVEL}")
    hp = resolve_hparams(name, hparams)
    groups, positive = _score_inputs(scores, rewards, group_ids, hp)
    if name in REAL_FAMILY:
        return _real_loss_from_scores(name, scores, positive, groups, hp)
    advantages = hp["advantages"]
    if advantages is None:
        advantages = group_advantages(rewards.to(scores.dtype), group_ids, hp["adv_eps"])
    total, metrics = gspo_from_scores(scores, advantages.to(scores), hp["clip_low"], hp["clip_high"])
    denominator = float(hp["normalizer"]) if hp["normalizer"] is not None else float(scores.shape[0])
    metrics.update(_group_metrics(scores, positive, groups))
    metrics["loss_denominator"] = denominator
    return total / denominator, metrics


def score_weights(name: str, *, scores: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor, **hparams):
    """Per-rollout weights ``w_k = ∂L/∂s̄_k`` of a REAL-family loss, for exact split batches.

    ``scores`` are *all* rollouts' s̄ under the current parameters (e.g. gathered over
    data-parallel ranks, or from a forward-only pass over the mini-batch). Returns
    ``(w [N] detached, loss scalar float tensor, metrics)``; the caller back-propagates
    ``(w[part] * s̄[part]).sum()`` for each part, which reproduces the full loss's gradient.
    """
    if name not in REAL_FAMILY:
        raise ValueError(
            f"score_weights is for the sequence-level REAL family {REAL_FAMILY}; {name!r} is a sum over "
            "tokens/rollouts: split it exactly with advantages= and normalizer= instead"
        )
    hp = resolve_hparams(name, hparams)
    groups, positive = _score_inputs(scores, rewards, group_ids, hp)
    leaf = scores.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss, metrics = _real_loss_from_scores(name, leaf, positive, groups, hp)
        (weights,) = torch.autograd.grad(loss, leaf)
    return weights, loss.detach(), metrics


def loss_normalizer(name: str, *, mask: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor, **hparams) -> float:
    """The denominator ``policy_loss`` would use for this whole batch (pass it to every part)."""
    hp = resolve_hparams(name, hparams)
    if hp["normalizer"] is not None:
        return float(hp["normalizer"])
    check_rollout_tensors(mask.shape[0], rewards, group_ids)
    groups = Groups.from_ids(group_ids)
    if name in REAL_FAMILY:
        positive = rewards >= hp["positive_threshold"]
        _, contributing, _, _ = real_group_losses(
            name, torch.zeros(mask.shape[0], dtype=torch.float64), positive, groups, hp["tau"],
            hp["include_uniform_groups"],
        )
        return loss_denominator_real(hp, groups.count, int(contributing.sum()))
    if name == "dapo":
        return float(mask.bool().sum())
    return float(mask.shape[0])


def zero_gradient_rollouts(name: str, *, rewards: torch.Tensor, group_ids: torch.Tensor, has_ref: bool = False,
                           **hparams) -> torch.Tensor:
    """``[N]`` bool: rollouts whose loss term and gradient are exactly zero *whatever their log-probs*.

    REAL family: the rollouts of non-contributing groups (uniform groups unless
    ``include_uniform_groups``; ``real_no_anchor`` never counts them). GRPO/DAPO/GSPO: rollouts
    whose group advantage is exactly 0 (equal rewards in the group). None at all when a KL term is on
    (``kl_coef`` ≠ 0 with ``kl_target="old"``, or with reference log-probs given, ``has_ref``): every
    rollout's KL has a gradient. Leaving them out of the
    forward/backward changes neither the loss nor the gradient, as long as the denominator
    (``loss_normalizer``) and advantages are those of the whole batch.
    """
    hp = resolve_hparams(name, hparams)
    check_rollout_tensors(rewards.shape[0], rewards, group_ids)
    groups = Groups.from_ids(group_ids)
    if hp.get("kl_coef", 0.0) != 0 and (hp["kl_target"] == "old" or has_ref):
        return torch.zeros(rewards.shape[0], dtype=torch.bool)
    if name in REAL_FAMILY:
        positive = rewards >= hp["positive_threshold"]
        _, contributing, _, _ = real_group_losses(name, torch.zeros(rewards.shape[0], dtype=torch.float64), positive,
                                                  groups, hp["tau"], hp["include_uniform_groups"])
        return ~contributing[groups.index]
    advantages = hp["advantages"]
    if advantages is None:
        advantages = group_advantages(rewards.to(torch.float64), group_ids, hp["adv_eps"])
    return advantages == 0
