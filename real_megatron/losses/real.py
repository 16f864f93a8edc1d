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

import torch
import torch.nn.functional as F

from real_megatron.losses.common import Groups

REAL_FAMILY = ("real", "real_no_anchor", "real_bce")
GROUP_NORMS = ("all_groups", "contributing_groups")


def _segment_logsumexp(values: torch.Tensor, segment: torch.Tensor, num_segments: int, anchor: bool):
    """logsumexp of ``values`` within each segment, optionally with an extra 0 (the anchor).

    Returns ``(lse [num_segments], count [num_segments])``. Without the anchor, an empty segment
    gets lse = −inf-like garbage that callers must mask out; its gradient path is kept finite by
    substituting a sum of 1 before the log (so masked-out segments never produce 0 · inf = NaN).
    The shift ``m`` is detached: logsumexp is shift-invariant, so the value and gradient are exact.
    """
    fill = 0.0 if anchor else float("-inf")
    m = torch.full((num_segments,), fill, dtype=values.dtype, device=values.device)
    m = m.scatter_reduce(0, segment, values.detach(), reduce="amax", include_self=anchor)
    count = torch.bincount(segment, minlength=num_segments)
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
):
    """Per-group loss ``[G]`` (zero for non-contributing groups) and the contributing mask ``[G]``."""
    z = scores / tau
    num_pos = groups.sum(positive.to(torch.long))
    mixed = (num_pos > 0) & (num_pos < groups.sizes)
    contributing = torch.ones_like(mixed) if include_uniform_groups else mixed

    if name == "real":
        # segment 2g holds group g's positives (logit −z), segment 2g+1 its negatives (logit +z)
        segment = 2 * groups.index + (~positive).to(torch.long)
        signed = torch.where(positive, -z, z)
        lse, _ = _segment_logsumexp(signed, segment, 2 * groups.count, anchor=True)
        per_group = lse.view(groups.count, 2).sum(dim=1)
    elif name == "real_no_anchor":
        segment = 2 * groups.index + (~positive).to(torch.long)
        signed = torch.where(positive, -z, z)
        lse, _ = _segment_logsumexp(signed, segment, 2 * groups.count, anchor=False)
        pairs = lse.view(groups.count, 2).sum(dim=1)
        per_group = torch.where(mixed, F.softplus(torch.where(mixed, pairs, torch.zeros_like(pairs))), torch.zeros_like(pairs))
        contributing = mixed  # a uniform group has no (negative, positive) pairs
    elif name == "real_bce":
        per_rollout = F.softplus(torch.where(positive, -z, z))
        per_group = groups.sum(per_rollout)
    else:  # pragma: no cover - the dispatcher validates names
        raise ValueError(f"not a REAL-family loss: {name!r}")

    per_group = torch.where(contributing, per_group, torch.zeros_like(per_group))
    return per_group, contributing, mixed, num_pos
