"""The micro-batch planner and packed rows (pure, no Megatron): budgets, groups, rank balance, layout."""
from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "megatron_workers"))
from common import fixed_samples  # noqa: E402

from real_megatron.megatron.batch import (  # noqa: E402
    Sample,
    aligned_length,
    balance,
    build_micro_batch,
    cp_chunk_indices,
    plan_micro_batches,
    slot_rows,
    split_for_cp,
)


def random_samples(seed: int, groups: int = 12, size: int = 4, longest: int = 300):
    g = torch.Generator().manual_seed(seed)
    out = []
    for gid in range(groups):
        prompt = [3] * int(torch.randint(2, 40, (1,), generator=g))
        for k in range(size):
            r = int(math.exp(3 + 1.2 * float(torch.randn(1, generator=g))))
            out.append(Sample(prompt, [4] * max(1, min(longest - len(prompt), r)), float(k % 2), gid))
    return out


def placed(plan) -> list[int]:
    return sorted(i for rank in plan.rank_micro_batches for mb in rank for i in mb)


@pytest.mark.parametrize("seed, dp, budget, cp", [(0, 1, 300, 1), (1, 2, 512, 1), (2, 4, 700, 2), (3, 3, 1000, 4)])
def test_every_rollout_is_placed_once_and_no_row_exceeds_the_budget(seed, dp, budget, cp):
    samples = random_samples(seed)
    for seq_level in (True, False):
        plan = plan_micro_batches(samples, dp_size=dp, max_tokens_per_micro_batch=budget,
                                  sequence_level_groups=seq_level, cp=cp)
        assert placed(plan) == list(range(len(samples)))
        assert len(plan.rank_micro_batches) == dp
        align = 2 * cp if cp > 1 else 1
        for rank in plan.rank_micro_batches:
            for mb in rank:
                length = plan.micro_batch_length(samples, mb)
                assert length <= budget and length % align == 0
        # processed positions = every rollout's aligned slot, nothing else (variable-length rows)
        assert plan.processed_tokens(samples) == sum(aligned_length(s.length, align) for s in samples)


def test_groups_stay_whole_when_they_fit_else_exact_mode_says_why():
    samples = fixed_samples()  # groups of 3, 4, 2, 5, 2; sequences of 4 to 19 tokens
    plan = plan_micro_batches(samples, dp_size=2, max_tokens_per_micro_batch=128, sequence_level_groups=True)
    assert plan.mode == "whole_groups"
    where = {}
    for d, rank in enumerate(plan.rank_micro_batches):
        for m, mb in enumerate(rank):
            for i in mb:
                where.setdefault(samples[i].group_id, set()).add((d, m))
    assert all(len(places) == 1 for places in where.values())  # one micro-batch of one rank per group
    assert placed(plan) == list(range(16))

    biggest = max(sum(s.length for s in samples if s.group_id == g) for g in where)
    split = plan_micro_batches(samples, dp_size=1, max_tokens_per_micro_batch=biggest - 1, sequence_level_groups=True)
    assert split.mode == "exact" and f"more than max_tokens_per_micro_batch={biggest - 1}" in split.reason
    capped = plan_micro_batches(samples, dp_size=1, max_tokens_per_micro_batch=1000, sequence_level_groups=True,
                                max_rollouts_per_micro_batch=4)
    assert capped.mode == "exact" and "a group of 5 rollouts exceeds the cap of 4" in capped.reason
    assert all(len(mb) <= 4 for mb in capped.rank_micro_batches[0])
    few = plan_micro_batches(samples[:3], dp_size=2, max_tokens_per_micro_batch=128, sequence_level_groups=True)
    assert few.mode == "exact" and "1 groups for 2 data-parallel ranks" in few.reason
    additive = plan_micro_batches(samples, dp_size=2, max_tokens_per_micro_batch=40, sequence_level_groups=False)
    assert additive.mode == "additive"


def test_a_rollout_longer_than_the_budget_is_an_error_naming_the_fix():
    samples = fixed_samples()
    longest = max(s.length for s in samples)
    with pytest.raises(ValueError, match="raise train.max_tokens_per_micro_batch"):
        plan_micro_batches(samples, dp_size=1, max_tokens_per_micro_batch=longest - 1, sequence_level_groups=False)


def test_a_rank_without_rollouts_gets_one_empty_row_and_include_leaves_the_rest_out():
    samples = fixed_samples()
    plan = plan_micro_batches(samples, dp_size=2, max_tokens_per_micro_batch=64, sequence_level_groups=False,
                              include=[4])
    assert sorted(len(rank) for rank in plan.rank_micro_batches) == [1, 1]
    assert placed(plan) == [4]
    assert plan.processed_tokens(samples) == samples[4].length + 1  # the empty row holds one position
    sub = plan_micro_batches(samples, dp_size=1, max_tokens_per_micro_batch=64, sequence_level_groups=True,
                             include=[0, 1, 2, 7, 8])
    assert placed(sub) == [0, 1, 2, 7, 8] and sub.mode == "whole_groups"


def test_fixed_row_length_pads_every_row_to_the_longest():
    samples = random_samples(5)
    plan = plan_micro_batches(samples, dp_size=2, max_tokens_per_micro_batch=600, sequence_level_groups=False,
                              fixed_row_length=True)
    rows = sum(len(rank) for rank in plan.rank_micro_batches)
    assert plan.processed_tokens(samples) == rows * plan.row_length
    assert plan.row_length == max(sum(samples[i].length for i in mb) for r in plan.rank_micro_batches for mb in r)


def test_ranks_are_balanced_by_token_cost():
    # the recipe's shape (benchmarks/packing.py): 32 prompts x 8 rollouts on 8 ranks, lengths 80..8,592
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from packing import recipe_samples

    for seed in range(3):
        samples = recipe_samples(seed)
        plan = plan_micro_batches(samples, dp_size=8, max_tokens_per_micro_batch=16384, sequence_level_groups=True)
        tokens = plan.rank_tokens(samples)
        assert max(tokens) / statistics.mean(tokens) <= 1.05
        assert sum(s.length for s in samples) / plan.processed_tokens(samples) >= 0.95
    # Karmarkar–Karp's differencing beats largest-first greedy (17 | 13) on the textbook case
    parts = balance([8, 7, 6, 5, 4], 2)
    sums = sorted(sum([8, 7, 6, 5, 4][i] for i in p) for p in parts)
    assert sums == [14, 16] and sorted(i for p in parts for i in p) == [0, 1, 2, 3, 4]


def test_packed_row_layout_restarts_positions_and_keeps_labels_inside_each_slot():
    a = Sample([5, 6, 7], [8, 9], 1.0, 0, old_logp=torch.tensor([-1.0, -2.0]))
    b = Sample([11], [12, 13, 14], 0.0, 0, old_logp=torch.tensor([-3.0, -4.0, -5.0]))
    batch = build_micro_batch([a, b], [1, 0], align=4, row_length=16)
    assert batch["tokens"][0].tolist() == [11, 12, 13, 14, 5, 6, 7, 8, 9, 0, 0, 0, 0, 0, 0, 0]
    assert batch["labels"][0].tolist() == [12, 13, 14, 0, 6, 7, 8, 9, 0, 0, 0, 0, 0, 0, 0, 0]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    assert batch["segment"][0].tolist() == [0] * 4 + [1] * 8 + [-1] * 4
    assert batch["loss_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert batch["old_logp"][0, [0, 1, 2, 6, 7]].tolist() == [-3.0, -4.0, -5.0, -1.0, -2.0]
    assert batch["cu_seqlens"].tolist() == [0, 4, 12, 16] and batch["max_seqlen"].item() == 8
    assert batch["sample_index"].tolist() == [1, 0]
    index, valid = slot_rows(batch["segment"], 2)
    assert index.shape == (2, 8) and valid.sum(1).tolist() == [4, 8]
    assert batch["tokens"].reshape(-1)[index[1]].tolist() == [5, 6, 7, 8, 9, 0, 0, 0]


def test_context_parallel_split_takes_two_chunks_of_every_sequence():
    assert cp_chunk_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_chunk_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="not divisible by 2\\*cp=4"):
        cp_chunk_indices(10, 2, 0)
    a, b = Sample([1, 2], [3, 4, 5], 1.0, 0), Sample([6], [7, 8, 9, 10, 11, 12], 0.0, 0)
    batch = build_micro_batch([a, b], [0, 1], align=4)  # slots of 8 and 8 positions
    parts = [split_for_cp(batch, 2, r) for r in range(2)]
    assert parts[0]["position_ids"][0].tolist() == [0, 1, 6, 7, 0, 1, 6, 7]
    assert parts[1]["position_ids"][0].tolist() == [2, 3, 4, 5, 2, 3, 4, 5]
    assert parts[0]["cu_seqlens"].tolist() == [0, 8, 16]  # THD attention takes the full row's boundaries
    together = torch.cat([parts[0]["tokens"], parts[1]["tokens"]], 1).sort().values
    assert torch.equal(together, batch["tokens"].sort().values)
