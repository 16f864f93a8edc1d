"""Pack a mini-batch of rollouts into Megatron micro-batches, keeping groups whole where they fit.

A REAL group's loss couples its rollouts, so where the rollouts land matters:

* ``whole_groups`` mode: every group sits inside one micro-batch of one data-parallel rank.
  Groups are dealt to DP ranks (fewest rollouts first, in prompt order) and packed first-fit
  into micro-batches of at most ``micro_batch_rollouts`` rollouts. Each micro-batch's loss is
  ``policy_loss(..., normalizer=<the whole mini-batch's denominator>)``.
* ``exact`` mode: used when some group cannot be kept whole (a group larger than a micro-batch,
  fewer groups than DP ranks) or when asked for. Rollouts are split evenly over ranks and
  micro-batches; each micro-batch back-propagates Σ_k w_k·s̄_k with w_k = ∂L/∂s̄_k computed from
  *all* the mini-batch's scores under the current parameters (``losses.score_weights``), which
  reproduces the full loss's gradient exactly.

The PPO-family losses are sums of per-token/per-rollout terms; with the mini-batch's advantages
and denominator passed in, any split is exact, so they always use the ``whole_groups`` path.

Tensors of one micro-batch (all ``[b, S]`` unless noted; every micro-batch of a mini-batch has the
same ``b`` and ``S`` because the pipeline schedule needs fixed shapes; dummy rows have
``row_valid = False``): ``tokens``, ``position_ids``, ``labels`` (tokens shifted left),
``loss_mask`` (1 where the label is a response token, EOS included), ``old_logp`` and
``ref_logp`` (aligned with labels; present only when the samples carry reference log-probs), and per row ``[b]``: ``sample_index``, ``row_valid``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sample:
    """One tokenised rollout. ``old_logp``: one value per response token (None until computed)."""

    prompt_ids: list
    response_ids: list
    reward: float
    group_id: int
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class Plan:
    mode: str  # "whole_groups" | "exact"
    reason: str
    # rank_micro_batches[dp_rank] = list of micro-batches, each a list of sample indices
    rank_micro_batches: list = field(default_factory=list)


def _groups_in_order(samples: list[Sample]) -> list[list[int]]:
    order: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        order.setdefault(s.group_id, []).append(i)
    return list(order.values())


def plan_micro_batches(samples: list[Sample], *, dp_size: int, micro_batch_rollouts: int,
                       sequence_level_groups: bool, force_exact: bool = False) -> Plan:
    """Assign sample indices to (DP rank, micro-batch). See the module docstring for the modes."""
    n = len(samples)
    if n < dp_size:
        raise ValueError(f"mini-batch has {n} rollouts for {dp_size} data-parallel ranks; every rank needs at least one")
    groups = _groups_in_order(samples)
    reason = ""
    if not sequence_level_groups:
        reason = "loss is a sum over tokens/rollouts: any split is exact with the mini-batch's advantages and denominator"
    elif force_exact:
        reason = "exact mode requested"
    elif len(groups) < dp_size:
        reason = f"{len(groups)} groups for {dp_size} data-parallel ranks: groups must be split across ranks"
    elif max(len(g) for g in groups) > micro_batch_rollouts:
        reason = (f"a group of {max(len(g) for g in groups)} rollouts exceeds micro_batch_rollouts="
                  f"{micro_batch_rollouts}: groups must be split across micro-batches")

    if sequence_level_groups and reason:  # exact mode: even split of the flat list
        per_rank = [list(range(n))[r * n // dp_size:(r + 1) * n // dp_size] for r in range(dp_size)]
        plan = Plan("exact", reason)
        for rows in per_rank:
            plan.rank_micro_batches.append([rows[i:i + micro_batch_rollouts] for i in range(0, len(rows), micro_batch_rollouts)])
        return plan

    # whole groups: deal groups to the rank with the fewest rollouts, then pack first-fit
    load = [0] * dp_size
    rank_groups: list[list[list[int]]] = [[] for _ in range(dp_size)]
    for g in groups:
        r = min(range(dp_size), key=lambda k: (load[k], k))
        rank_groups[r].append(g)
        load[r] += len(g)
    plan = Plan("whole_groups", reason or "every group fits whole in one micro-batch of one rank")
    for r in range(dp_size):
        micro: list[list[int]] = []
        for g in rank_groups[r]:
            if not sequence_level_groups:
                # token-level losses: fill micro-batches to the brim, groups may straddle
                for i in g:
                    if not micro or len(micro[-1]) >= micro_batch_rollouts:
                        micro.append([])
                    micro[-1].append(i)
                continue
            for mb in micro:
                if len(mb) + len(g) <= micro_batch_rollouts:
                    mb.extend(g)
                    break
            else:
                micro.append(list(g))
        if not micro:
            raise ValueError(f"data-parallel rank {r} got no rollouts; use fewer ranks or more prompts per mini-batch")
        plan.rank_micro_batches.append(micro)
    return plan


def padded_length(samples: list[Sample], cp: int, multiple: int = 1) -> int:
    """Common sequence length: the longest rollout, rounded up for CP (2·cp chunks) and ``multiple``."""
    step = 2 * cp if cp > 1 else 1
    step = step * multiple // _gcd(step, multiple)
    longest = max(s.length for s in samples)
    return ((longest + step - 1) // step) * step


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def build_micro_batch(samples: list[Sample], indices: list[int], *, rows: int, seq_len: int,
                      pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch (full sequence length, before any CP split)."""
    tokens = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(rows, seq_len, dtype=torch.float32)
    old_logp = torch.zeros(rows, seq_len, dtype=torch.float32)
    has_ref = any(samples[i].ref_logp is not None for i in indices)
    ref_logp = torch.zeros(rows, seq_len, dtype=torch.float32)
    sample_index = torch.full((rows,), -1, dtype=torch.long)
    for row, i in enumerate(indices):
        s = samples[i]
        p, r = len(s.prompt_ids), len(s.response_ids)
        tokens[row, :p + r] = torch.tensor(list(s.prompt_ids) + list(s.response_ids), dtype=torch.long)
        # the label at position t is token t+1: response tokens are the labels of positions p-1 … p+r-2
        loss_mask[row, p - 1:p + r - 1] = 1.0
        if s.old_logp is not None:
            old_logp[row, p - 1:p + r - 1] = s.old_logp.to(torch.float32)
        if s.ref_logp is not None:
            ref_logp[row, p - 1:p + r - 1] = s.ref_logp.to(torch.float32)
        sample_index[row] = i
    labels = torch.roll(tokens, shifts=-1, dims=1)
    labels[:, -1] = pad_id
    batch = {
        "tokens": tokens,
        "position_ids": torch.arange(seq_len).unsqueeze(0).expand(rows, seq_len).contiguous(),
        "labels": labels,
        "loss_mask": loss_mask,
        "old_logp": old_logp,
        "sample_index": sample_index,
        "row_valid": sample_index >= 0,
    }
    if has_ref:  # only GRPO's KL term reads it
        batch["ref_logp"] = ref_logp
    return batch


def cp_chunk_indices(seq_len: int, cp: int, cp_rank: int) -> torch.Tensor:
    """Sequence positions CP rank ``cp_rank`` keeps: chunks r and 2cp−1−r of 2·cp equal chunks."""
    if cp == 1:
        return torch.arange(seq_len)
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2*cp={2 * cp}")
    chunk = seq_len // (2 * cp)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp - 1 - cp_rank) * chunk, (2 * cp - cp_rank) * chunk)
    return torch.cat([first, second])


def split_for_cp(batch: dict[str, torch.Tensor], cp: int, cp_rank: int) -> dict[str, torch.Tensor]:
    """This CP rank's part of a micro-batch: the sequence dim of every [b, S] tensor, Megatron's way."""
    if cp == 1:
        return batch
    seq_len = batch["tokens"].shape[1]
    keep = cp_chunk_indices(seq_len, cp, cp_rank)
    return {k: (v[:, keep] if v.dim() == 2 and v.shape[1] == seq_len else v) for k, v in batch.items()}
