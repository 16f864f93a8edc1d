"""Input checks and group bookkeeping shared by every policy loss (pure PyTorch).

Conventions used across the loss library:

* ``logp``, ``old_logp``, ``ref_logp``: per-token log-probabilities ``[N, T]``, right-padded.
  Values at padded positions (``mask == 0``) are ignored, whatever they are.
* ``mask``: ``[N, T]``, 1 for response tokens (EOS included), 0 for prompt/padding.
* ``rewards``: ``[N]`` floats; ``group_ids``: ``[N]`` integers, one id per prompt, in any
  order, groups of any size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def check_token_tensors(logp, old_logp, mask, ref_logp=None, allow_empty_rows=False) -> torch.Tensor:
    """Validate the ``[N, T]`` token tensors; return the mask as a bool tensor.

    ``allow_empty_rows``: rows hold only part of each response (context parallelism), so a row may
    have no tokens here.
    """
    for name, t in (("logp", logp), ("old_logp", old_logp), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [N, T], got shape {tuple(t.shape)}")
    if old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"shape mismatch: logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, "
            f"mask {tuple(mask.shape)}; all three must be [N, T]"
        )
    if ref_logp is not None and (not isinstance(ref_logp, torch.Tensor) or ref_logp.shape != logp.shape):
        shape = tuple(ref_logp.shape) if isinstance(ref_logp, torch.Tensor) else type(ref_logp).__name__
        raise ValueError(f"ref_logp must have logp's shape {tuple(logp.shape)}, got {shape}")
    if logp.shape[0] == 0:
        raise ValueError("empty batch: logp has no rows")
    bool_mask = mask.bool() if mask.dtype != torch.bool else mask
    empty_rows = (~bool_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty_rows and not allow_empty_rows:
        raise ValueError(
            f"rows {empty_rows[:10]} have no response tokens (mask is all zero); every rollout needs "
            "at least one response token (the EOS counts) — drop empty rollouts before the loss"
        )
    for name, t in (("logp", logp), ("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is None:
            continue
        bad = bool_mask & ~torch.isfinite(t.detach())
        if bad.any():
            row, col = bad.nonzero()[0].tolist()
            raise ValueError(f"{name} is not finite (NaN/inf) at response token [row {row}, col {col}]")
    return bool_mask


def check_rollout_tensors(n: int, rewards, group_ids) -> None:
    """Validate the per-rollout ``[N]`` tensors."""
    if not isinstance(rewards, torch.Tensor) or rewards.shape != (n,):
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a tensor of shape [{n}] (one per rollout), got {shape}")
    if not torch.isfinite(rewards).all():
        row = (~torch.isfinite(rewards)).nonzero()[0].item()
        raise ValueError(f"rewards[{row}] is not finite ({rewards[row].item()})")
    if not isinstance(group_ids, torch.Tensor) or group_ids.shape != (n,):
        shape = tuple(group_ids.shape) if isinstance(group_ids, torch.Tensor) else type(group_ids).__name__
        raise ValueError(f"group_ids must be a tensor of shape [{n}] (one per rollout), got {shape}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool or group_ids.is_complex():
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")


@dataclass
class Groups:
    """Dense group indices for a batch: rollout k belongs to group ``index[k]`` in ``[0, count)``."""

    index: torch.Tensor  # [N] long
    count: int
    sizes: torch.Tensor  # [count] long

    @classmethod
    def from_ids(cls, group_ids: torch.Tensor) -> Groups:
        _, index = torch.unique(group_ids, return_inverse=True)
        count = int(index.max().item()) + 1
        sizes = torch.bincount(index, minlength=count)
        return cls(index=index, count=count, sizes=sizes)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group sum of per-rollout values ``[N] -> [count]`` (differentiable)."""
        out = torch.zeros(self.count, dtype=values.dtype, device=values.device)
        return out.index_add(0, self.index, values)


def sequence_scores(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """REAL's per-rollout logit s̄: the masked mean of ``logp - old_logp`` over response tokens.

    ``[N, T] x 3 -> [N]``. Padded positions are ignored even if they hold NaN/inf.
    """
    bool_mask = check_token_tensors(logp, old_logp, mask)
    diff = torch.where(bool_mask, logp - old_logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    return diff.sum(dim=1) / bool_mask.sum(dim=1).to(logp.dtype)


def masked_token_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over response tokens per row, ignoring whatever sits at padded positions."""
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(dim=1)


def check_sequence_lengths(sequence_lengths, rewards: torch.Tensor) -> None:
    """``sequence_lengths`` (None, or ``[N]`` positive: each rollout's full response length) fits ``rewards``."""
    if sequence_lengths is not None and (sequence_lengths.shape != rewards.shape or (sequence_lengths <= 0).any()):
        raise ValueError(f"sequence_lengths must be positive, one per rollout ({rewards.shape[0]})")


def check_denominator(value, name: str) -> None:
    """A per-call denominator override (``normalizer``, ``num_groups``): None or a positive finite number."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number (the whole batch's denominator), got {value!r}")


def score_inputs(scores, rewards: torch.Tensor, group_ids: torch.Tensor, loss) -> tuple[Groups, torch.Tensor]:
    """Check per-rollout scores s̄ ``[N]`` (finite) with their rewards and groups; return the groups and
    ``loss``'s positives."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D tensor [N], got {getattr(scores, 'shape', type(scores).__name__)}")
    finite = torch.isfinite(scores.detach())
    if not finite.all():
        raise ValueError(f"scores[{int((~finite).nonzero()[0])}] is not finite")
    check_rollout_tensors(scores.shape[0], rewards, group_ids)
    return Groups.from_ids(group_ids.to(scores.device)), loss.positive(rewards.to(scores.device))


def group_metrics(scores: torch.Tensor, positive: torch.Tensor, groups: Groups) -> dict[str, float]:
    """Group counts and the mean score of positives and negatives (every loss reports them)."""
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
