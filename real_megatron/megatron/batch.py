"""How a mini-batch of rollouts becomes packed, token-budget micro-batches on data-parallel ranks.

The packing rules, written once:

1. **Sequence slots.** A rollout (prompt + response, ``L`` tokens) takes ``aligned_length(L)``
   positions: ``L`` rounded up to ``2·cp`` (Megatron's CP splits every sequence into 2·cp chunks)
   and to ``multiple`` (Transformer Engine's alignment); nothing else is padded.
2. **Micro-batch = one packed row** of at most ``max_tokens_per_micro_batch`` positions: slots back
   to back; attention never crosses a slot boundary and positions restart at 0 in every slot
   (``position_ids``; the model layer turns them into a block-diagonal causal mask or THD
   ``cu_seqlens``). Under pipeline parallelism every row is padded to the plan's longest row
   (``Plan.row_length``), because the schedule's p2p buffers have one shape.
3. **What is kept together.** REAL's loss couples a group's rollouts, so:

   * ``whole_groups`` mode (sequence-level group losses, every group fits the budget and the
     rollout cap, at least one group per rank): a group is one item and lands inside one
     micro-batch of one rank; each micro-batch's loss is ``policy_loss(..., normalizer=<whole
     mini-batch's denominator>)``.
   * ``exact`` mode (a group does not fit, fewer groups than ranks, or asked for): rollouts are
     items on their own; every micro-batch back-propagates ``Σ_k w_k·s̄_k`` with ``w = ∂L/∂s̄``
     over the whole mini-batch (``losses.score_weights``), which is the full loss's gradient.
   * ``additive`` mode (GRPO/DAPO/GSPO, the SFT loss): the loss is a sum of per-token/per-rollout
     terms with the mini-batch's advantages and denominator, so rollouts are items on their own.
4. **Ranks balanced by cost.** Items go to data-parallel ranks by the Karmarkar–Karp largest
   differencing method over ``cost(L) = L + L²/ATTENTION_COST_TOKENS`` (linear layers ∝ L,
   attention ∝ L²), then each rank packs its items into rows first-fit-decreasing by tokens. A
   rank left without items gets one empty row (``aligned_length(1)`` padding positions).

Tensors of one micro-batch (``[R, S]``, R = 1 for packed rows): ``tokens``, ``position_ids``,
``labels`` (the next token *within the slot*; the slot's last position gets ``pad_id``),
``loss_mask`` (1 where the label is a response token, EOS included), ``old_logp`` / ``ref_logp``
(aligned with labels; ``ref_logp`` only when a sample carries one), ``segment`` (the slot, i.e. the
index into ``sample_index``, of each position; −1 for row padding); per slot ``[k]``:
``sample_index``; ``cu_seqlens`` ``[blocks + 1]`` (int32 slot boundaries of the *full* row, row
padding as a last block) and ``max_seqlen`` ``[1]``, for THD attention.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from itertools import pairwise

import torch

# the sequence length at which attention's cost equals the linear layers' (per token: ~2·params
# FLOPs vs ~4·L·hidden·layers; 1.5B Qwen2: 2.6e9 / (4·1536·28) ≈ 15k)
ATTENTION_COST_TOKENS = 16384


@dataclass
class Sample:
    """One tokenised rollout. ``old_logp``: one value per response token (None until computed);
    ``old_logp_version``: the policy's ``version`` when ``MegatronPolicy.set_old_logprobs`` computed it
    (None: unknown); ``ref_logp``: the reference model's, when the loss has a KL to it; ``engine_logp``:
    the rollout engine's own per-token log-probs (a drift metric; None when the engine gives none)."""

    prompt_ids: list
    response_ids: list
    reward: float
    group_id: int
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    old_logp_version: int | None = None
    engine_logp: list | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def alignment(cp: int = 1, multiple: int = 1) -> int:
    """Positions a slot's length is a multiple of: lcm(2·cp if cp > 1, multiple)."""
    step = 2 * cp if cp > 1 else 1
    a, b = step, multiple
    while b:
        a, b = b, a % b
    return step * multiple // a


def aligned_length(length: int, align: int) -> int:
    return -(-length // align) * align


def token_cost(aligned: int) -> float:
    return aligned + aligned * aligned / ATTENTION_COST_TOKENS


@dataclass
class Plan:
    mode: str  # "whole_groups" | "exact" | "additive"
    reason: str
    align: int  # slot alignment (rule 1)
    row_length: int | None = None  # every row's length under PP (rule 2), else None (each row its own)
    # rank_micro_batches[dp_rank][m] = sample indices packed into that row ([] = an empty row)
    rank_micro_batches: list = field(default_factory=list)

    def micro_batch_length(self, samples: list[Sample], indices: list[int]) -> int:
        """Positions of one row: its slots, or ``row_length``; an empty row holds ``align`` positions."""
        if self.row_length is not None:
            return self.row_length
        return sum(aligned_length(samples[i].length, self.align) for i in indices) or self.align

    def processed_tokens(self, samples: list[Sample]) -> int:
        """Token positions the model runs over for this plan (all ranks, padding included)."""
        return sum(self.micro_batch_length(samples, mb) for rank in self.rank_micro_batches for mb in rank)

    def rank_tokens(self, samples: list[Sample]) -> list[int]:
        return [sum(self.micro_batch_length(samples, mb) for mb in rank) for rank in self.rank_micro_batches]


def _groups_in_order(samples: list[Sample], indices: list[int]) -> list[list[int]]:
    order: dict[int, list[int]] = {}
    for i in indices:
        order.setdefault(samples[i].group_id, []).append(i)
    return list(order.values())


def balance(costs: list[float], parts: int) -> list[list[int]]:
    """Karmarkar–Karp k-way partition: item indices per part, parts' cost sums close to equal."""
    heap = []
    for item, cost in enumerate(costs):
        sums = [cost] + [0.0] * (parts - 1)
        members = [[item]] + [[] for _ in range(parts - 1)]
        heapq.heappush(heap, (-cost, item, sums, members))  # key: −(largest − smallest sum)
    if not heap:
        return [[] for _ in range(parts)]
    while len(heap) > 1:
        _, tie, a_sums, a_members = heapq.heappop(heap)
        _, _, b_sums, b_members = heapq.heappop(heap)
        # both sorted descending: the largest part of one joins the smallest of the other
        merged = sorted(((a_sums[i] + b_sums[-1 - i], a_members[i] + b_members[-1 - i]) for i in range(parts)),
                        key=lambda p: -p[0])
        sums, members = [s for s, _ in merged], [m for _, m in merged]
        heapq.heappush(heap, (-(sums[0] - sums[-1]), tie, sums, members))
    return [sorted(m) for m in heap[0][3]]


def _first_fit_decreasing(items: list[list[int]], sizes: list[int], budget: int, max_rollouts: int | None):
    rows: list[list[int]] = []
    room: list[int] = []
    for k in sorted(range(len(items)), key=lambda k: (-sizes[k], items[k][0])):
        for r in range(len(rows)):
            if sizes[k] <= room[r] and (max_rollouts is None or len(rows[r]) + len(items[k]) <= max_rollouts):
                rows[r].extend(items[k])
                room[r] -= sizes[k]
                break
        else:
            rows.append(list(items[k]))
            room.append(budget - sizes[k])
    return [sorted(r) for r in rows]


def plan_micro_batches(samples: list[Sample], *, dp_size: int, max_tokens_per_micro_batch: int,
                       sequence_level_groups: bool, force_exact: bool = False, cp: int = 1, multiple: int = 1,
                       max_rollouts_per_micro_batch: int | None = None, fixed_row_length: bool = False,
                       include: list[int] | None = None) -> Plan:
    """Assign sample indices to (DP rank, micro-batch) under the packing rules of the module docstring.

    ``include``: the indices to place (default: all); the others are not run (rollouts whose
    gradient is exactly zero). ``fixed_row_length``: pad every row to the longest (pipeline
    parallelism). Raises ``ValueError`` when a single rollout exceeds the budget.
    """
    budget = int(max_tokens_per_micro_batch)
    align = alignment(cp, multiple)
    if budget < align:
        raise ValueError(f"max_tokens_per_micro_batch={budget} is below the slot alignment {align}")
    indices = list(range(len(samples))) if include is None else sorted(include)
    size = {i: aligned_length(samples[i].length, align) for i in indices}
    for i in indices:
        if size[i] > budget:
            raise ValueError(f"rollout {i} takes {size[i]} positions (prompt {len(samples[i].prompt_ids)} + response "
                             f"{len(samples[i].response_ids)} tokens, aligned to {align}), more than "
                             f"max_tokens_per_micro_batch={budget}: raise train.max_tokens_per_micro_batch to at "
                             "least data.max_prompt_length + rollout.max_new_tokens")
    groups = _groups_in_order(samples, indices)
    cap = max_rollouts_per_micro_batch
    if not sequence_level_groups:
        mode, reason = "additive", "the loss is a sum over tokens/rollouts: any split is exact with the mini-batch's advantages and denominator"
    elif force_exact:
        mode, reason = "exact", "exact mode requested"
    elif len(groups) < dp_size:
        mode, reason = "exact", f"{len(groups)} groups for {dp_size} data-parallel ranks: groups must be split across ranks"
    elif max(sum(size[i] for i in g) for g in groups) > budget:
        g = max(groups, key=lambda g: sum(size[i] for i in g))
        mode, reason = "exact", (f"a group of {len(g)} rollouts takes {sum(size[i] for i in g)} positions, more than "
                                 f"max_tokens_per_micro_batch={budget}: groups must be split across micro-batches")
    elif cap is not None and max(len(g) for g in groups) > cap:
        mode, reason = "exact", (f"a group of {max(len(g) for g in groups)} rollouts exceeds the cap of {cap} rollouts "
                                 "per micro-batch: groups must be split across micro-batches")
    else:
        mode, reason = "whole_groups", "every group fits whole in one micro-batch of one rank"
    items = groups if mode == "whole_groups" else [[i] for i in indices]
    item_tokens = [sum(size[i] for i in item) for item in items]
    ranks = balance([sum(token_cost(size[i]) for i in item) for item in items], dp_size)
    plan = Plan(mode, reason, align)
    for members in ranks:
        rows = _first_fit_decreasing([items[k] for k in members], [item_tokens[k] for k in members], budget, cap)
        plan.rank_micro_batches.append(rows or [[]])
    if fixed_row_length:
        plan.row_length = max(plan.micro_batch_length(samples, mb) for rank in plan.rank_micro_batches for mb in rank)
    return plan


def build_micro_batch(samples: list[Sample], indices: list[int], *, align: int = 1, row_length: int | None = None,
                      pad_id: int = 0, behaviour: bool = False) -> dict[str, torch.Tensor]:
    """One packed row ``[1, S]`` holding ``indices`` back to back (full length, before any CP split).
    ``behaviour``: add ``behaviour_logp`` (each sample's ``engine_logp``, aligned with the labels) for a loss that
    corrects for the behaviour policy."""
    slots = [aligned_length(samples[i].length, align) for i in indices]
    used = sum(slots)
    seq_len = row_length if row_length is not None else (used or align)
    if used > seq_len:
        raise ValueError(f"micro-batch holds {used} positions, more than its row length {seq_len}")
    tokens = torch.full((1, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((1, seq_len), pad_id, dtype=torch.long)
    position_ids = torch.zeros(1, seq_len, dtype=torch.long)
    segment = torch.full((1, seq_len), -1, dtype=torch.long)
    loss_mask = torch.zeros(1, seq_len, dtype=torch.float32)
    old_logp = torch.zeros(1, seq_len, dtype=torch.float32)
    has_ref = any(samples[i].ref_logp is not None for i in indices)
    ref_logp = torch.zeros(1, seq_len, dtype=torch.float32)
    behaviour_logp = torch.zeros(1, seq_len, dtype=torch.float32) if behaviour else None
    bounds = [0]
    start = 0
    for slot, (i, width) in enumerate(zip(indices, slots, strict=True)):
        s = samples[i]
        p, r = len(s.prompt_ids), len(s.response_ids)
        ids = torch.tensor(list(s.prompt_ids) + list(s.response_ids), dtype=torch.long)
        tokens[0, start:start + p + r] = ids
        labels[0, start:start + p + r - 1] = ids[1:]  # the label at position t is token t+1 of the same slot
        position_ids[0, start:start + width] = torch.arange(width)
        segment[0, start:start + width] = slot
        # response tokens are the labels of positions p-1 … p+r-2
        loss_mask[0, start + p - 1:start + p + r - 1] = 1.0
        if s.old_logp is not None:
            old_logp[0, start + p - 1:start + p + r - 1] = s.old_logp.to(torch.float32)
        if s.ref_logp is not None:
            ref_logp[0, start + p - 1:start + p + r - 1] = s.ref_logp.to(torch.float32)
        if behaviour:
            if s.engine_logp is None or len(s.engine_logp) != r:
                raise ValueError(f"sample {i} has no engine log-probs for its {r} response tokens: correcting for the "
                                 "behaviour policy needs them (the rollout engine returns them with each response)")
            behaviour_logp[0, start + p - 1:start + p + r - 1] = torch.as_tensor(s.engine_logp, dtype=torch.float32)
        start += width
        bounds.append(start)
    if start < seq_len:  # row padding: one more block, positions restart there too
        position_ids[0, start:] = torch.arange(seq_len - start)
        bounds.append(seq_len)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    batch = {
        "tokens": tokens, "position_ids": position_ids, "labels": labels, "loss_mask": loss_mask,
        "old_logp": old_logp, "segment": segment,
        "sample_index": torch.tensor(list(indices), dtype=torch.long),
        "cu_seqlens": cu_seqlens, "max_seqlen": (cu_seqlens[1:] - cu_seqlens[:-1]).max().reshape(1),
    }
    if has_ref:  # only the KL term toward the reference model reads it
        batch["ref_logp"] = ref_logp
    if behaviour:
        batch["behaviour_logp"] = behaviour_logp
    return batch


def cp_chunk_indices(seq_len: int, cp: int, cp_rank: int) -> torch.Tensor:
    """Positions of one sequence CP rank ``cp_rank`` keeps: chunks r and 2cp−1−r of 2·cp equal chunks."""
    if cp == 1:
        return torch.arange(seq_len)
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2*cp={2 * cp}")
    chunk = seq_len // (2 * cp)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp - 1 - cp_rank) * chunk, (2 * cp - cp_rank) * chunk)
    return torch.cat([first, second])


def cp_row_indices(cu_seqlens: torch.Tensor, cp: int, cp_rank: int) -> torch.Tensor:
    """Positions of a packed row CP rank ``cp_rank`` keeps: its two chunks of every block (THD CP)."""
    bounds = cu_seqlens.tolist()
    return torch.cat([start + cp_chunk_indices(stop - start, cp, cp_rank) for start, stop in pairwise(bounds)])


def split_for_cp(batch: dict[str, torch.Tensor], cp: int, cp_rank: int) -> dict[str, torch.Tensor]:
    """This CP rank's part of a micro-batch: the sequence dim of every [R, S] tensor, Megatron's THD way
    (``cu_seqlens`` and ``max_seqlen`` stay those of the full row, as THD attention expects)."""
    if cp == 1:
        return batch
    seq_len = batch["tokens"].shape[1]
    keep = cp_row_indices(batch["cu_seqlens"], cp, cp_rank)
    return {k: (v[:, keep] if v.dim() == 2 and v.shape[1] == seq_len else v) for k, v in batch.items()}


def slot_rows(segment: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each slot's positions are: ``index [slots, T]`` into ``segment.reshape(-1)`` (in row order)
    and ``valid [slots, T]``; T = the most positions any slot has here. Turns packed per-position
    values into the right-padded ``[N, T]`` rows the loss library takes (``flat[index]``)."""
    flat = segment.reshape(-1)
    pos = (flat >= 0).nonzero().squeeze(1)
    seg = flat[pos]
    order = torch.argsort(seg, stable=True)
    pos, seg = pos[order], seg[order]
    counts = torch.bincount(seg, minlength=slots)
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(seg.numel(), device=seg.device) - starts[seg]
    width = int(counts.max()) if slots and seg.numel() else 0
    index = torch.zeros(slots, width, dtype=torch.long, device=segment.device)
    valid = torch.zeros(slots, width, dtype=torch.bool, device=segment.device)
    index[seg, col] = pos
    valid[seg, col] = True
    return index, valid
