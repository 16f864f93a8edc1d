"""The functional entry points, by loss name: each builds the loss object (``registry.build_loss``) and asks it.

``policy_loss`` (token tensors), ``policy_loss_from_scores`` (per-rollout scores s̄), ``score_weights``
(∂L/∂s̄ for exact split batches), ``loss_normalizer`` (the whole batch's denominator) and
``zero_gradient_rollouts``. Per-call hyperparameters (``advantages``, ``normalizer``, ``num_groups``: a
part of a bigger batch passes the whole batch's) are split from the loss's own before it is built.
A run builds its loss once and calls the object; these serve tests, figures and notebooks.
"""
from __future__ import annotations

import torch

from real_megatron.losses.base import PolicyLoss
from real_megatron.losses.registry import LOSSES, build_loss


def _build(name: str, hparams: dict) -> tuple[PolicyLoss, dict]:
    """The loss object from ``hparams`` less its per-call keys, and those keys."""
    per_call_keys = LOSSES[name].PER_CALL if name in LOSSES else {}
    per_call = {k: hparams.pop(k) for k in list(hparams) if k in per_call_keys}
    return build_loss(name, hparams), per_call


def policy_loss(name: str, *, logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                group_ids: torch.Tensor, ref_logp: torch.Tensor | None = None,
                sequence_lengths: torch.Tensor | None = None, behaviour_logp: torch.Tensor | None = None, **hparams):
    """Compute policy loss ``name`` for a batch of rollouts.

    Returns ``(loss, metrics)``: a scalar tensor with autograd to ``logp`` and a dict of floats.
    ``hparams`` are checked against the loss's defaults; anything unknown is a ``ValueError``.
    ``ref_logp``: the reference model's log-probs ``[N, T]``, the KL target of ``grpo`` and the REAL
    family when ``kl_coef`` ≠ 0 and ``kl_target="ref"`` (``kl.py``; the REAL family then requires it).
    REAL family with ``kl_coef`` ≠ 0: ``L_REAL + kl_coef · (1/N) Σ_k mean_t kl_{k,t}`` over the N rollouts.
    ``sequence_lengths`` ([N], token-level losses only): each rollout's full response length when
    ``logp`` holds only part of its tokens (context parallelism); default: ``mask.sum(1)``.
    ``behaviour_logp`` ``[N, T]``: the rollout engine's log-probs, for ``behaviour_correction`` (``behaviour.py``).
    """
    loss, per_call = _build(name, hparams)
    return loss.loss(logp=logp, old_logp=old_logp, mask=mask, rewards=rewards, group_ids=group_ids, ref_logp=ref_logp,
                     sequence_lengths=sequence_lengths, behaviour_logp=behaviour_logp, **per_call)


def policy_loss_from_scores(name: str, *, scores: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor,
                            **hparams):
    """A sequence-level loss from per-rollout scores s̄ ``[N]``, differentiable in them.

    Used where s̄ is assembled from pieces (context parallelism: per-rank partial sums reduced
    over the CP group). Same hyperparameters, normalisation and metrics as ``policy_loss``, except the
    REAL family's KL term: it is per token, so the caller adds ``kl_coef · Σ_k kl.kl_per_rollout(...) / N``.
    """
    loss, per_call = _build(name, hparams)
    if not loss.sequence_level:
        raise ValueError(f"{name!r} is token-level; policy_loss_from_scores takes the sequence-level losses "
                         f"{sorted(n for n, cls in LOSSES.items() if cls.sequence_level)}")
    return loss.loss_from_scores(scores, rewards, group_ids, **per_call)


def score_weights(name: str, *, scores: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor, **hparams):
    """Per-rollout weights ``w_k = ∂L/∂s̄_k`` of a group-coupled loss (the REAL family), for exact split batches.

    ``scores`` are *all* rollouts' s̄ under the current parameters (e.g. gathered over
    data-parallel ranks, or from a forward-only pass over the mini-batch). Returns
    ``(w [N] detached, loss scalar float tensor, metrics)``; the caller back-propagates
    ``(w[part] * s̄[part]).sum()`` for each part, which reproduces the full loss's gradient.
    """
    loss, _ = _build(name, hparams)
    if not loss.couples_groups:
        raise ValueError(f"score_weights is for the group-coupled REAL family; {name!r} is a sum over "
                         "tokens/rollouts: split it exactly with advantages= and normalizer= instead")
    return loss.score_weights(scores, rewards, group_ids)


def loss_normalizer(name: str, *, mask: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor,
                    **hparams) -> float:
    """The denominator ``policy_loss`` would use for this whole batch (pass it to every part)."""
    loss, _ = _build(name, hparams)
    return loss.normalizer(mask.bool().sum(dim=1), rewards, group_ids)


def zero_gradient_rollouts(name: str, *, rewards: torch.Tensor, group_ids: torch.Tensor, has_ref: bool = False,
                           **hparams) -> torch.Tensor:
    """``[N]`` bool: rollouts whose loss term and gradient are exactly zero whatever their log-probs
    (``PolicyLoss.zero_gradient_rollouts``: REAL's non-contributing groups, a zero group advantage;
    none when a KL term is on)."""
    loss, per_call = _build(name, hparams)
    return loss.zero_gradient_rollouts(rewards, group_ids, has_ref=has_ref, advantages=per_call.get("advantages"))
