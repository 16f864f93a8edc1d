"""REAL — Rewards as Labels (arXiv 2602.05630): the per-group losses.

Every rollout k of a prompt gets a logit s̄_k (``sequence_scores``) and a label from its reward
(positive iff ``reward >= positive_threshold``). With z_k = s̄_k / τ:

``real`` (Eq. 8, the anchor logit fixed at 0)::

    L_g = log(1 + Σ_{i∈O+} exp(−z_i)) + log(1 + Σ_{j∈O−} exp(z_j))

    Each term is a logsumexp over the group's rollouts of one label plus a constant 0 column
    (the anchor), so it is finite for any |s̄|/τ. Its gradient (Prop. 5.1) is
    |∂L_g/∂s̄_k| = (1/τ) / (1 + C± exp(±s̄_k/τ)) with C± ≥ 1: monotonic in s̄ and at most 1/τ.

``real_no_anchor`` (the "vanilla" L_CE(S+, S−) of §5.3)::

    L_g = log(1 + Σ_{j∈O−} Σ_{i∈O+} exp(z_j − z_i))
        = softplus( logsumexp_{j∈O−}(z_j) + logsumexp_{i∈O+}(−z_i) )     (the double sum factorises)

``real_bce``::

    L_g = Σ_{i∈O+} −log σ(z_i) + Σ_{j∈O−} −log(1 − σ(z_j))  = Σ softplus(∓z_k)

Which groups contribute: by default only *mixed* groups (at least one positive and one
negative), as in the authors' code. With ``include_uniform_groups=True`` an all-correct or
all-wrong group contributes too, through the anchor: the all-correct group's loss
log(1 + Σ exp(−z_i)) keeps pushing its rollouts' s̄ above the anchor 0 (more likely than under
π_old), and the all-wrong group's log(1 + Σ exp(z_j)) pushes them below it. ``real_no_anchor``
has no anchor, so a uniform group has no pairs and contributes exactly 0 either way.

Normalisation (``group_norm``): ``"all_groups"`` (default, the authors'): Σ_{contributing} L_g
divided by the number of *all* groups in the call, uniform ones included;
``"contributing_groups"``: divided by the number of contributing groups (at least 1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from real_megatron.losses.base import MicroBatch, PolicyLoss
from real_megatron.losses.behaviour import BEHAVIOUR_DEFAULTS
from real_megatron.losses.common import (
    Groups,
    check_denominator,
    check_rollout_tensors,
    check_sequence_lengths,
    check_token_tensors,
    group_metrics,
    score_inputs,
    sequence_scores,
)
from real_megatron.losses.diagnostics import score_weight_stats
from real_megatron.losses.kl import kl_per_rollout

REAL_FAMILY = ("real", "real_no_anchor", "real_bce")
GROUP_NORMS = ("all_groups", "contributing_groups")


def _segment_logsumexp(values: torch.Tensor, segment: torch.Tensor, num_segments: int, anchor: bool):
    """logsumexp of ``values`` within each segment, optionally with an extra 0 (the anchor).

    Returns ``(lse [num_segments], count [num_segments])``; ``count`` counts the finite values (a value of
    −inf is a member weighted 0, ``behaviour.py``'s mask). Without the anchor, an empty segment
    gets lse = −inf-like garbage that callers must mask out; its gradient path is kept finite by
    substituting a sum of 1 before the log (so masked-out segments never produce 0 · inf = NaN).
    The shift ``m`` is detached: logsumexp is shift-invariant, so the value and gradient are exact.
    """
    fill = 0.0 if anchor else float("-inf")
    m = torch.full((num_segments,), fill, dtype=values.dtype, device=values.device)
    m = m.scatter_reduce(0, segment, values.detach(), reduce="amax", include_self=anchor)
    count = torch.bincount(segment[torch.isfinite(values.detach())], minlength=num_segments)
    m = torch.where(count > 0, m, torch.zeros_like(m)) if not anchor else m
    shifted = torch.exp(values - m[segment])
    total = torch.zeros(num_segments, dtype=values.dtype, device=values.device).index_add(0, segment, shifted)
    if anchor:
        total = total + torch.exp(-m)
    else:
        total = torch.where(count > 0, total, torch.ones_like(total))
    return m + torch.log(total), count


def real_group_losses(
    name: str,
    scores: torch.Tensor,
    positive: torch.Tensor,
    groups: Groups,
    tau: float,
    include_uniform_groups: bool,
    log_w: torch.Tensor | None = None,
):
    """Per-group loss ``[G]`` (zero for non-contributing groups) and the contributing mask ``[G]``.

    ``log_w`` ``[N]``: each rollout's behaviour weight (``behaviour.py``; −inf: masked), added to its logit inside
    the group's logsumexp (``real``, ``real_no_anchor``) or multiplying its term (``real_bce``); None: weights 1.
    """
    z = scores / tau
    num_pos = groups.sum(positive.to(torch.long))
    mixed = (num_pos > 0) & (num_pos < groups.sizes)
    contributing = torch.ones_like(mixed) if include_uniform_groups else mixed

    if name == "real":
        # segment 2g holds group g's positives (logit −z), segment 2g+1 its negatives (logit +z)
        segment = 2 * groups.index + (~positive).to(torch.long)
        signed = torch.where(positive, -z, z)
        if log_w is not None:
            signed = signed + log_w
        lse, _ = _segment_logsumexp(signed, segment, 2 * groups.count, anchor=True)
        per_group = lse.view(groups.count, 2).sum(dim=1)
    elif name == "real_no_anchor":
        segment = 2 * groups.index + (~positive).to(torch.long)
        signed = torch.where(positive, -z, z)
        if log_w is not None:
            signed = signed + log_w
        lse, count = _segment_logsumexp(signed, segment, 2 * groups.count, anchor=False)
        pairs = lse.view(groups.count, 2).sum(dim=1)
        has_pairs = mixed & (count.view(groups.count, 2) > 0).all(dim=1)  # a masked-out side leaves no pairs
        per_group = torch.where(has_pairs, F.softplus(torch.where(has_pairs, pairs, torch.zeros_like(pairs))),
                                torch.zeros_like(pairs))
        contributing = mixed  # a uniform group has no (negative, positive) pairs
    elif name == "real_bce":
        per_rollout = F.softplus(torch.where(positive, -z, z))
        if log_w is not None:
            per_rollout = per_rollout * torch.exp(log_w)
        per_group = groups.sum(per_rollout)
    else:  # pragma: no cover - the dispatcher validates names
        raise ValueError(f"not a REAL-family loss: {name!r}")

    per_group = torch.where(contributing, per_group, torch.zeros_like(per_group))
    return per_group, contributing, mixed, num_pos


class RealLoss(PolicyLoss):
    """The REAL family (``real``, ``real_no_anchor``, ``real_bce``): group losses of the scores s̄.

    ``PER_CALL``: ``normalizer`` overrides the denominator (any ``group_norm``), ``num_groups`` the
    ``"all_groups"`` count — a part of a bigger batch passes the whole batch's (``loss_normalizer``).
    ``behaviour_log_ratio`` ``[N]`` (every method that sees rollouts): each rollout's length-normalised
    log π_old − log μ, when the loss corrects for the behaviour policy (``behaviour.py``)."""

    DEFAULTS = {
        "tau": 0.5,
        "positive_threshold": 1.0,
        "include_uniform_groups": False,
        "group_norm": "all_groups",
        "kl_coef": 0.0,  # Table 4's KL ablation: L_REAL + kl_coef · KL (kl.py)
        "kl_target": "ref",  # "ref": the frozen initial model; "old": π_old
        **BEHAVIOUR_DEFAULTS,
    }
    PER_CALL = {
        "normalizer": "the trainer sets the loss denominator from the whole mini-batch (loss_normalizer)",
        "num_groups": "the trainer sets the loss denominator from the whole mini-batch (loss_normalizer)",
    }
    sequence_level = True
    couples_groups = True

    def _check(self) -> None:
        hp = self.hp
        if not (isinstance(hp["tau"], (int, float)) and math.isfinite(hp["tau"]) and hp["tau"] > 0):
            raise ValueError(f"tau must be a positive finite number, got {hp['tau']!r}")
        if hp["group_norm"] not in GROUP_NORMS:
            raise ValueError(f"group_norm must be one of {GROUP_NORMS}, got {hp['group_norm']!r}")

    # ------------------------------------------------------------------ the formula, with its denominator
    def _log_w(self, behaviour_log_ratio):
        """Each rollout's corrected log weight, or None (weights 1) when the loss does not correct."""
        if behaviour_log_ratio is None or not self.corrects_behaviour:
            return None
        return self.behaviour.log_weights(behaviour_log_ratio)

    def group_losses(self, scores: torch.Tensor, positive: torch.Tensor, groups: Groups, log_w=None):
        """``(per-group loss [G], contributing [G])`` (``real_group_losses``)."""
        per_group, contributing, _, _ = real_group_losses(self.name, scores, positive, groups, self.hp["tau"],
                                                          self.hp["include_uniform_groups"], log_w)
        return per_group, contributing

    def denominator(self, num_groups: int, num_contributing: int, *, normalizer=None, num_groups_override=None) -> float:
        check_denominator(normalizer, "normalizer")
        check_denominator(num_groups_override, "num_groups")
        if num_groups_override is not None and self.hp["group_norm"] != "all_groups":
            raise ValueError("num_groups overrides the 'all_groups' denominator; with "
                             "group_norm='contributing_groups' pass normalizer= instead")
        if normalizer is not None:
            return float(normalizer)
        if self.hp["group_norm"] == "all_groups":
            return float(num_groups_override if num_groups_override is not None else num_groups)
        return float(max(num_contributing, 1))

    def loss_from_scores(self, scores, rewards, group_ids, *, normalizer=None, num_groups=None,
                         behaviour_log_ratio=None):
        """The loss from per-rollout scores s̄ ``[N]`` (differentiable in them) and its metrics."""
        groups, positive = score_inputs(scores, rewards, group_ids, self)
        return self._from_scores(scores, positive, groups, normalizer=normalizer, num_groups=num_groups,
                                 log_w=self._log_w(behaviour_log_ratio))

    def _from_scores(self, scores: torch.Tensor, positive: torch.Tensor, groups: Groups, *, normalizer=None,
                     num_groups=None, log_w=None):
        """``loss_from_scores`` for checked inputs and corrected log weights."""
        per_group, contributing = self.group_losses(scores, positive, groups, log_w)
        n_contributing = int(contributing.sum())
        denominator = self.denominator(groups.count, n_contributing, normalizer=normalizer,
                                       num_groups_override=num_groups)
        loss = per_group.sum() / denominator

        # Per-rollout gradient weight of its own group's loss, |∂L_g/∂s̄_k| (Prop. 5.1: ≤ 1/τ for
        # `real`, with or without behaviour weights), on a detached copy so metrics never touch the caller's graph.
        leaf = scores.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            detached_groups, _ = self.group_losses(leaf, positive, groups, log_w)
            (weights,) = torch.autograd.grad(detached_groups.sum(), leaf)
        metrics = group_metrics(scores, positive, groups)
        metrics["contributing_group_fraction"] = n_contributing / groups.count
        metrics["max_score_weight"] = float(weights.abs().max())
        metrics.update(score_weight_stats(weights, contributing[groups.index], self.hp["tau"]))  # the diag/ view
        metrics["loss_denominator"] = float(denominator)
        return loss, metrics

    # ------------------------------------------------------------------ the mini-batch
    def normalizer(self, lengths, rewards, group_ids) -> float:
        check_rollout_tensors(lengths.shape[0], rewards, group_ids)
        groups = Groups.from_ids(group_ids)
        _, contributing = self.group_losses(torch.zeros(lengths.shape[0], dtype=torch.float64), self.positive(rewards),
                                            groups)
        return self.denominator(groups.count, int(contributing.sum()))

    def _without_gradient(self, rewards, group_ids, advantages) -> torch.Tensor:
        # the rollouts of non-contributing groups (uniform groups unless include_uniform_groups;
        # real_no_anchor never counts them); behaviour weights only remove more, so these stay exact
        groups = Groups.from_ids(group_ids)
        _, contributing = self.group_losses(torch.zeros(rewards.shape[0], dtype=torch.float64), self.positive(rewards),
                                            groups)
        return ~contributing[groups.index]

    def score_weights(self, scores, rewards, group_ids, behaviour_log_ratio=None):
        groups, positive = score_inputs(scores, rewards, group_ids, self)
        leaf = scores.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss, metrics = self._from_scores(leaf, positive, groups, log_w=self._log_w(behaviour_log_ratio))
            (weights,) = torch.autograd.grad(loss, leaf)
        return weights, loss.detach(), metrics

    def exact_loss_value(self, scores, rewards, group_ids, kl, behaviour_log_ratio=None) -> float:
        _, loss, _ = self.score_weights(scores, rewards, group_ids, behaviour_log_ratio)
        value = loss.item()
        if kl is not None:  # Σ w·s̄ left out the KL term's value
            value += self.hp["kl_coef"] * kl.sum().item() / scores.shape[0]
        return value

    # ------------------------------------------------------------------ one micro-batch
    def share(self, mb: MicroBatch):
        return self.loss_from_scores(mb.scores, mb.rewards, mb.group_ids, normalizer=mb.normalizer,
                                     behaviour_log_ratio=mb.behaviour_log_ratio)

    def loss(self, *, logp, old_logp, mask, rewards, group_ids, ref_logp=None, sequence_lengths=None,
             normalizer=None, num_groups=None, behaviour_logp=None):
        """The token-tensor form (``dispatch.policy_loss``): ``[N, T]`` rows, whole rollouts; ``behaviour_logp``
        ``[N, T]``: the engine's log-probs (used when the loss corrects for the behaviour policy)."""
        bool_mask = check_token_tensors(logp, old_logp, mask, ref_logp)
        check_rollout_tensors(logp.shape[0], rewards, group_ids)
        check_sequence_lengths(sequence_lengths, rewards)
        groups = Groups.from_ids(group_ids.to(logp.device))
        positive = self.positive(rewards.to(logp.device))
        kl_logp = self.kl.target_of(old_logp, ref_logp, strict=True, loss=self.name)
        scores = sequence_scores(logp, old_logp, bool_mask)
        log_w = None
        if behaviour_logp is not None and self.corrects_behaviour:
            log_w = self._log_w(sequence_scores(old_logp.detach(), behaviour_logp.to(old_logp), bool_mask))
        loss, metrics = self._from_scores(scores, positive, groups, normalizer=normalizer, num_groups=num_groups,
                                          log_w=log_w)
        if kl_logp is not None:
            kl = kl_per_rollout(logp, kl_logp, bool_mask)
            loss = loss + self.hp["kl_coef"] * kl.sum() / logp.shape[0]
            metrics["kl"] = float(kl.detach().mean())
        return loss, metrics

    def batch_metrics(self, scores, rewards, group_ids, ran, token_means, behaviour_log_ratio=None) -> dict:
        _, _, metrics = self.score_weights(scores, rewards.double(), group_ids, behaviour_log_ratio)
        positive = self.positive(rewards)
        metrics.pop("score_mean_pos", None)
        metrics.pop("score_mean_neg", None)
        for key, sel in (("score_mean_pos", positive & ran), ("score_mean_neg", ~positive & ran)):
            if sel.any():  # over the rollouts that ran: the others' s̄ was never computed
                metrics[key] = scores[sel].mean().item()
        # REAL's weight statistics (score_weight_*) are gradient diagnostics: diag/, with the hook's
        return {f"{'diag' if k.startswith('score_weight_') else 'loss'}/{k}": v for k, v in metrics.items()}
